"""Scored explanations: how well does a feature's explanation let an LLM predict where the feature fires?

The method of EleutherAI's delphi ("Automatically interpreting millions of features in LLMs", Paulo et
al. 2024) and SAEBench, per snippet (one short prompt per snippet, so a small model can answer and
token probabilities can be read):

- **Detection**: the LLM sees only the explanation and one held-out snippet (no marks) and says whether
  the feature fires somewhere in it. Positives are windows around the top token of held-out texts on
  which the feature fires, drawn evenly from ``n_quantiles`` equal-count bins of those texts' peak
  activation (bin 0: weakest, so weak activations count too); negatives are windows at random positions
  of texts on which the feature never fires.
- **Fuzzing**: the LLM sees the explanation and a held-out activating snippet with some tokens marked
  ``<<like this>>`` and says whether the marked tokens are the ones the feature fires on. Positives mark
  the truly active tokens; negatives are the same snippets with as many tokens marked among the inactive
  ones, at random: token-level precision, which detection does not test.

"Held-out": the texts whose snippets the explanation was written from are excluded. Both tasks are
balanced (as many negatives as positives), so balanced accuracy equals accuracy and its 95% interval is
the Wilson interval of ``correct / n``.

**Answers**: with token probabilities (``mode`` ``logprobs``, or ``auto`` where the LLM exposes them)
a snippet's score is the log-odds of "1" over "0" as the reply's first token and the prediction is that
score minus the log-odds of a content-free prompt (explanation and text "N/A") > 0 (contextual
calibration, as for the calibrated labels). Without them (``generate``) the reply is parsed as 0/1; a
reply that does not parse counts as a wrong prediction (never a default label) and as score 0.5 for
AUROC. AUROC (ties count half) gets a 95% stratified-bootstrap interval; with a handful of snippets it is
wide, and a perfect separation gives [1, 1] (the bootstrap cannot see beyond the sample).

An explanation is **above chance** when the detection balanced accuracy's lower 95% bound exceeds 0.5;
only those features' reward-relevance labels count in the IRM checks.

>>> sets = scoring_snippets(table, acts[:, j], eligible=eligible, exclude_texts=top_texts, n=4, seed=0)
>>> res = score_explanations(llm, [(key, explanation, sets)], plog=ParseLog())
>>> res["features"][key]["detection"]["balanced_accuracy"]   # {"value", "low", "high", "n"}
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from irm.features.autointerp import MARK_CLOSE, MARK_OPEN, TokenTable, wilson_interval

__all__ = [
    "METHODS",
    "ScoreSnippet",
    "ScoringSets",
    "scoring_snippets",
    "detection_messages",
    "fuzzing_messages",
    "auroc",
    "bootstrap_auroc",
    "method_metrics",
    "score_explanations",
]

METHODS = ("detection", "fuzzing")
CHOICES = ("1", "0")
_SYSTEM = "You check explanations of what features of a language model detect. Answer with 1 or 0 only."


@dataclass
class ScoreSnippet:
    """One held-out snippet shown to the judge: ``label`` 1 = the feature fires there (detection) / the
    marks are the active tokens (fuzzing); ``bin`` the activation-quantile bin of its text (None for
    non-activating texts); ``text``/``pos`` where it comes from."""

    snippet: str
    label: int
    text: int
    pos: int
    bin: int | None = None


@dataclass
class ScoringSets:
    """The held-out snippets of one feature for each method, and how many texts were available."""

    detection: list[ScoreSnippet] = field(default_factory=list)
    fuzzing: list[ScoreSnippet] = field(default_factory=list)
    n_active_texts: int = 0
    n_inactive_texts: int = 0
    bin_edges: list[float] = field(default_factory=list)

    def get(self, method: str) -> list[ScoreSnippet]:
        return getattr(self, method)


def _rng(seed: int, *parts: Any) -> np.random.Generator:
    h = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).hexdigest()[:16]
    return np.random.default_rng(int(h, 16))


def _window(table: TokenTable, text: int, pos: int, left: int, right: int) -> list[int]:
    """The token positions :meth:`TokenTable.snippet` shows (real tokens only)."""
    offs = table.offsets[text]
    lo, hi = max(0, pos - left), min(len(offs), pos + right + 1)
    return [i for i in range(lo, hi) if offs[i][1] > offs[i][0]]


def scoring_snippets(
    table: TokenTable,
    activations: np.ndarray,
    *,
    eligible: np.ndarray,
    exclude_texts: Sequence[int] = (),
    n: int = 4,
    n_quantiles: int = 4,
    left: int = 8,
    right: int = 3,
    seed: int = 0,
    key: str = "",
) -> ScoringSets:
    """Held-out detection and fuzzing snippets of one feature (``activations``: ``[rows]``, its activation
    at each store row; ``eligible``: ``[rows]`` bool, rows that may be shown or counted).

    Up to ``n`` positives per method, drawn round-robin from ``n_quantiles`` equal-count bins of the
    active texts' peak activation (texts in ``exclude_texts``, those the explanation was written from, are
    never used), and as many negatives. Deterministic in ``(seed, key)``.
    """
    a = np.asarray(activations, dtype=np.float64)
    elig = np.asarray(eligible, dtype=bool)
    if a.shape != elig.shape or a.ndim != 1:
        raise ValueError(f"activations {a.shape} and eligible {elig.shape} must be the same 1-d shape.")
    if n < 1 or n_quantiles < 1:
        raise ValueError(f"n and n_quantiles must be >= 1, got {n} and {n_quantiles}.")
    rng = _rng(seed, "score", key)
    n_texts = len(table.texts)
    excluded = set(int(t) for t in exclude_texts)
    peak = np.full(n_texts, -np.inf)
    peak_pos = np.zeros(n_texts, dtype=np.int64)
    has_elig = np.zeros(n_texts, dtype=bool)
    for t in range(n_texts):
        s, e = int(table.starts[t]), int(table.starts[t + 1])
        m = elig[s:e]
        if not m.any():
            continue
        has_elig[t] = True
        vals = np.where(m, a[s:e], -np.inf)
        p = int(np.argmax(vals))
        peak[t], peak_pos[t] = vals[p], p
    active = [t for t in range(n_texts) if has_elig[t] and peak[t] > 0 and t not in excluded]
    inactive = [t for t in range(n_texts) if has_elig[t] and peak[t] <= 0 and t not in excluded]
    out = ScoringSets(n_active_texts=len(active), n_inactive_texts=len(inactive))
    if not active:
        return out
    # Equal-count bins of peak activation, weakest first; positives drawn round-robin across bins.
    order = sorted(active, key=lambda t: (peak[t], t))
    bins = [list(b) for b in np.array_split(np.asarray(order), min(n_quantiles, len(order)))]
    out.bin_edges = [float(peak[b[0]]) for b in bins] + [float(peak[order[-1]])]
    pools = [list(rng.permutation(b)) for b in bins]
    picked: list[tuple[int, int]] = []  # (text, bin)
    while len(picked) < n and any(pools):
        for bi, pool in enumerate(pools):
            if pool and len(picked) < n:
                picked.append((int(pool.pop()), bi))
    neg_texts = [int(t) for t in rng.permutation(inactive)[: len(picked)]]

    pos_det, pos_fuzz, neg_fuzz = [], [], []
    for t, bi in picked:
        p = int(peak_pos[t])
        s, e = int(table.starts[t]), int(table.starts[t + 1])
        act = (a[s:e] > 0) & elig[s:e]
        plain = np.zeros(e - s, dtype=bool)
        pos_det.append(ScoreSnippet(table.snippet(t, p, plain, left=left, right=right), 1, t, p, bi))
        pos_fuzz.append(ScoreSnippet(table.snippet(t, p, act, left=left, right=right), 1, t, p, bi))
        win = _window(table, t, p, left, right)
        on = [i for i in win if act[i]]
        off = [i for i in win if not act[i] and elig[s + i]]
        if on and off:
            wrong = np.zeros(e - s, dtype=bool)
            wrong[rng.choice(off, size=min(len(on), len(off)), replace=False)] = True
            neg_fuzz.append(ScoreSnippet(table.snippet(t, p, wrong, left=left, right=right), 0, t, p, bi))
    neg_det = []
    for t in neg_texts:
        s, e = int(table.starts[t]), int(table.starts[t + 1])
        cand = np.flatnonzero(elig[s:e])
        p = int(rng.choice(cand))
        neg_det.append(ScoreSnippet(table.snippet(t, p, np.zeros(e - s, dtype=bool), left=left, right=right),
                                    0, t, p, None))
    # Balanced sets: as many negatives as positives (detection is limited by inactive texts, fuzzing by
    # windows that have inactive tokens to mark).
    k = min(len(pos_det), len(neg_det))
    out.detection = _interleave(pos_det[:k], neg_det[:k], rng)
    fz_neg = {(s.text, s.pos) for s in neg_fuzz}
    pos_fuzz = [s for s in pos_fuzz if (s.text, s.pos) in fz_neg]
    out.fuzzing = _interleave(pos_fuzz, neg_fuzz, rng)
    return out


def _interleave(pos: list[ScoreSnippet], neg: list[ScoreSnippet], rng: np.random.Generator) -> list[ScoreSnippet]:
    both = pos + neg
    return [both[i] for i in rng.permutation(len(both))]


# ----------------------------------------------------------------------------------------------
def _detection_question(explanation: str, snippet: str) -> str:
    return ("Does the feature fire on some word of the text? Reply 1 if the text contains what the explanation "
            f"describes, 0 if not.\n\nExplanation: \"{explanation}\"\nText: {snippet}")


def _fuzzing_question(explanation: str, snippet: str) -> str:
    return (f"Are the marked words ({MARK_OPEN}like this{MARK_CLOSE}) what the feature fires on? Reply 1 if the "
            f"marked words are what the explanation describes, 0 if not.\n\nExplanation: \"{explanation}\"\n"
            f"Text: {snippet}")


# Worked examples shown first (few_shot): small chat models answer in prose without them. They sit in
# the prompts' shared prefix, which a local LLM computes once per call.
_SHOTS = {
    "detection": [('The word "rain".', "we stayed in because of the rain all day", "1"),
                  ('The word "rain".', "the train left the station on time", "0")],
    "fuzzing": [("Names of colours.", f"she wore a {MARK_OPEN}red{MARK_CLOSE} coat", "1"),
                ("Names of colours.", f"she {MARK_OPEN}wore{MARK_CLOSE} a red coat", "0")],
}
_QUESTIONS = {"detection": _detection_question, "fuzzing": _fuzzing_question}


def _messages(method: str, explanation: str, snippet: str, few_shot: bool) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": _SYSTEM}]
    for expl, text, answer in _SHOTS[method] if few_shot else []:
        msgs += [{"role": "user", "content": _QUESTIONS[method](expl, text)}, {"role": "assistant", "content": answer}]
    return msgs + [{"role": "user", "content": _QUESTIONS[method](explanation, snippet)}]


def detection_messages(explanation: str, snippet: str, *, few_shot: bool = True) -> list[dict[str, str]]:
    """Ask whether the feature, as explained, fires somewhere in ``snippet`` (no marks): reply 1 or 0."""
    return _messages("detection", explanation, snippet, few_shot)


def fuzzing_messages(explanation: str, snippet: str, *, few_shot: bool = True) -> list[dict[str, str]]:
    """Ask whether the tokens marked ``<<like this>>`` in ``snippet`` are what the feature, as explained,
    fires on: reply 1 or 0."""
    return _messages("fuzzing", explanation, snippet, few_shot)


_MESSAGES = {"detection": detection_messages, "fuzzing": fuzzing_messages}


# ----------------------------------------------------------------------------------------------
def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney; ties count half); None without both classes."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def bootstrap_auroc(labels: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of AUROC from a stratified bootstrap (positives and negatives resampled apart)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None, None
    if n_boot < 1:
        return None, None
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    bp = pos[rng.integers(0, len(pos), (n_boot, len(pos)))]
    bn = neg[rng.integers(0, len(neg), (n_boot, len(neg)))]
    # Mann-Whitney through ranks (ties get average ranks, i.e. count half), O(n log n) per resample.
    ranks = rankdata(np.concatenate([bp, bn], axis=1), axis=1)
    vals = (ranks[:, :len(pos)].sum(1) - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def method_metrics(labels: Sequence[int], correct: Sequence[bool], scores: Sequence[float],
                   bins: Sequence[int | None] = (), *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Balanced accuracy (Wilson 95%; the sets are balanced, so it is the accuracy), AUROC (stratified
    bootstrap 95%), true-positive and true-negative rates, and the recall per activation bin."""
    y = np.asarray(labels, dtype=int)
    c = np.asarray(correct, dtype=bool)
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    out: dict[str, Any] = {"n_pos": n1, "n_neg": n0}
    if n1 == 0 or n0 == 0:
        out["note"] = f"needs positive and negative snippets, got {n1} and {n0}"
        out["balanced_accuracy"] = {"value": None, "low": None, "high": None, "n": n1 + n0}
        out["auroc"] = {"value": None, "low": None, "high": None}
        return out
    tpr, tnr = float(c[y == 1].mean()), float(c[y == 0].mean())
    ba = (tpr + tnr) / 2
    if n1 == n0:
        lo, hi = wilson_interval(int(c.sum()), len(c))
    else:  # not produced by scoring_snippets; a conservative interval: the mean of the class-wise bounds
        (l1, h1), (l0, h0) = wilson_interval(int(c[y == 1].sum()), n1), wilson_interval(int(c[y == 0].sum()), n0)
        lo, hi = (l1 + l0) / 2, (h1 + h0) / 2
    a = auroc(y == 1, np.asarray(scores, dtype=np.float64))
    alo, ahi = bootstrap_auroc(y == 1, np.asarray(scores, dtype=np.float64), n_boot=n_boot, seed=seed)
    out.update(tpr=tpr, tnr=tnr, balanced_accuracy={"value": ba, "low": lo, "high": hi, "n": n1 + n0},
               auroc={"value": a, "low": alo, "high": ahi})
    if len(bins):
        by: dict[str, dict[str, Any]] = {}
        for b in sorted({int(b) for b, lab in zip(bins, y, strict=True) if b is not None and lab == 1}):
            m = np.array([bb == b and lab == 1 for bb, lab in zip(bins, y, strict=True)])
            by[str(b)] = {"n": int(m.sum()), "recall": float(c[m].mean())}
        out["recall_by_bin"] = by
    return out


def score_explanations(
    llm: Any,
    items: Sequence[tuple[str, str, ScoringSets]],
    *,
    plog: Any,
    methods: Sequence[str] = METHODS,
    mode: str = "auto",
    few_shot: bool = True,
    max_tokens: int = 1,
    seed: int = 0,
    n_boot: int = 1000,
    chunk: int = 128,
) -> dict[str, Any]:
    """Score explanations: ``items`` are ``(feature key, explanation, ScoringSets)``.

    Every snippet's prompt is answered (``max_tokens`` greedy tokens, parsed as 0/1). ``mode``:
    ``logprobs`` also reads the log-odds of "1" over "0" (required), ``generate`` uses the written
    answers alone, ``auto`` reads log-odds where the LLM exposes token probabilities and records why not
    otherwise. With log-odds, predictions and AUROC come from them (calibrated, see the module doc) and the
    written answers' balanced accuracy is kept as ``written_balanced_accuracy``. Prompts go in batched
    calls of ``chunk`` (:func:`irm.llm.complete_many`, then :func:`irm.llm.choice_logprobs`, which a local
    LLM answers from the generation's first step at no extra cost), through the LLM's reply cache when it
    has one.

    Returns ``{"mode", "features": {key: {method: metrics, "above_chance": bool|None}}, "overall":
    {method: pooled metrics}, "n_prompts", "verdict", "logprobs_unavailable"?}``; per-snippet answers are
    under ``features[key][method]["snippets"]``.
    """
    from irm.llm import LLMError, choice_logprobs, complete_many, parse_reply

    if mode not in ("auto", "logprobs", "generate"):
        raise ValueError(f"mode must be 'auto', 'logprobs' or 'generate', got {mode!r}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods {list(methods)} must be a non-empty subset of {METHODS}")
    items = [(k, e, s) for k, e, s in items if e]
    if len({k for k, _, _ in items}) != len(items):
        raise ValueError("feature keys of the items must be distinct")
    info: dict[str, Any] = {"mode": mode, "methods": list(methods), "few_shot": few_shot, "features": {},
                            "n_prompts": 0}
    prompts: dict[str, list[list[dict[str, str]]]] = {}
    where: dict[str, list[tuple[str, int]]] = {}
    for m in methods:
        prompts[m], where[m] = [], []
        for key, expl, sets in items:
            for i, sn in enumerate(sets.get(m)):
                prompts[m].append(_MESSAGES[m](expl, sn.snippet, few_shot=few_shot))
                where[m].append((key, i))
    use_lp = mode != "generate"
    written: dict[str, list[int | None]] = {}
    odds: dict[str, np.ndarray] = {}
    for m in methods:
        null = _MESSAGES[m]("N/A", "N/A", few_shot=few_shot)
        written[m], lo = [], []
        if use_lp and prompts[m]:
            try:
                lo.append(choice_logprobs(llm, [null], list(CHOICES)))
                info["n_prompts"] += 1
            except (LLMError, ValueError) as e:
                if mode == "logprobs":
                    raise
                info["logprobs_unavailable"] = (f"{e} The written 1/0 answers are scored instead (AUROC from "
                                                "0/1 answers equals their balanced accuracy).")
                use_lp = False
        # Calls of ``chunk`` prompts across features: a local LLM computes their shared start (instructions,
        # worked examples) once per call and checks it against a plain pass once per call; a call per feature
        # pays that for 8 short tails (one contended measurement: over 14 min against 2.3 min for 48 features).
        for c0 in range(0, len(prompts[m]), chunk):
            part_idx = list(range(c0, min(c0 + chunk, len(prompts[m]))))
            part = [prompts[m][j] for j in part_idx]
            replies = complete_many(llm, part, max_tokens=max_tokens, temperature=0.0, seed=seed)
            info["n_prompts"] += len(part)
            for j, reply in zip(part_idx, replies, strict=True):
                parsed = plog.record(parse_reply(reply, "label01"), feature=where[m][j][0], step=f"score_{m}")
                written[m].append(int(parsed.value) if parsed.ok else None)
            if use_lp:
                lo.append(choice_logprobs(llm, part, list(CHOICES)))
        if use_lp and prompts[m]:
            lp = np.concatenate(lo)
            o = lp[:, 0] - lp[:, 1]
            info.setdefault("content_free_log_odds", {})[m] = float(o[0])
            odds[m] = o[1:] - o[0]
    used = "logprobs" if use_lp else "generate"
    preds: dict[str, list[int | None]] = {}
    scores: dict[str, np.ndarray] = {}
    for m in methods:
        if used == "logprobs" and m in odds:
            scores[m] = odds[m]
            preds[m] = [int(x > 0) for x in odds[m]]
        else:
            preds[m] = written[m]
            scores[m] = np.asarray([0.5 if v is None else float(v) for v in written[m]])
    info["mode"] = used
    pooled: dict[str, dict[str, list]] = {m: {"y": [], "c": [], "s": [], "b": []} for m in methods}
    for key, _expl, sets in items:
        res: dict[str, Any] = {}
        for m in methods:
            idx = [j for j, (k, _) in enumerate(where[m]) if k == key]
            snips = sets.get(m)
            y = [s.label for s in snips]
            p = [preds[m][j] for j in idx]
            s = [float(scores[m][j]) for j in idx]
            c = [pp is not None and pp == yy for pp, yy in zip(p, y, strict=True)]
            r = method_metrics(y, c, s, [sn.bin for sn in snips], n_boot=n_boot, seed=seed)
            w = [written[m][j] for j in idx]
            r["n_unparsed"] = sum(ww is None for ww in w)
            if used == "logprobs":
                wc = [ww is not None and ww == yy for ww, yy in zip(w, y, strict=True)]
                r["written_balanced_accuracy"] = method_metrics(y, wc, [0.5 if ww is None else ww for ww in w],
                                                                n_boot=0)["balanced_accuracy"]
            r["snippets"] = [asdict(sn) | {"prediction": pp, "score": ss, "written": ww}
                             for sn, pp, ss, ww in zip(snips, p, s, w, strict=True)]
            res[m] = r
            for name, vals in (("y", y), ("c", c), ("s", s), ("b", [sn.bin for sn in snips])):
                pooled[m][name] += vals
        det = res.get("detection", {}).get("balanced_accuracy", {})
        res["above_chance"] = None if det.get("low") is None else bool(det["low"] > 0.5)
        res["n_active_texts"], res["n_inactive_texts"] = sets.n_active_texts, sets.n_inactive_texts
        res["bin_edges"] = sets.bin_edges
        info["features"][key] = res
    info["overall"] = {}
    for m in methods:
        # Pooled over features: the balanced accuracy is exact (every feature's set is balanced); the pooled
        # AUROC ranks snippets of different features against each other, a judge-wide threshold.
        r = method_metrics(pooled[m]["y"], pooled[m]["c"], pooled[m]["s"], pooled[m]["b"], n_boot=n_boot,
                           seed=seed)
        info["overall"][m] = r
    scored = [v for v in info["features"].values() if v["above_chance"] is not None]
    info["n_scored"] = len(scored)
    info["n_above_chance"] = sum(v["above_chance"] for v in scored)
    ov = info["overall"].get("detection", {}).get("balanced_accuracy", {})
    info["llm_above_chance"] = None if ov.get("low") is None else bool(ov["low"] > 0.5)
    info["verdict"] = verdict(info)
    return info


def verdict(info: dict[str, Any]) -> str:
    """One plain sentence on whether the labelling LLM's explanations beat chance."""
    ov = info.get("overall", {}).get("detection", {}).get("balanced_accuracy", {})
    if ov.get("value") is None:
        return "No explanation could be scored (no held-out activating and non-activating snippets)."
    head = (f"Detection balanced accuracy over all scored snippets {ov['value']:.2f} "
            f"[{ov['low']:.2f}, {ov['high']:.2f}]; {info['n_above_chance']} of {info['n_scored']} explanations "
            "score above chance.")
    if not info.get("llm_above_chance"):
        return head + (" The labelling LLM is NO BETTER THAN CHANCE at predicting where its explained features "
                       "fire: its explanations, and the reward labels built on them, cannot be trusted.")
    return head
