"""Ranking and agreement metrics for probe predictions, with bootstrap CIs.

All metrics take 1-D ``y_true`` and ``y_pred`` of equal length n (numpy arrays,
torch tensors or sequences) and return a float. Inputs containing NaN, empty
inputs and mismatched lengths raise ``ValueError``; inputs that are valid but
degenerate (a constant vector, a single class) give ``nan`` because the metric
is undefined there, which lets :func:`bootstrap_ci` drop such resamples.

Example::

    res = bootstrap_ci(kendall_tau, y_true, y_pred, n_boot=1000)
    print(res.value, res.low, res.high)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
from scipy.stats import rankdata

from ._utils import describe_nans, to_numpy

__all__ = [
    "MetricResult",
    "bootstrap_ci",
    "evaluate_all",
    "kendall_tau",
    "pairwise_accuracy",
    "roc_auc",
    "sign_agreement",
    "spearman",
    "top_k_overlap",
]


@dataclass(frozen=True)
class MetricResult:
    """A metric value with a bootstrap confidence interval.

    Attributes
    ----------
    value : float
        Metric on the full sample.
    low, high : float
        Percentile-bootstrap interval bounds (nan when not computed).
    n : int
        Number of items the metric was computed on.
    """

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain-Python dict (JSON-serialisable)."""
        return asdict(self)


# ---------------------------------------------------------------- validation
def _as_vector(values: Any, *, name: str, metric: str) -> np.ndarray:
    arr = to_numpy(values, name=f"{metric}: {name}")
    if arr.ndim != 1:
        raise ValueError(
            f"{metric}: {name} must be 1-D [n]; received shape {arr.shape}."
        )
    msg = describe_nans(arr, name=f"{metric}: {name}")
    if msg:
        raise ValueError(msg)
    return arr


def _validate_pair(y_true: Any, y_pred: Any, metric: str) -> tuple[np.ndarray, np.ndarray]:
    yt = _as_vector(y_true, name="y_true", metric=metric)
    yp = _as_vector(y_pred, name="y_pred", metric=metric)
    if len(yt) != len(yp):
        raise ValueError(
            f"{metric}: y_true and y_pred must have the same length; received "
            f"{len(yt)} and {len(yp)}."
        )
    if len(yt) == 0:
        raise ValueError(f"{metric}: received empty inputs; expected at least 1 item.")
    return yt, yp


# -------------------------------------------------------------- pair counting
def _count_inversions(a: np.ndarray) -> int:
    """Number of pairs i < j with a[i] > a[j] (strict), for integer ranks a in [0, n).

    Bottom-up merge sort, vectorised per level: at width w, every element of a
    right block counts the larger elements of its sorted left partner block
    with one ``searchsorted`` over all blocks at once (blocks are kept apart by
    adding ``pair_id * M`` to the values). O(n log² n) in numpy, ~1 ms for n = 10k.
    """
    n = len(a)
    a = a.astype(np.int64)
    M = int(a.max()) + 1 if n else 1
    idx = np.arange(n, dtype=np.int64)
    total = 0
    width = 1
    while width < n:
        block = idx // width
        pair = block // 2
        is_right = (block % 2).astype(bool)
        keys = pair * M + a
        left_keys = keys[~is_right]  # sorted: blocks sorted, pair offsets increasing
        right_keys = keys[is_right]
        right_pair = pair[is_right]
        hi = np.searchsorted(left_keys, (right_pair + 1) * M, side="left")
        lo = np.searchsorted(left_keys, right_keys, side="right")
        total += int((hi - lo).sum())
        # Sorting the offset keys merges every pair of blocks in one call.
        a = np.sort(keys) - pair * M
        width *= 2
    return total


def _tied_pairs(values: np.ndarray) -> int:
    _, counts = np.unique(values, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def _pair_counts(x: np.ndarray, y: np.ndarray) -> tuple[int, int, int, int, int]:
    """(concordant, discordant, total pairs, pairs tied in x, pairs tied in y)."""
    n = len(x)
    n0 = n * (n - 1) // 2
    n1, n2 = _tied_pairs(x), _tied_pairs(y)
    order = np.lexsort((y, x))  # by x, then y: no strict y-inversions within x-ties
    xs, ys = x[order], y[order]
    # Pairs tied in both x and y: runs of identical (x, y) in the sorted order.
    new_run = np.r_[True, (xs[1:] != xs[:-1]) | (ys[1:] != ys[:-1])]
    run_lengths = np.diff(np.r_[np.flatnonzero(new_run), n])
    n3 = int((run_lengths * (run_lengths - 1) // 2).sum())
    discordant = _count_inversions(np.unique(ys, return_inverse=True)[1])
    concordant = n0 - n1 - n2 + n3 - discordant
    return concordant, discordant, n0, n1, n2


# -------------------------------------------------------------------- metrics
def kendall_tau(y_true: Any, y_pred: Any) -> float:
    """Kendall's tau-b (tie-corrected), as ``scipy.stats.kendalltau``; O(n log² n).

    y_true, y_pred : [n]. Returns nan if either input is constant.

    Example::

        kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])   # 0.667
    """
    yt, yp = _validate_pair(y_true, y_pred, "kendall_tau")
    c, d, n0, n1, n2 = _pair_counts(yt, yp)
    denom = math.sqrt(float(n0 - n1) * float(n0 - n2))
    return (c - d) / denom if denom > 0 else float("nan")


def pairwise_accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of item pairs ordered the same way by y_pred and y_true.

    Pairs tied in y_true or in y_pred are excluded, so this is
    ``C / (C + D)`` over concordant C and discordant D pairs. O(n log² n).
    y_true, y_pred : [n]. Returns nan when no untied pair exists.

    Example::

        pairwise_accuracy([1, 2, 3], [1, 3, 2])   # 2 of 3 pairs agree: 0.667
    """
    yt, yp = _validate_pair(y_true, y_pred, "pairwise_accuracy")
    c, d, *_ = _pair_counts(yt, yp)
    return c / (c + d) if c + d > 0 else float("nan")


def spearman(y_true: Any, y_pred: Any) -> float:
    """Spearman rank correlation (Pearson on average ranks), as ``scipy.stats.spearmanr``.

    y_true, y_pred : [n]. Returns nan if either input is constant.

    Example::

        spearman([1, 2, 3, 4], [10, 20, 40, 30])   # 0.8
    """
    yt, yp = _validate_pair(y_true, y_pred, "spearman")
    rt = rankdata(yt) - (len(yt) + 1) / 2
    rp = rankdata(yp) - (len(yp) + 1) / 2
    denom = math.sqrt(float(rt @ rt) * float(rp @ rp))
    return float(rt @ rp) / denom if denom > 0 else float("nan")


def roc_auc(y_true: Any, y_score: Any) -> float:
    """Area under the ROC curve (ties in y_score count one half).

    y_true : [n] binary labels (bool or two numeric values; the larger one is
    the positive class). y_score : [n]. Returns nan when only one class is
    present; raises for more than two distinct labels.

    Example::

        roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])   # 0.75
    """
    yt, ys = _validate_pair(y_true, y_score, "roc_auc")
    labels = np.unique(yt)
    if len(labels) > 2:
        raise ValueError(
            f"roc_auc: y_true must be binary; received {len(labels)} distinct "
            f"values (first ones: {labels[:5].tolist()})."
        )
    if len(labels) < 2:
        return float("nan")
    pos = yt == labels[1]
    n_pos = int(pos.sum())
    n_neg = len(yt) - n_pos
    # Mann-Whitney U of the positives with average ranks for ties.
    ranks = rankdata(ys)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def top_k_overlap(y_true: Any, y_pred: Any, k: int) -> float:
    """``|topk(y_pred) ∩ topk(y_true)| / k`` over item indices.

    y_true, y_pred : [n]; 1 <= k <= n. Ties at the k-th place are broken by
    item index (lower index first), identically for both vectors.

    Example::

        top_k_overlap([5, 4, 3, 2], [4, 5, 1, 3], k=2)   # 1.0
    """
    yt, yp = _validate_pair(y_true, y_pred, "top_k_overlap")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(yt):
        raise ValueError(
            f"top_k_overlap: k must be an integer in [1, n={len(yt)}]; received {k!r}."
        )
    # Stable sort of the negated values = descending order, ties by index.
    top_true = np.argsort(-yt, kind="stable")[:k]
    top_pred = np.argsort(-yp, kind="stable")[:k]
    return len(np.intersect1d(top_true, top_pred)) / k


def sign_agreement(y_true: Any, y_pred: Any) -> float:
    """Share of items whose prediction has the same sign as the truth.

    Items where either value is exactly 0 have no sign and are excluded.
    y_true, y_pred : [n]. Returns nan when no item has two non-zero values.

    Example::

        sign_agreement([1.0, -2.0, 3.0], [0.5, 1.0, 2.0])   # 0.667
    """
    yt, yp = _validate_pair(y_true, y_pred, "sign_agreement")
    keep = (yt != 0) & (yp != 0)
    if not keep.any():
        return float("nan")
    return float(np.mean(np.sign(yt[keep]) == np.sign(yp[keep])))


# ------------------------------------------------------------------ bootstrap
def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: Any,
    y_pred: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> MetricResult:
    """Metric value and percentile-bootstrap ``1 - alpha`` confidence interval.

    Items are resampled with replacement ``n_boot`` times; resamples on which
    the metric is undefined (nan, e.g. a single class for roc_auc) are dropped
    with a ``RuntimeWarning`` saying how many. Use ``functools.partial`` for
    metrics with extra arguments (``partial(top_k_overlap, k=10)``). The same
    seed gives the same resamples for every metric, so CIs are paired.

    y_true, y_pred : [n]

    Example::

        res = bootstrap_ci(spearman, y_true, y_pred, n_boot=2000, seed=1)
        res.to_dict()   # {'value': ..., 'low': ..., 'high': ..., 'n': ...}
    """
    name = getattr(metric_fn, "__name__", None) or getattr(
        getattr(metric_fn, "func", None), "__name__", "metric"
    )
    yt, yp = _validate_pair(y_true, y_pred, f"bootstrap_ci({name})")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be an integer >= 1; received {n_boot!r}.")
    if not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: alpha must be in (0, 1); received {alpha!r}.")
    n = len(yt)
    value = float(metric_fn(yt, yp))
    rng = np.random.default_rng(seed)
    weighted = _WEIGHTED.get(metric_fn)  # type: ignore[call-overload]
    if weighted is not None and n <= _WEIGHTED_MAX_N:
        # The same resamples as the loop below (one draw of shape [n_boot, n] consumes the generator
        # exactly as n_boot draws of n), evaluated all at once from per-item multiplicities.
        idx = rng.integers(0, n, size=(n_boot, n))
        counts = np.bincount((np.arange(n_boot)[:, None] * n + idx).ravel(), minlength=n_boot * n)
        boots = weighted(yt, yp, counts.reshape(n_boot, n).astype(np.float64))
    elif metric_fn is spearman:
        idx = rng.integers(0, n, size=(n_boot, n))
        boots = _spearman_rows(yt[idx], yp[idx])
    else:
        boots = np.empty(n_boot)
        for b in range(n_boot):
            idx = rng.integers(0, n, size=n)
            boots[b] = metric_fn(yt[idx], yp[idx])
    undefined = int(np.isnan(boots).sum())
    if undefined:
        warnings.warn(
            f"bootstrap_ci({name}): the metric was undefined (nan) on {undefined} of "
            f"{n_boot} resamples; the interval uses the other {n_boot - undefined}.",
            RuntimeWarning,
            stacklevel=2,
        )
    if undefined == n_boot:
        return MetricResult(value, float("nan"), float("nan"), n)
    low, high = np.quantile(boots[~np.isnan(boots)], [alpha / 2, 1 - alpha / 2])
    return MetricResult(value, float(low), float(high), n)


# ------------------------------------------------- bootstrap from multiplicities
# A bootstrap resample is a multiset of the n items: item i taken w_i times. A pair metric of the
# resample is then a quadratic form in w over the n x n pair matrix of the original items (a pair of
# copies of one item is tied in both vectors and counts nowhere), so all resamples cost one matrix
# product: ~100x faster than re-sorting every resample for n in the hundreds.
_WEIGHTED_MAX_N = 3000  # the pair matrices are n x n float64


def _pair_signs(yt: np.ndarray, yp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    st = np.sign(yt[:, None] - yt[None, :])
    sp = np.sign(yp[:, None] - yp[None, :])
    return st, sp


def _quad(w: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.einsum("bi,bi->b", w @ m, w)


def _kendall_weighted(yt: np.ndarray, yp: np.ndarray, w: np.ndarray) -> np.ndarray:
    st, sp = _pair_signs(yt, yp)
    num = _quad(w, st * sp)
    den = np.sqrt(_quad(w, np.abs(st)) * _quad(w, np.abs(sp)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _pairwise_weighted(yt: np.ndarray, yp: np.ndarray, w: np.ndarray) -> np.ndarray:
    st, sp = _pair_signs(yt, yp)
    q = st * sp
    c, d = _quad(w, (q > 0).astype(np.float64)), _quad(w, (q < 0).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c + d > 0, c / np.where(c + d > 0, c + d, 1.0), np.nan)


def _sign_agreement_weighted(yt: np.ndarray, yp: np.ndarray, w: np.ndarray) -> np.ndarray:
    keep = ((yt != 0) & (yp != 0)).astype(np.float64)
    agree = keep * (np.sign(yt) == np.sign(yp))
    k = w @ keep
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, (w @ agree) / np.where(k > 0, k, 1.0), np.nan)


def _spearman_rows(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Spearman per row of ``[B, n]`` arrays (average ranks), as :func:`spearman` on each row."""
    n = t.shape[1]
    rt = rankdata(t, axis=1) - (n + 1) / 2
    rp = rankdata(p, axis=1) - (n + 1) / 2
    den = np.sqrt((rt * rt).sum(1) * (rp * rp).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rt * rp).sum(1) / np.where(den > 0, den, 1.0), np.nan)


_WEIGHTED: dict[Callable[..., float], Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    kendall_tau: _kendall_weighted,
    pairwise_accuracy: _pairwise_weighted,
    sign_agreement: _sign_agreement_weighted,
}


def register_weighted(metric_fn: Callable[..., float],
                      weighted_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> None:
    """Give :func:`bootstrap_ci` a vectorised form of ``metric_fn``: ``weighted_fn(y_true, y_pred, w)``
    returns the metric of every resample at once from its item multiplicities ``w`` [n_boot, n] (float),
    nan where undefined. It must equal ``metric_fn`` on the resampled items (copies of one item
    included); the resamples are then the same as the loop's."""
    if not (callable(metric_fn) and callable(weighted_fn)):
        raise TypeError("register_weighted takes two callables: the metric and its weighted form")
    _WEIGHTED[metric_fn] = weighted_fn


_RANK_METRICS: dict[str, Callable[..., float]] = {
    "kendall_tau": kendall_tau,
    "spearman": spearman,
    "pairwise_accuracy": pairwise_accuracy,
    "top_k_overlap": top_k_overlap,
    "sign_agreement": sign_agreement,
    "roc_auc": roc_auc,
}


def evaluate_all(
    y_true: Any,
    y_pred: Any,
    *,
    k: int | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
) -> dict[str, MetricResult]:
    """Compute several metrics with bootstrap CIs.

    Parameters
    ----------
    y_true, y_pred : [n]
    k : int, optional
        For top_k_overlap; default ``max(1, round(0.1 * n))`` (top decile).
    n_boot : int, default=1000
        0 skips the bootstrap (``low`` and ``high`` are nan).
    metrics : sequence of str, optional
        Subset of ``kendall_tau, spearman, pairwise_accuracy, top_k_overlap,
        sign_agreement, roc_auc``. Default: all, with roc_auc only when y_true
        has exactly two distinct values.

    Returns
    -------
    dict mapping metric name -> MetricResult

    Example::

        results = evaluate_all(y_true, y_pred, n_boot=500)
        {name: r.to_dict() for name, r in results.items()}
    """
    yt, yp = _validate_pair(y_true, y_pred, "evaluate_all")
    if metrics is None:
        metrics = [m for m in _RANK_METRICS if m != "roc_auc"]
        if len(np.unique(yt)) == 2:
            metrics.append("roc_auc")
    unknown = [m for m in metrics if m not in _RANK_METRICS]
    if unknown:
        raise ValueError(
            f"evaluate_all: unknown metric(s) {unknown}; expected names from "
            f"{list(_RANK_METRICS)}."
        )
    k = max(1, round(0.1 * len(yt))) if k is None else k
    out: dict[str, MetricResult] = {}
    for name in metrics:
        fn = partial(top_k_overlap, k=k) if name == "top_k_overlap" else _RANK_METRICS[name]
        if n_boot == 0:
            out[name] = MetricResult(float(fn(yt, yp)), float("nan"), float("nan"), len(yt))
        else:
            out[name] = bootstrap_ci(fn, yt, yp, n_boot=n_boot, alpha=alpha, seed=seed)
    return out
