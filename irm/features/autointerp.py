"""Autointerp: explain SAE features with an LLM, label them as reward-related or not, and measure how
far those labels can be trusted.

For each feature:

1. **Snippets**: its top-activating tokens (one per text), each shown in a window of its text with
   the tokens where the feature is active marked ``<<like this>>``.
2. **Explanation**: the LLM is asked what the feature detects (:func:`explanation_messages`).
3. **Classification**: the LLM is asked whether the feature is related to the reward, described in
   words (e.g. "positive or negative sentiment"): ``1`` or ``0``, plus which attribute
   (:func:`classification_messages`, replies like ``1 | positive sentiment``).

A reply that does not parse is counted and kept with an excerpt in an :class:`~irm.llm.ParseLog`;
the feature's label is then ``None`` (unknown), never a default 0 or 1.

**Ground truth** for a lexicon RM: a feature's *relevance* is the share of its top-activating tokens
whose word carries lexicon utility (:func:`lexicon_relevance`); it is *relevant* when that share is
at least a threshold. :func:`precision_recall` scores the LLM's labels against it, with Wilson
intervals, so users see how far a given LLM's labels can be trusted.

>>> table = TokenTable.from_texts(tokenizer, texts, max_length=48).check(store.index())
>>> recs = [FeatureRecord("tuned", hook, j, snippets=feature_snippets(table, acts, j, ...)) for j in ids]
>>> explain_and_classify(llm, recs, "positive or negative sentiment", plog=ParseLog())
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "MARK_OPEN",
    "MARK_CLOSE",
    "TokenTable",
    "FeatureRecord",
    "top_rows",
    "feature_snippets",
    "explanation_messages",
    "classification_messages",
    "parse_classification",
    "explain_and_classify",
    "lexicon_relevance",
    "wilson_interval",
    "precision_recall",
]

MARK_OPEN, MARK_CLOSE = "<<", ">>"


# ----------------------------------------------------------------------------------------------
@dataclass
class TokenTable:
    """The store's texts tokenised as the capture did, so store rows map back to characters.

    ``starts[t]`` is the store row of text ``t``'s first token (rows of one text are contiguous, in
    position order, as :func:`irm.activations.capture.capture_activations` writes them with ``positions="all"``).
    """

    texts: list[str]
    token_ids: list[np.ndarray]
    offsets: list[np.ndarray]  # per text [n_tokens, 2] character spans ((0, 0) for special tokens)
    starts: np.ndarray  # [n_texts + 1] row offsets

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], *, max_length: int) -> TokenTable:
        enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length,
                        return_offsets_mapping=True)
        ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
        offs = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in enc["offset_mapping"]]
        starts = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
        return cls(list(texts), ids, offs, starts)

    def check(self, index: dict[str, np.ndarray]) -> TokenTable:
        """Fail unless the store's ``index`` (text, pos, token per row) is exactly this tokenisation."""
        n = int(self.starts[-1])
        if len(index["token"]) != n:
            raise ValueError(f"The store has {len(index['token'])} rows but the texts tokenise to {n} tokens; "
                             "was it captured with positions='all', the same texts, tokenizer and max_length?")
        expect = np.concatenate(self.token_ids) if self.token_ids else np.zeros(0, np.int64)
        if not np.array_equal(index["token"], expect):
            bad = int(np.flatnonzero(index["token"] != expect)[0])
            raise ValueError(f"Store row {bad} holds token {index['token'][bad]} but the texts give {expect[bad]}: "
                             "the store was captured from other texts or with another tokenizer.")
        return self

    def row(self, text: int, pos: int) -> int:
        return int(self.starts[text] + pos)

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(text, pos) of store rows."""
        text = np.searchsorted(self.starts, rows, side="right") - 1
        return text, rows - self.starts[text]

    def word_at(self, text: int, pos: int) -> str:
        """The whitespace-delimited word that holds token ``pos`` of ``text`` ('' for special tokens)."""
        s, e = (int(v) for v in self.offsets[text][pos])
        if e <= s:
            return ""
        t = self.texts[text]
        # A BPE token's span may start with the space before its word (" love"): skip it, or the
        # walk back below would run into the previous word.
        while s < e and t[s].isspace():
            s += 1
        if s == e:
            return ""
        while s > 0 and not t[s - 1].isspace():
            s -= 1
        while e < len(t) and not t[e].isspace():
            e += 1
        return t[s:e].strip()

    def snippet(self, text: int, pos: int, active: np.ndarray, *, left: int = 8, right: int = 4) -> str:
        """Text ``text`` around token ``pos`` (``left`` tokens before, ``right`` after), with the tokens
        flagged in ``active`` (``[n_tokens]`` bool) wrapped in ``<<``/``>>`` (adjacent ones merged)."""
        offs = self.offsets[text]
        t = self.texts[text]
        lo, hi = max(0, pos - left), min(len(offs), pos + right + 1)
        real = [i for i in range(lo, hi) if offs[i][1] > offs[i][0]]
        if not real:
            return ""
        out, cursor, i = [], int(offs[real[0]][0]), 0
        start_char = cursor
        while i < len(real):
            j = real[i]
            if active[j]:
                k = i
                while k + 1 < len(real) and active[real[k + 1]]:
                    k += 1
                s, e = int(offs[j][0]), int(offs[real[k]][1])
                # The marker goes around the word characters, not a leading space of a BPE token.
                while s < e and t[s].isspace():
                    s += 1
                out.append(t[cursor:s] + MARK_OPEN + t[s:e] + MARK_CLOSE)
                cursor, i = e, k + 1
            else:
                i += 1
        out.append(t[cursor:int(offs[real[-1]][1])])
        prefix = "..." if start_char > 0 else ""
        suffix = "..." if int(offs[real[-1]][1]) < len(t.rstrip()) else ""
        return (prefix + "".join(out) + suffix).replace("\n", " ").strip()


@dataclass
class FeatureRecord:
    """One feature through the autointerp pipeline (``label``: 1 related, 0 not, None unknown)."""

    role: str
    hook: str
    feature: int
    selection: str = "random"  # how it was picked: "aligned" (large IRM weight) or "random"
    irm_weight: float | None = None  # cosine of its decoder direction with the IRM direction
    firing_rate: float | None = None
    max_activation: float | None = None
    snippets: list[str] = field(default_factory=list)
    top_words: list[str] = field(default_factory=list)
    relevance: float | None = None  # ground truth: share of top tokens carrying lexicon utility
    relevant: bool | None = None
    explanation: str | None = None
    label: int | None = None
    attribute: str | None = None
    label_generated: int | None = None  # the label the LLM wrote (classify_mode 'calibrated' keeps both)
    label_score: float | None = None  # calibrated log-odds of "1" over "0" (classify_mode 'calibrated')
    scores: dict[str, Any] | None = None  # the explanation's detection/fuzzing scores (irm.features.scoring)
    explanation_above_chance: bool | None = None  # detection balanced accuracy's 95% lower bound > 0.5
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.role}/{self.hook}/{self.feature}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
def top_rows(values: np.ndarray, text_of_row: np.ndarray, eligible: np.ndarray, k: int, *,
             one_per_text: bool = True) -> np.ndarray:
    """Rows with the ``k`` largest positive ``values`` among ``eligible`` ones (at most one per text)."""
    cand = np.flatnonzero(eligible & (values > 0))
    cand = cand[np.argsort(-values[cand], kind="stable")]
    if not one_per_text:
        return cand[:k]
    _, first = np.unique(text_of_row[cand], return_index=True)
    return cand[np.sort(first)][:k]


def feature_snippets(
    table: TokenTable,
    acts: Float[Tensor, "rows n_feat"] | np.ndarray,
    column: int,
    *,
    eligible: np.ndarray,
    k: int = 5,
    left: int = 8,
    right: int = 4,
) -> tuple[list[str], np.ndarray]:
    """The ``k`` top-activating snippets of feature ``column`` of ``acts`` (rows = store rows), and their rows."""
    a = acts[:, column]
    a = a.numpy() if isinstance(a, Tensor) else np.asarray(a)
    text_of_row, _ = table.locate(np.arange(len(a)))
    rows = top_rows(a, text_of_row, eligible, k)
    out = []
    for r in rows:
        t, p = table.locate(np.array([r]))
        t, p = int(t[0]), int(p[0])
        active = a[table.starts[t]:table.starts[t + 1]] > 0
        out.append(table.snippet(t, p, active, left=left, right=right))
    return out, rows


def lexicon_relevance(words: Sequence[str], utility: Callable[[str], float | None]) -> float | None:
    """Share of ``words`` (the words of a feature's top-activating tokens) that carry lexicon utility.

    ``utility``: the RM's word -> utility lookup (``TokenUtilityRM.word_utility``: None when unknown).

    >>> lexicon_relevance(["great", "the", "awful", "film"], {"great": 3.1, "awful": -2.0}.get)
    0.5
    """
    if not words:
        return None
    hits = [bool((u := utility(w)) is not None and u != 0) for w in words]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------------------------
_SYSTEM = "You are an interpretability researcher who explains what features of a language model detect."


def _numbered(snippets: Sequence[str]) -> str:
    return "\n".join(f"{i + 1}. {s}" for i, s in enumerate(snippets))


def explanation_messages(snippets: Sequence[str]) -> list[dict[str, str]]:
    """Ask what a feature detects, from its top-activating snippets."""
    return [
        {"role": "system", "content": _SYSTEM},
        {"role": "user", "content": (
            f"Here are text snippets where one feature of a language model is most active. The tokens where it "
            f"is active are marked {MARK_OPEN}like this{MARK_CLOSE}.\n\n{_numbered(snippets)}\n\n"
            "In one short sentence, what does this feature detect? Reply with the explanation only.")},
    ]


def _classification_question(explanation: str, snippets: Sequence[str], reward_description: str) -> str:
    return (f"A feature of a language model was explained as: \"{explanation}\"\n"
            f"Snippets where it is active (active tokens marked {MARK_OPEN}like this{MARK_CLOSE}):\n"
            f"{_numbered(snippets)}\n\n"
            f"Is this feature related to {reward_description}? Reply in the form `<1 or 0> | <attribute>`, where 1 "
            "means related and 0 means unrelated, and <attribute> names what the feature tracks.")


def classification_messages(explanation: str, snippets: Sequence[str], reward_description: str, *,
                            few_shot: bool = True) -> list[dict[str, str]]:
    """Ask whether a feature is related to the reward (described in words): ``1 | attribute`` or ``0 | attribute``.

    With ``few_shot``, two worked examples come first: small chat models (SmolLM2-135M) answer in prose
    ("The feature is related to ...") without them, which no parser can read as a label.
    """
    shots = [
        ("Words that praise a film.", [f"The acting was {MARK_OPEN}superb{MARK_CLOSE}",
                                       f"a {MARK_OPEN}wonderful{MARK_CLOSE} story"], "1 | praise (positive sentiment)"),
        ("Commas.", [f"After the film{MARK_OPEN},{MARK_CLOSE} I", f"Honestly{MARK_OPEN},{MARK_CLOSE} the"],
         "0 | punctuation"),
    ]
    msgs = [{"role": "system", "content": _SYSTEM}]
    for expl, snips, answer in shots if few_shot else []:
        msgs.append({"role": "user", "content": _classification_question(expl, snips, reward_description)})
        msgs.append({"role": "assistant", "content": answer})
    msgs.append({"role": "user", "content": _classification_question(explanation, snippets, reward_description)})
    return msgs


def parse_classification(text: str, *, excerpt_chars: int = 200):
    """``(ParsedReply of kind 'label01', attribute or None)`` from a reply like ``1 | positive sentiment``.

    >>> parse_classification("1 | praise words")[0].value, parse_classification("1 | praise words")[1]
    (1, 'praise words')
    >>> parse_classification("It depends.")[0].ok
    False
    """
    from irm.llm import parse_reply

    parsed = parse_reply(text, "label01", excerpt_chars=excerpt_chars)
    attribute = None
    m = re.search(r"\|\s*([^\n|]+)", text or "") or re.search(r"attribute\s*[:=]\s*([^\n]+)", text or "", re.I)
    if m:
        attribute = m.group(1).strip().strip("`'\".").strip() or None
    return parsed, attribute


def _first_sentence(text: str, max_chars: int = 240) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[:max_chars]


def explain_and_classify(
    llm: Any,
    records: Sequence[FeatureRecord],
    reward_description: str,
    *,
    plog: Any,
    explain_tokens: int = 48,
    classify_tokens: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    few_shot: bool = True,
    mode: str = "generate",
) -> dict[str, Any]:
    """Fill ``explanation``, ``label`` and ``attribute`` of each record with two LLM calls per feature.

    ``mode``: ``generate`` takes the label the LLM writes. ``calibrated`` (LLMs that expose token
    probabilities) also scores the classification prompt: the log-odds of "1" over "0" as the reply's
    first token, minus the log-odds the LLM gives a content-free feature (explanation and snippets
    "N/A"): contextual calibration (Zhao et al. 2021, "Calibrate before use"), which removes a small
    model's bias toward one answer. ``label`` is then ``score > 0``; the written label stays in
    ``label_generated``. ``auto``: calibrated where the LLM allows it, else generated. Returns what was
    done (the mode used, the content-free log-odds).

    Batched through :func:`irm.llm.complete_many`. A reply that does not parse is recorded in
    ``plog`` (an :class:`irm.llm.ParseLog`) with the feature's key and an excerpt, and added to the
    record's ``errors``; the field stays None. Records without snippets are skipped (recorded too).
    """
    from irm.llm import complete_many, parse_reply

    todo = [r for r in records if r.snippets]
    for r in records:
        if not r.snippets:
            r.errors.append("no snippets: the feature is active on no eligible token")
    gen = {"temperature": temperature, "seed": seed}
    replies = complete_many(llm, [explanation_messages(r.snippets) for r in todo], max_tokens=explain_tokens, **gen)
    explained = []
    for r, reply in zip(todo, replies, strict=True):
        parsed = plog.record(parse_reply(reply, "text"), feature=r.key, step="explain")
        if parsed.ok:
            r.explanation = _first_sentence(parsed.value)
            explained.append(r)
        else:
            r.errors.append(f"explanation did not parse ({parsed.error}): {parsed.excerpt!r}")
    replies = complete_many(llm, [classification_messages(r.explanation or "", r.snippets, reward_description,
                                                          few_shot=few_shot)
                                  for r in explained], max_tokens=classify_tokens, **gen)
    for r, reply in zip(explained, replies, strict=True):
        parsed, attribute = parse_classification(reply)
        plog.record(parsed, feature=r.key, step="classify")
        r.attribute = attribute
        if parsed.ok:
            r.label = r.label_generated = int(parsed.value)
        else:
            r.errors.append(f"label did not parse ({parsed.error}): {parsed.excerpt!r}")
    if mode not in ("generate", "calibrated", "auto"):
        raise ValueError(f"mode must be 'generate', 'calibrated' or 'auto', got {mode!r}")
    info: dict[str, Any] = {"mode": "generate" if mode == "auto" else mode}
    if mode in ("calibrated", "auto") and explained:
        from irm.llm import LLMError, choice_logprobs

        null = classification_messages("N/A", ["N/A"], reward_description, few_shot=few_shot)
        msgs = [classification_messages(r.explanation or "", r.snippets, reward_description, few_shot=few_shot)
                for r in explained]
        try:
            lp = choice_logprobs(llm, [null, *msgs], ["1", "0"])
        except (LLMError, ValueError) as e:
            if mode == "calibrated":
                raise
            info["calibration_unavailable"] = str(e)  # 'auto': the written labels stand
            return info
        info["mode"] = "calibrated"
        odds = lp[:, 0] - lp[:, 1]
        info["content_free_log_odds"] = float(odds[0])
        info["raw_log_odds_mean"] = float(odds[1:].mean())
        for r, o in zip(explained, odds[1:], strict=True):
            r.label_score = float(o - odds[0])
            r.label = int(r.label_score > 0)
    return info


# ----------------------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (nan, nan for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def precision_recall(pred: Sequence[int | None], truth: Sequence[bool | None]) -> dict[str, Any]:
    """Precision and recall of LLM labels against ground truth, over features where both are known.

    Returns counts (tp, fp, fn, tn), ``n_unknown`` (label or truth missing), and ``precision``,
    ``recall``, ``accuracy`` as ``{"value", "low", "high", "n"}`` with 95% Wilson intervals; a value is
    None where undefined (e.g. recall with no relevant feature), with ``notes`` saying why.

    >>> precision_recall([1, 1, 0, None], [True, False, True, True])["precision"]["value"]
    0.5
    """
    if len(pred) != len(truth):
        raise ValueError(f"pred has {len(pred)} labels but truth {len(truth)}.")
    pairs = [(int(p), bool(t)) for p, t in zip(pred, truth, strict=True) if p is not None and t is not None]
    tp = sum(p == 1 and t for p, t in pairs)
    fp = sum(p == 1 and not t for p, t in pairs)
    fn = sum(p == 0 and t for p, t in pairs)
    tn = sum(p == 0 and not t for p, t in pairs)
    notes = []

    def prop(k: int, n: int, what: str) -> dict[str, Any]:
        if n == 0:
            notes.append(f"{what} undefined: no features in its denominator")
            return {"value": None, "low": None, "high": None, "n": 0}
        lo, hi = wilson_interval(k, n)
        return {"value": k / n, "low": lo, "high": hi, "n": n}

    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": len(pairs), "n_unknown": len(pred) - len(pairs),
            "precision": prop(tp, tp + fp, "precision (no feature labelled 1)"),
            "recall": prop(tp, tp + fn, "recall (no relevant feature)"),
            "accuracy": prop(tp + tn, len(pairs), "accuracy"),
            "llm_positive_rate": (tp + fp) / len(pairs) if pairs else None,
            "truth_positive_rate": (tp + fn) / len(pairs) if pairs else None,
            "notes": notes}
