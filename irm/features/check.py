"""The IRM checked against SAE features.

**The IRM direction.** The linear IRM is a ridge probe on activations; its weight vector ``w`` is a
direction in activation space (:func:`irm_direction` refits it from the IRM stage's word data). A
feature's *IRM weight* is the cosine of its decoder direction with ``w``; its *attribution* is its mean
absolute contribution to the probe's score over a set of rows, ``mean_r |f_i(x_r)| * |W_dec[i] . w|``
(since ``w . x ~= sum_i f_i(x) W_dec[i] . w + const``).

**Alignment** (:func:`alignment_test`): the share of the IRM weight (or attribution) that falls on
LLM-flagged features, among the features that were interpreted, against random subsets of the same
size from the same features (a permutation test, one-sided: flagged features carry more). The null
is drawn from the interpreted features, not the whole dictionary, because those were partly chosen
*for* their IRM weight: against the whole dictionary any labelling would look aligned.

**Activation rate** (:func:`activation_rate_check`, the paper's check): how often flagged features
are active on inputs the IRM scores high vs low (top vs bottom third of texts), with a bootstrap CI
of the difference and a permutation p-value; unflagged features give the control.

>>> w, info = irm_direction(X_words, y_irm, fit_mask)
>>> weights = feature_irm_weights(decoder_directions(sae), w)      # [d_sae] cosines
>>> alignment_test(np.abs(weights[ids]), flagged)["p_value"]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from probes import RidgeProbe, spearman

__all__ = ["irm_direction", "feature_irm_weights", "feature_attributions", "alignment_test",
           "activation_rate_check", "per_text_rate"]


def irm_direction(
    X: Float[np.ndarray, "n d"], y: Float[np.ndarray, " n"], fit: np.ndarray | slice | None = None
) -> tuple[Float[np.ndarray, " d"], dict[str, Any]]:
    """The linear IRM's weight vector: a ridge probe (GCV alpha) from activations ``X`` to IRM values ``y``.

    ``fit`` selects the rows to fit on (e.g. the IRM's fit words); the probe's Spearman correlation with
    ``y`` on the other rows is reported as ``heldout_spearman`` (None when there are none).

    >>> w, info = irm_direction(feats["tuned"], irm_table_values, slice(0, n_fit))
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (len(X),):
        raise ValueError(f"irm_direction needs X [n, d] and y [n]; got {X.shape} and {y.shape}.")
    mask = np.zeros(len(X), bool)
    if fit is None:
        mask[:] = True
    else:
        mask[fit] = True
    if mask.sum() < 3 or np.ptp(y[mask]) == 0:
        raise ValueError(f"Cannot fit the IRM direction: {int(mask.sum())} fit rows with "
                         f"{'constant' if mask.sum() else 'no'} targets. Did the IRM stage produce word data?")
    probe = RidgeProbe(alpha="auto").fit(X[mask], y[mask])
    info: dict[str, Any] = {"n_fit": int(mask.sum()), "alpha": float(probe.alpha_), "heldout_spearman": None}
    if (~mask).sum() >= 3:
        pred = probe.predict(X[~mask])
        if np.ptp(pred) > 0 and np.ptp(y[~mask]) > 0:
            info["heldout_spearman"] = float(spearman(y[~mask], pred))
        info["n_heldout"] = int((~mask).sum())
    return np.asarray(probe.coef_, dtype=np.float64), info


def feature_irm_weights(directions: Float[Tensor, "d_sae d"], w: Float[np.ndarray, " d"]) -> np.ndarray:
    """``[d_sae]`` cosine between each (unit) decoder direction and the IRM direction ``w``."""
    w = np.asarray(w, dtype=np.float64)
    if directions.shape[1] != len(w):
        raise ValueError(f"Decoder directions have d={directions.shape[1]} but the IRM direction has {len(w)}; "
                         "fit the IRM probe on activations of the SAE's hook.")
    n = np.linalg.norm(w)
    if n == 0:
        raise ValueError("The IRM direction is all zeros (a probe fitted to a constant?).")
    return directions.double().numpy() @ (w / n)


def feature_attributions(acts: Float[Tensor, "rows d_sae"], W_dec: Float[Tensor, "d_sae d"],
                         w: Float[np.ndarray, " d"]) -> np.ndarray:
    """``[d_sae]`` mean over rows of ``|f_i(x)| * |W_dec[i] . w|``: each feature's share of the probe's score."""
    proj = (W_dec.double() @ torch.as_tensor(np.asarray(w, dtype=np.float64))).abs()
    return (acts.double().abs().mean(0) * proj).numpy()


def alignment_test(values: np.ndarray, flagged: np.ndarray, *, n_perm: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Share of ``values`` (>= 0, e.g. |IRM weight| of each interpreted feature) on ``flagged`` features,
    against random subsets of the same size: ``{"share", "baseline_mean", "baseline_q95", "p_value", ...}``.

    ``p_value = (1 + #{random share >= observed}) / (1 + n_perm)`` (one-sided). None with a ``note``
    when the test is undefined (no feature flagged, or every feature flagged).

    >>> alignment_test(np.array([5., 4., 0.1, 0.1, 0.1, 0.1]), np.array([1, 1, 0, 0, 0, 0], bool))["p_value"]
    """
    v = np.abs(np.asarray(values, dtype=np.float64))
    f = np.asarray(flagged, dtype=bool)
    if v.shape != f.shape:
        raise ValueError(f"values {v.shape} and flagged {f.shape} must have the same shape.")
    n, k = len(v), int(f.sum())
    out: dict[str, Any] = {"n": n, "n_flagged": k, "share": None, "baseline_mean": None, "baseline_q95": None,
                           "p_value": None, "n_perm": n_perm}
    if n == 0 or v.sum() == 0:
        out["note"] = "no interpreted feature carries IRM weight"
        return out
    if k == 0 or k == n:
        out["note"] = f"{'no' if k == 0 else 'every'} interpreted feature is flagged; nothing to compare"
        out["share"] = float(v[f].sum() / v.sum())
        return out
    total = v.sum()
    share = float(v[f].sum() / total)
    rng = np.random.default_rng(seed)
    # argpartition of random keys gives n_perm random k-subsets at once.
    keys = rng.random((n_perm, n))
    idx = np.argpartition(keys, k - 1, axis=1)[:, :k]
    null = v[idx].sum(1) / total
    out.update(share=share, baseline_mean=float(null.mean()), baseline_q95=float(np.quantile(null, 0.95)),
               p_value=float((1 + (null >= share - 1e-12).sum()) / (1 + n_perm)),
               lift=float(share / null.mean()) if null.mean() > 0 else None)
    out["_null"] = null  # for the plot; dropped before results.json
    return out


def per_text_rate(active: Tensor | np.ndarray, text_of_row: np.ndarray, n_texts: int) -> np.ndarray:
    """``[n_texts]``: per text, the share of (token, feature) pairs that are active (nan: text has no rows).

    ``active``: ``[rows, n_feat]`` bool; ``text_of_row``: ``[rows]`` text id of each row.
    """
    a = active.numpy() if isinstance(active, Tensor) else np.asarray(active)
    if a.ndim != 2 or len(a) != len(text_of_row):
        raise ValueError(f"active must be [rows, n_feat] with rows = len(text_of_row) = {len(text_of_row)}; "
                         f"got {a.shape}.")
    per_row = a.mean(1) if a.shape[1] else np.zeros(len(a))
    num = np.bincount(text_of_row, weights=per_row, minlength=n_texts)
    den = np.bincount(text_of_row, minlength=n_texts).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _groups(scores: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Random tie-breaking: a lexicon IRM gives many texts the same score (often 0).
    order = np.lexsort((rng.random(len(scores)), scores))
    m = int(np.floor(len(scores) * fraction))
    return order[len(scores) - m:], order[:m]


def _compare(rate: np.ndarray, high: np.ndarray, low: np.ndarray, n_boot: int, n_perm: int,
             rng: np.random.Generator) -> dict[str, Any]:
    a, b = rate[high], rate[low]
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return {"note": f"too few texts ({len(a)} high, {len(b)} low)"}
    diff = float(a.mean() - b.mean())
    boots = (a[rng.integers(0, len(a), (n_boot, len(a)))].mean(1)
             - b[rng.integers(0, len(b), (n_boot, len(b)))].mean(1))
    pooled = np.concatenate([a, b])
    # n_perm random splits of the pooled texts into groups of the observed sizes, all at once.
    perm = np.argsort(rng.random((n_perm, len(pooled))), axis=1)
    shuffled = pooled[perm]
    null = shuffled[:, :len(a)].mean(1) - shuffled[:, len(a):].mean(1)
    return {"rate_high": float(a.mean()), "rate_low": float(b.mean()), "diff": diff,
            "diff_low": float(np.quantile(boots, 0.025)), "diff_high": float(np.quantile(boots, 0.975)),
            "p_value": float((1 + (null >= diff - 1e-15).sum()) / (1 + n_perm)),
            "n_high": int(len(a)), "n_low": int(len(b))}


def activation_rate_check(
    scores: np.ndarray,
    active: Tensor | np.ndarray,
    text_of_row: np.ndarray,
    flagged: np.ndarray,
    *,
    fraction: float = 1 / 3,
    n_boot: int = 1000,
    n_perm: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Activation rate of flagged features on texts the IRM scores high vs low.

    ``scores``: ``[n_texts]`` IRM score of each text; ``active``: ``[rows, n_feat]`` bool activity of the
    interpreted features on the store's rows; ``flagged``: ``[n_feat]`` bool (LLM label 1). Texts are
    split into the top and bottom ``fraction`` by score (``by_score``) and by ``|score|``
    (``by_abs_score``: emotionally loaded vs neutral, for features of either sign). For flagged features
    and, as the control, unflagged ones: mean per-text rate in each group, the difference with a
    bootstrap 95% CI, and a one-sided permutation p-value (high > low).
    """
    scores = np.asarray(scores, dtype=np.float64)
    flagged = np.asarray(flagged, dtype=bool)
    a = active.numpy() if isinstance(active, Tensor) else np.asarray(active)
    if a.shape[1] != len(flagged):
        raise ValueError(f"active has {a.shape[1]} feature columns but flagged has {len(flagged)} entries.")
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}.")
    rng = np.random.default_rng(seed)
    n_texts = len(scores)
    out: dict[str, Any] = {"n_texts": n_texts, "n_flagged": int(flagged.sum()), "n_unflagged": int((~flagged).sum()),
                           "fraction": fraction, "score_std": float(scores.std())}
    if np.ptp(scores) == 0:
        out["note"] = "the IRM gives every text the same score; high vs low is undefined"
        return out
    for by, s in (("by_score", scores), ("by_abs_score", np.abs(scores))):
        high, low = _groups(s, fraction, rng)
        res: dict[str, Any] = {}
        for name, mask in (("flagged", flagged), ("unflagged", ~flagged)):
            if mask.sum() == 0:
                res[name] = {"note": f"no {name} features"}
                continue
            rate = per_text_rate(a[:, mask], text_of_row, n_texts)
            res[name] = _compare(rate, high, low, n_boot, n_perm, rng)
        out[by] = res
    return out
