"""Reconstruct the IRM as a word -> utility table and compare it with the explicit table.

Sources of the implicit reward (targets always come from the pair, never from the explicit RM):

``logratio``          direct: mean over templates of ``log p_tuned(w) - log p_base(w)``; no probe.
``probe:logratio``    a ridge probe on activations (tuned, base or tuned - base, per layer) fitted to
                      the fit words' log-ratio, then applied to held-out words.
``probe:triple``      a ridge probe fitted to the contrastive-triple target: the distance, in the tuned
                      model's activations at the slot, between the word's sentence and the neutral
                      sentence, signed by whether the pair prefers the word over the neutral word
                      (log-ratio difference). The paper signs it by the triple's positive/negative role;
                      with lexicon-built triples that role is the lexicon's sign, so that variant,
                      ``probe:triple_lexsign``, is reported as weakly supervised, never as the IRM.

Reference points reported beside them, never called the IRM:

``ceiling``           a probe fitted directly on the explicit utilities of the fit words (decodability).
``control``           the same constructions on the untuned base model as if it were tuned: with base
                      in place of tuned every log-ratio is identically zero, so the control uses the
                      base's own preference against a uniform reference (``log p_base(w)``, centred) and
                      probes on base activations fitted to it. The gain of tuned over control is the finding.

Held-out words are never used in fitting or in choosing the best source: the best unsupervised
source is chosen by 5-fold cross-validated Kendall tau on the fit words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probes import RidgeProbe, bootstrap_ci, kendall_tau, pairwise_accuracy, sign_agreement, spearman
from probes.metrics import register_weighted

__all__ = ["WordData", "SourceResult", "reconstruct", "rescale", "rescale_factor", "recovered", "cv_tau_interval", "RECOVERED_TOL",
           "BADLY_WRONG_MIN", "PROBE_KINDS", "auc"]

RECOVERED_TOL = 1.0  # a word is "recovered": same sign and within 1.0 of the true utility (VADER is in [-4, 4])
BADLY_WRONG_MIN = 1.0  # "badly wrong": opposite sign, with both |true| and |reconstructed| at least 1.0
UNSUPERVISED = ("logratio", "probe:logratio", "probe:triple", "ensemble")
PROBE_KINDS = ("probe:logratio", "probe:triple", "ensemble")  # the unsupervised sources that are linear probes
ENSEMBLE_SIZES = (2, 3, 5)


@dataclass
class WordData:
    """Everything read from the pair about the split's words (rows in ``split.all_words`` order)."""

    words: list[str]
    n_fit: int
    utilities: np.ndarray  # [n_words] explicit utilities (only used for evaluation and the ceiling)
    lp_base: np.ndarray  # [n_words, T]
    lp_tuned: np.ndarray  # [n_words, T]
    feats: dict[str, dict[str, np.ndarray]]  # hook -> {"tuned", "base", "diff"} -> [n_words, d]
    triple_dist: dict[str, np.ndarray]  # hook -> [n_words] slot distance word vs neutral (tuned)
    neutral_logratio: float  # mean log-ratio of the neutral words
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fit(self) -> slice:
        return slice(0, self.n_fit)

    @property
    def test(self) -> slice:
        return slice(self.n_fit, len(self.words))


@dataclass
class SourceResult:
    name: str  # e.g. "probe:logratio/tuned/blocks.5.hook_resid_post"
    kind: str  # logratio | probe:logratio | probe:triple | probe:triple_lexsign | ceiling | control
    features: str | None
    hook: str | None
    pred_all: np.ndarray  # rescaled predictions for every word (fit words in-sample, test words held out)
    cv_tau_fit: float
    metrics: dict[str, dict[str, float]]
    counts: dict[str, int]
    supervised: bool
    # A probe source's fitted weights on its features: raw = X @ coef + intercept; pred = factor * raw.
    coef: np.ndarray | None = None
    intercept: float | None = None
    factor: float = 1.0
    cv_pred_fit: np.ndarray | None = None  # 5-fold out-of-fold predictions on the fit words
    cv_tau_ci: dict[str, float] | None = None  # bootstrap CI of cv_tau_fit (computed for the headline sources)
    components: list[tuple[SourceResult, float]] | None = None  # an ensemble: (source, weight on its raw output)

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "kind": self.kind, "features": self.features, "hook": self.hook,
             "cv_tau_fit": self.cv_tau_fit, "cv_tau_ci": self.cv_tau_ci, "metrics": self.metrics,
             "counts": self.counts, "supervised": self.supervised}
        if self.components:
            d["components"] = [c.name for c, _ in self.components]
        return d

    def linear_parts(self) -> list[tuple[SourceResult, float]]:
        """(probe source, weight on its raw output ``X @ coef + intercept``) whose sum is this source's
        prediction: itself with its rescale factor, or an ensemble's members."""
        if self.components:
            return self.components
        if self.coef is None:
            raise ValueError(f"{self.name} is not a linear probe.")
        return [(self, self.factor)]


def rescale_factor(pred: np.ndarray, table_values: np.ndarray) -> float:
    """The factor of :func:`rescale`."""
    q_pred = np.quantile(np.abs(pred), 0.95)
    q_tab = np.quantile(np.abs(table_values), 0.95)
    return float(q_tab / q_pred) if q_pred > 0 else 1.0


def rescale(pred: np.ndarray, table_values: np.ndarray) -> np.ndarray:
    """Map predictions onto the explicit table's range, keeping zero at zero (no change = no reward).

    The scale matches the 95th percentiles of ``|pred|`` and of ``|table|``: robust to a few extreme
    words, and it uses only the table's range, never any word's utility.
    """
    return pred * rescale_factor(pred, table_values)


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve of ``p`` separating words of positive from negative utility ``y``
    (words of zero utility left out): the metric that suits a table of few values, where Kendall tau
    saturates on ties."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    pos, neg = p[y > 0], p[y < 0]
    if not len(pos) or not len(neg):
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([pos, neg]))
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _auc_weighted(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """:func:`auc` of every bootstrap resample at once (``w``: [n_boot, n] item multiplicities): the
    Mann-Whitney count over (positive, negative) pairs, a tie counting half, weighted by both
    multiplicities (a copy of an item never pairs with itself: it has one sign)."""
    pos, neg = (y > 0).astype(np.float64), (y < 0).astype(np.float64)
    beats = (p[:, None] > p[None, :]) + 0.5 * (p[:, None] == p[None, :])
    m = pos[:, None] * neg[None, :] * beats
    num = np.einsum("bi,bi->b", w @ m, w)
    den = (w @ pos) * (w @ neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


register_weighted(auc, _auc_weighted)


def _metrics(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, fn in (("kendall_tau", kendall_tau), ("spearman", spearman), ("sign_agreement", sign_agreement),
                     ("pairwise_accuracy", pairwise_accuracy), ("auc", auc)):
        if np.ptp(p) == 0:
            out[name] = {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": int(len(y))}
            continue
        out[name] = bootstrap_ci(fn, y, p, n_boot=n_boot, seed=seed).to_dict()
    return out


def _counts(y: np.ndarray, p: np.ndarray) -> dict[str, int]:
    same = np.sign(y) == np.sign(p)
    recovered = same & (np.abs(p - y) <= RECOVERED_TOL)
    badly = (~same) & (np.abs(y) >= BADLY_WRONG_MIN) & (np.abs(p) >= BADLY_WRONG_MIN)
    return {"n": int(len(y)), "recovered": int(recovered.sum()), "badly_wrong": int(badly.sum())}


def _cv_predict(X: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold ridge predictions (GCV alpha inside each fold) for ``y`` [n] or [n, k] (each column
    its own alpha; the folds' eigendecompositions are shared by the columns)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    out = np.empty(y.shape)
    for k in range(folds):
        te = idx[k::folds]
        tr = np.setdiff1d(idx, te)
        out[te] = RidgeProbe(alpha="auto").fit(X[tr], y[tr]).predict(X[te])
    return out


def reconstruct(data: WordData, *, n_boot: int = 1000, seed: int = 0, folds: int = 5,
                feature_sets: Sequence[str] = ("tuned", "base", "diff")) -> list[SourceResult]:
    """Every source's held-out reconstruction, metrics and counts."""
    u = data.utilities
    fit, test = data.fit, data.test
    y_test = u[test]
    results: list[SourceResult] = []

    def add(name, kind, pred_raw, cv_pred_fit, *, features=None, hook=None, supervised=False, probe=None):
        factor = rescale_factor(pred_raw, u)
        pred = pred_raw * factor
        ok = np.ptp(cv_pred_fit) > 0
        cv_tau = kendall_tau(u[fit], cv_pred_fit) if ok else float("nan")
        results.append(SourceResult(
            name=name, kind=kind, features=features, hook=hook, pred_all=pred, cv_tau_fit=float(cv_tau),
            metrics=_metrics(y_test, pred[test], n_boot, seed), counts=_counts(y_test, pred[test]),
            supervised=supervised, coef=None if probe is None else probe[0],
            intercept=None if probe is None else float(probe[1]), factor=factor,
            cv_pred_fit=np.asarray(cv_pred_fit, dtype=np.float64)))

    logratio = (data.lp_tuned - data.lp_base).mean(1)
    add("logratio", "logratio", logratio, logratio[fit])
    base_pref = data.lp_base.mean(1) - data.lp_base.mean()
    add("control:logprob", "control", base_pref, base_pref[fit])

    for hook, fs in data.feats.items():
        triple_pair = np.sign(logratio - data.neutral_logratio) * data.triple_dist[hook]
        triple_lex = np.sign(u) * data.triple_dist[hook]
        targets = {
            "probe:logratio": (logratio, False),
            "probe:triple": (triple_pair, False),
            "probe:triple_lexsign": (triple_lex, True),
            "ceiling": (u, True),
        }
        # The control: probes on base activations fitted to the base's own preference.
        control = None
        for fname in [*feature_sets, *(["base"] if "base" not in feature_sets else [])]:
            X = fs[fname]
            # Every target of these features in one multi-output fit: each column gets its own GCV alpha,
            # the same solution as fitting it alone, but one eigendecomposition per fold serves them all.
            cols = list(targets.items()) if fname in feature_sets else []
            Y = np.stack([t for _, (t, _) in cols] + ([base_pref] if fname == "base" else []), 1)
            probe = RidgeProbe(alpha="auto").fit(X[fit], Y[fit])
            pred = probe.predict(X)
            cv = _cv_predict(X[fit], Y[fit], folds, seed)
            coef, icpt = np.atleast_2d(probe.coef_), np.atleast_1d(probe.intercept_)
            for j, (kind, (_, supervised)) in enumerate(cols):
                add(f"{kind}/{fname}/{hook}", kind, pred[:, j], cv[:, j], features=fname, hook=hook,
                    supervised=supervised, probe=(coef[j], icpt[j]))
            if fname == "base":
                control = (pred[:, -1], cv[:, -1], (coef[-1], icpt[-1]))
        assert control is not None
        add(f"control:probe/base/{hook}", "control", control[0], control[1], features="base", hook=hook,
            probe=control[2])
    _add_ensembles(results, u, fit, test, n_boot=n_boot, seed=seed)
    return results


def _add_ensembles(results: list[SourceResult], u: np.ndarray, fit: slice, test: slice, *, n_boot: int,
                   seed: int) -> None:
    """Ensembles of the unsupervised probes with the highest cross-validated tau on the fit words: the
    mean of their rescaled predictions (and of their out-of-fold predictions, for the ensemble's own
    cross-validated tau). Several layers and targets agree on the words they all rank confidently and
    average out each one's noise; members and sizes are chosen on the fit words only."""
    cands = sorted([r for r in results if r.kind in ("probe:logratio", "probe:triple") and np.isfinite(r.cv_tau_fit)],
                   key=lambda r: -r.cv_tau_fit)
    y_test = u[test]
    for k in ENSEMBLE_SIZES:
        if len(cands) < k:
            break
        members = cands[:k]
        mean = np.mean([r.pred_all for r in members], 0)
        cv = np.mean([r.factor * r.cv_pred_fit for r in members], 0)
        f = rescale_factor(mean, u)
        pred = mean * f
        cv_tau = kendall_tau(u[fit], cv) if np.ptp(cv) > 0 else float("nan")
        results.append(SourceResult(
            name=f"ensemble:top{k}", kind="ensemble", features=None, hook=None, pred_all=pred,
            cv_tau_fit=float(cv_tau), metrics=_metrics(y_test, pred[test], n_boot, seed),
            counts=_counts(y_test, pred[test]), supervised=False, factor=f, cv_pred_fit=cv * f,
            components=[(r, r.factor * f / k) for r in members]))


def best(results: Sequence[SourceResult], kinds: Sequence[str]) -> SourceResult:
    """The source of the given kinds with the highest cross-validated tau on the fit words."""
    cands = [r for r in results if r.kind in kinds and np.isfinite(r.cv_tau_fit)]
    if not cands:
        raise ValueError(f"No source of kinds {list(kinds)} has a finite cross-validated tau.")
    return max(cands, key=lambda r: r.cv_tau_fit)


def divergence_table(data: WordData, src: SourceResult, k: int = 15) -> dict[str, list[dict[str, Any]]]:
    """Held-out words the IRM over- and under-values most relative to the explicit RM."""
    test = np.arange(len(data.words))[data.test]
    gap = src.pred_all[test] - data.utilities[test]
    order = np.argsort(gap)

    def rows(ids):
        return [{"word": data.words[test[i]], "explicit": float(data.utilities[test[i]]),
                 "implicit": float(src.pred_all[test[i]]), "gap": float(gap[i])} for i in ids]

    return {"overvalued": rows(order[::-1][:k]), "undervalued": rows(order[:k])}


def cv_tau_interval(r: SourceResult, u_fit: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, float] | None:
    """Bootstrap CI (over fit words) of a source's cross-validated Kendall tau; stored on ``r``."""
    if r.cv_tau_ci is None and r.cv_pred_fit is not None and np.ptp(r.cv_pred_fit) > 0:
        r.cv_tau_ci = bootstrap_ci(kendall_tau, u_fit, r.cv_pred_fit, n_boot=n_boot, seed=seed).to_dict()
    return r.cv_tau_ci


def recovered(r: SourceResult) -> bool:
    """Whether a source counts as a recovered IRM: its cross-validated tau interval lies above 0."""
    ci = r.cv_tau_ci
    return bool(ci is not None and np.isfinite(ci.get("low", np.nan)) and ci["low"] > 0)


def summarise(results: Sequence[SourceResult], u_fit: np.ndarray | None = None, *, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Headline numbers: best unsupervised IRM, ceiling and control, each with held-out tau and CI.

    With ``u_fit`` (the fit words' explicit utilities) the best source's cross-validated tau gets a
    bootstrap interval, and ``irm_recovered`` says whether it lies above 0: a "best" IRM whose interval
    includes 0 is no IRM, and the report says "no IRM recovered"."""
    def brief(r: SourceResult) -> dict[str, Any]:
        return {"source": r.name, "cv_tau_fit": r.cv_tau_fit, "cv_tau_ci": r.cv_tau_ci,
                **{k: v for k, v in r.metrics.items()}, "counts": r.counts}

    b = best(results, UNSUPERVISED)
    if u_fit is not None:
        cv_tau_interval(b, u_fit, n_boot=n_boot, seed=seed)
    ceiling = best(results, ["ceiling"])
    control = best(results, ["control"])
    tau = b.metrics["kendall_tau"]
    ctl = control.metrics["kendall_tau"]
    return {
        "best_unsupervised": brief(b),
        "ceiling": brief(ceiling),
        "control": brief(control),
        "logratio_direct": brief(next(r for r in results if r.name == "logratio")),
        "gain_over_control": (tau["value"] - ctl["value"]) if np.isfinite(ctl["value"]) else tau["value"],
        "best_above_control": bool(tau["low"] > ctl["high"]) if np.isfinite(ctl["high"]) else bool(tau["low"] > 0),
        "irm_recovered": recovered(b) if u_fit is not None else None,
    }


def as_table(words: Sequence[str], values: np.ndarray) -> Mapping[str, float]:
    return {w: float(v) for w, v in zip(words, values, strict=True)}
