"""The IRM at the level reward models judge: whole responses.

Texts are (prompt, response) pairs: the held-out generations of the pair (each held-out prompt with
the base's and the tuned model's response) and, where given, texts of the user's own. A deterministic
split by prompt keeps the test prompts out of every fit. Probes read each response's mean activation
(``response_mean``) at a hook, from the tuned model, the base model or their difference, and are fitted
to targets from the pair alone:

``probe:logratio``   the log-ratio reward of the whole response, ``beta * sum_t (log p_tuned - log p_base)``;
``probe:contrast``   the same target centred within each prompt (the tuned-vs-base contrast of the two
                     responses of one prompt: what a preference between them rests on).

Beside them, never called the IRM: ``logratio`` (the log-ratio reward itself, no probe), the
``ceiling`` (a probe fitted to the explicit RM's scores: how decodable they are), and the ``control``
(the untuned base model's own preference, ``log p_base(response)`` centred, directly and through a probe on
base activations). Every source is compared with the explicit RM on the **test** texts: Kendall tau
over texts and pairwise accuracy over each test prompt's two responses (the comparison an RM makes),
each with a bootstrap CI over prompts.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from irm.activations.capture import capture_activations, records_from_pairs
from irm.core.log import get_logger
from probes import RidgeProbe, bootstrap_ci, kendall_tau

__all__ = ["SequenceData", "collect_sequence_data", "compare_sequences", "pair_scores"]

log = get_logger(__name__)


@dataclass
class SequenceData:
    prompts: list[str]
    responses: list[str]
    group: np.ndarray  # [n] prompt id of each text (the two responses of one prompt share it)
    test: np.ndarray  # [n] bool: held out from every fit
    explicit: np.ndarray  # [n] explicit RM scores
    logratio: np.ndarray  # [n] beta * summed log-ratio of the response
    logp_base: np.ndarray  # [n] summed log p_base of the response
    feats: dict[str, dict[str, np.ndarray]]  # hook -> tuned/base/diff -> [n, d]


def _prompt_hash(p: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:seq:{p}".encode()).hexdigest()[:12], 16) / 16**12


def collect_sequence_data(pair, explicit_rm, samples: Sequence[dict[str, str]], hooks: list[str], *, beta: float,
                          test_fraction: float = 0.5, seed: int = 0, batch_size: int = 32,
                          max_length: int = 256) -> SequenceData:
    """Activations, log-ratios and explicit scores of each sample's base and tuned response."""
    from irm.core.threads import run_side_by_side
    from irm.implicit.logratio import response_logprobs

    prompts = [s["prompt"] for s in samples] * 2
    responses = [s["base"] for s in samples] + [s["tuned"] for s in samples]
    keep = [i for i, r in enumerate(responses) if r.strip()]
    prompts, responses = [prompts[i] for i in keep], [responses[i] for i in keep]
    uniq = sorted(set(prompts))
    gid = {p: i for i, p in enumerate(uniq)}
    group = np.array([gid[p] for p in prompts])
    test_groups = {gid[p] for p in uniq if _prompt_hash(p, seed) < test_fraction}
    test = np.array([g in test_groups for g in group])
    if test.all() or not test.any():
        raise ValueError(f"The sequence-level split of {len(uniq)} prompts left one side empty; it needs more "
                         "held-out samples ([evaluation] n_prompts, [data] limit).")
    explicit = np.asarray(explicit_rm.score(prompts, responses), dtype=np.float64)
    lt, lb = run_side_by_side([lambda: response_logprobs(pair.tuned, prompts, responses, batch_size=batch_size),
                               lambda: response_logprobs(pair.base, prompts, responses, batch_size=batch_size)],
                              [pair.tuned, pair.base])
    st, sb = np.array([float(x.sum()) for x in lt]), np.array([float(x.sum()) for x in lb])
    with tempfile.TemporaryDirectory(prefix="irm-seq-") as tmp:
        store = capture_activations({"base": pair.base, "tuned": pair.tuned}, records_from_pairs(prompts, responses),
                                    Path(tmp) / "store", hooks=hooks, positions="response_mean", batch_size=batch_size,
                                    shard_size=4096, max_length=max_length, dataset={"source": "irm sequences"},
                                    share_prefix=True)
        feats = {}
        for h in hooks:
            t, b = store.load("tuned", h).double().numpy(), store.load("base", h).double().numpy()
            feats[h] = {"tuned": t, "base": b, "diff": t - b}
    return SequenceData(prompts, responses, group, test, explicit, beta * (st - sb), sb, feats)


def _pair_accuracy(y: np.ndarray, p: np.ndarray, group: np.ndarray) -> tuple[float, int, int]:
    """Share of prompts (with two responses) whose order the prediction gets the same way as ``y``;
    pairs ``y`` ties are left out, a tie of ``p`` counts as half."""
    agree, n, ties = 0.0, 0, 0
    for g in np.unique(group):
        idx = np.nonzero(group == g)[0]
        if len(idx) != 2:
            continue
        dy, dp = np.sign(y[idx[1]] - y[idx[0]]), np.sign(p[idx[1]] - p[idx[0]])
        if dy == 0:
            continue
        n += 1
        if dp == 0:
            ties += 1
            agree += 0.5
        elif dp == dy:
            agree += 1
    return (agree / n if n else float("nan")), n, ties


def pair_scores(y: np.ndarray, p: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of ``np.unique(group)``: (groups, counted, score): a group counts when it holds two
    responses that ``y`` orders; its score is 1 (``p`` agrees), 0.5 (``p`` ties) or 0."""
    gs, inverse, sizes = np.unique(group, return_inverse=True, return_counts=True)
    counted, score = np.zeros(len(gs)), np.zeros(len(gs))
    first = np.full(len(gs), -1)
    for i, k in enumerate(inverse):  # the first and second row of each group, in row order
        if sizes[k] != 2:
            continue
        if first[k] < 0:
            first[k] = i
            continue
        dy, dp = np.sign(y[i] - y[first[k]]), np.sign(p[i] - p[first[k]])
        if dy != 0:
            counted[k] = 1.0
            score[k] = 0.5 if dp == 0 else float(dp == dy)
    return gs, counted, score


def _by_prompt_ci(y: np.ndarray, p: np.ndarray, group: np.ndarray, *, n_boot: int, seed: int) -> dict[str, Any]:
    """Pairwise accuracy (:func:`_pair_accuracy`) and a bootstrap CI resampling prompts (both responses
    of a prompt go together). A resample is a multiset of prompts, so all resamples are one matrix
    product of the prompts' multiplicities with their scores."""
    rng = np.random.default_rng(seed)
    gs, counted, score = pair_scores(y, p, group)
    value = _pair_accuracy(y, p, group)[0]
    n = len(gs)
    # One [n_boot, n] draw consumes the generator as n_boot draws of n (the same resamples as a loop).
    pick = rng.choice(n, size=(n_boot, n), replace=True)
    mult = np.bincount((np.arange(n_boot)[:, None] * n + pick).ravel(), minlength=n_boot * n).reshape(n_boot, n)
    den = mult @ counted
    num = mult @ (counted * score)
    vals = num[den > 0] / den[den > 0]
    low, high = (np.quantile(vals, [0.025, 0.975]) if len(vals) else (np.nan, np.nan))
    return {"value": float(value), "low": float(low), "high": float(high), "n": int(n)}


def _metrics(y, p, group, *, n_boot, seed) -> dict[str, Any]:
    if np.ptp(p) == 0:
        nan = {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": int(len(np.unique(group)))}
        return {"kendall_tau": nan, "pairwise_accuracy": nan, "n_pairs": 0, "n_ties": 0}
    acc, n_pairs, ties = _pair_accuracy(y, p, group)
    return {
        "kendall_tau": bootstrap_ci(kendall_tau, y, p, n_boot=n_boot, seed=seed).to_dict(),
        "pairwise_accuracy": _by_prompt_ci(y, p, group, n_boot=n_boot, seed=seed),
        "n_pairs": n_pairs, "n_ties": ties,
    }


def compare_sequences(data: SequenceData, *, feature_sets: Sequence[str] = ("tuned", "base", "diff"),
                      n_boot: int = 1000, seed: int = 0, folds: int = 5) -> dict[str, Any]:
    """Every source's test-text comparison with the explicit RM, and the headline rows."""
    fit, test = ~data.test, data.test
    y_test, g_test = data.explicit[test], data.group[test]
    # Centred within each prompt: the tuned-vs-base contrast of the prompt's two responses.
    contrast = data.logratio.copy()
    for g in np.unique(data.group):
        idx = data.group == g
        contrast[idx] -= contrast[idx].mean()
    base_pref = data.logp_base - data.logp_base[fit].mean()
    sources: list[dict[str, Any]] = []

    def add(name, kind, pred_all, *, features=None, hook=None, supervised=False, cv=None):
        cv_tau = float(kendall_tau(cv[0], cv[1])) if cv is not None and np.ptp(cv[1]) > 0 else None
        sources.append({"name": name, "kind": kind, "features": features, "hook": hook, "supervised": supervised,
                        "cv_tau_fit": cv_tau, **_metrics(y_test, pred_all[test], g_test, n_boot=n_boot, seed=seed)})

    add("logratio", "logratio", data.logratio)
    add("control:logprob", "control", base_pref)
    rng = np.random.default_rng(seed)
    fit_idx = np.nonzero(fit)[0]
    fold = rng.permutation(len(fit_idx)) % folds
    for hook, fs in data.feats.items():
        targets = {"probe:logratio": (data.logratio, False), "probe:contrast": (contrast, False),
                   "ceiling": (data.explicit, True)}
        for fname in sorted(set(feature_sets) | {"base"}):
            X = fs[fname]
            cols = list(targets.items()) if fname in feature_sets else []
            Y = np.stack([t for _, (t, _) in cols] + ([base_pref] if fname == "base" else []), 1)
            pred = RidgeProbe(alpha="auto").fit(X[fit], Y[fit]).predict(X)
            cvp = np.empty((len(fit_idx), Y.shape[1]))
            for k in range(folds):
                tr, te = fit_idx[fold != k], fit_idx[fold == k]
                cvp[fold == k] = RidgeProbe(alpha="auto").fit(X[tr], Y[tr]).predict(X[te])
            for j, (kind, (t, sup)) in enumerate(cols):
                add(f"{kind}/{fname}/{hook}", kind, pred[:, j], features=fname, hook=hook, supervised=sup,
                    cv=(t[fit], cvp[:, j]))
            if fname == "base":
                add(f"control:probe/base/{hook}", "control", pred[:, -1], features="base", hook=hook,
                    cv=(base_pref[fit], cvp[:, -1]))

    def best(kinds):
        c = [s for s in sources if s["kind"] in kinds and s["cv_tau_fit"] is not None]
        # Probes are chosen by how well they fit their own target out of fold on the fit texts (never by the
        # explicit RM); the direct sources, which fit nothing, only by name.
        return max(c, key=lambda s: s["cv_tau_fit"]) if c else None

    unsup = best(("probe:logratio", "probe:contrast"))
    direct = next(s for s in sources if s["name"] == "logratio")
    ceiling = max((s for s in sources if s["kind"] == "ceiling"),
                  key=lambda s: s["cv_tau_fit"] if s["cv_tau_fit"] is not None else -9, default=None)
    control = max((s for s in sources if s["kind"] == "control"),
                  key=lambda s: np.nan_to_num(s["pairwise_accuracy"]["value"], nan=-9))
    return {
        "n_texts": int(len(data.explicit)), "n_test_texts": int(test.sum()),
        "n_test_prompts": int(len(np.unique(g_test))),
        "summary": {"linear_irm": unsup, "logratio_direct": direct, "ceiling": ceiling, "control": control},
        "sources": sources,
        "definitions": {
            "linear_irm": "the probe on response activations (targets from the pair alone) with the highest 5-fold "
                          "CV tau against its own target on the fit texts",
            "pairwise_accuracy": "share of test prompts whose base vs tuned response the source orders as the "
                                 "explicit RM does (explicit ties left out, source ties count 1/2); CI resamples prompts",
            "control": "the best of the untuned base's own preference and probes on base activations fitted to it "
                       "(chosen by test accuracy, so an upper bound for the control)"},
    }
