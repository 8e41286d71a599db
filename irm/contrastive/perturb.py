"""Perturbation generators: change one attribute of a response and record the edit.

A generator is anything with a ``name`` and
``perturb(texts, attribute, direction, *, prompts, seed) -> list[Perturbation]`` (one per text, in
order). Two ship, registered in :data:`GENERATORS`:

- ``"programmatic"`` (:class:`ProgrammaticGenerator`): the attribute's own deterministic edits
  (lexicon swaps, trimming or padding, inserted refusals, hedges, polite markers, noise); no LLM.
- ``"llm_rewrite"`` (:class:`LLMRewriteGenerator`): the two-step rewrite of the paper through any
  :class:`~irm.llm.LLMClient`: (1) ask for the words of the response related to the attribute, (2) ask
  for a rewrite of only those words towards more or less of the attribute; the rewrites are applied by
  whole-word replacement, so nothing outside the chosen words can change. The default ``"choices"``
  format constrains both replies so a small model gets them right: step 1 answers with numbers from a
  numbered list of the text's own content words (it cannot name a word that is not there), step 2
  with one replacement per chosen word (one batched call per word, a few tokens each). The
  ``"json"`` format asks for a JSON list of phrases, then a JSON mapping (fine for large models). A
  reply that does not parse gives a ``failed`` perturbation with the reason; every failed reply is
  kept in a :class:`~irm.llm.ParseLog` and listed in ``contrastive.md``.

:class:`RandomSubstitution` is the baseline: random word edits of the same size as a given
perturbation (the same numbers of substituted, inserted and deleted words), with random in-domain words.

>>> gen = ProgrammaticGenerator()
>>> [p] = gen.perturb([" was great fun."], get_attribute("sentiment"), -1, prompts=["It"], seed=0)
>>> p.text, p.status
(' was terrible tiresome.', 'ok')
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from irm.contrastive.attributes import Attribute, detect_topic, get_attribute
from irm.contrastive.textops import (
    Edit,
    EditResult,
    edit_ops,
    fix_articles,
    match_case,
    swap_words,
    word_edit_distance,
    words,
)
from irm.core.log import get_logger

log = get_logger(__name__)

__all__ = [
    "Perturbation",
    "PerturbationGenerator",
    "GENERATORS",
    "register_generator",
    "build_generator",
    "ProgrammaticGenerator",
    "LLMRewriteGenerator",
    "RandomSubstitution",
    "item_rng",
    "neutral_vocabulary",
    "NEUTRAL_WORDS_RESOURCE",
]

_STATUSES = ("ok", "not_applicable", "failed")


@dataclass(frozen=True, eq=False)
class Perturbation:
    """A perturbed response. ``status``: "ok", "not_applicable" (the edit has nothing to act on, e.g.
    no refusal to remove) or "failed" (e.g. an LLM reply that did not parse); ``reason`` says why."""

    original: str
    text: str
    attribute: str
    direction: int
    generator: str
    status: str
    edits: tuple[Edit, ...] = ()
    reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.text != self.original

    @property
    def n_word_edits(self) -> int:
        """Word-level edit distance to the original: the size the random baseline matches."""
        return word_edit_distance(self.original, self.text)

    def to_dict(self) -> dict[str, Any]:
        return {"attribute": self.attribute, "direction": self.direction, "generator": self.generator,
                "status": self.status, "reason": self.reason, "text": self.text,
                "edits": [e.to_dict() for e in self.edits], **({"meta": self.meta} if self.meta else {})}


@runtime_checkable
class PerturbationGenerator(Protocol):
    """Perturbs a batch of responses along one attribute, one :class:`Perturbation` per text."""

    name: str

    def perturb(self, texts: Sequence[str], attribute: Attribute, direction: int, *, prompts: Sequence[str],
                seed: int) -> list[Perturbation]: ...


GENERATORS: dict[str, Callable[..., PerturbationGenerator]] = {}


def register_generator(name: str) -> Callable[[Callable[..., PerturbationGenerator]], Callable[..., PerturbationGenerator]]:
    """Register a generator factory (a new generator is a new entry, not an if/elif edit)."""

    def deco(factory: Callable[..., PerturbationGenerator]) -> Callable[..., PerturbationGenerator]:
        if name in GENERATORS:
            raise ValueError(f"Generator {name!r} is registered twice.")
        GENERATORS[name] = factory
        return factory

    return deco


def build_generator(name: str, **params: Any) -> PerturbationGenerator:
    """``build_generator("programmatic")``, ``build_generator("llm_rewrite", llm=client)``."""
    if name not in GENERATORS:
        close = difflib.get_close_matches(name, GENERATORS, n=1)
        raise ValueError(f"Unknown generator {name!r}; valid generators: {sorted(GENERATORS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else "") + ".")
    return GENERATORS[name](**params)


def item_rng(seed: int, *parts: Any) -> np.random.Generator:
    """An RNG that depends only on ``seed`` and ``parts`` (e.g. attribute, direction, text), not on the
    position in a batch: the same response gets the same perturbation whatever else is explained."""
    h = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _check_direction(direction: int) -> None:
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 (more of the attribute) or -1 (less), got {direction!r}")


# ----------------------------------------------------------------------------------------------
@register_generator("programmatic")
class ProgrammaticGenerator:
    """The attribute's deterministic edits (see :mod:`irm.contrastive.attributes`); no LLM."""

    name = "programmatic"

    def perturb(self, texts: Sequence[str], attribute: Attribute | str, direction: int, *,
                prompts: Sequence[str] | None = None, seed: int = 0) -> list[Perturbation]:
        attribute = get_attribute(attribute)
        _check_direction(direction)
        prompts = list(prompts) if prompts is not None else [""] * len(texts)
        if len(prompts) != len(texts):
            raise ValueError(f"prompts ({len(prompts)}) and texts ({len(texts)}) must have one length")
        out = []
        for t, prompt in zip(texts, prompts):
            r = attribute.perturb(t, direction, item_rng(seed, self.name, attribute.name, direction, t),
                                  topic=detect_topic(f"{prompt} {t}"))
            if isinstance(r, EditResult):
                r = _agree_articles(t, r)
                out.append(Perturbation(t, r.text, attribute.name, direction, self.name, "ok", r.edits))
            else:
                out.append(Perturbation(t, t, attribute.name, direction, self.name, "not_applicable", reason=str(r)))
        return out


def _agree_articles(original: str, r: EditResult) -> EditResult:
    """``r`` with every article the edit left disagreeing with its next word fixed ("a amazing" -> "an")."""
    fixed = fix_articles(r.text, original)
    return EditResult(fixed.text, r.edits + fixed.edits) if fixed.edits else r


# ----------------------------------------------------------------------------------------------
_SYSTEM = "You are a careful text editor. You answer only with JSON, without explanations."
# One worked example per step shows small models the answer format (it is the same for every backend:
# no prefilled assistant turns, which OpenAI-compatible servers do not all support).
_EXAMPLE_TEXT = "The plot was dull, but the actors were great fun."
_EXAMPLE_SPANS = ["dull"]
_EXAMPLE_MAPPING = {"dull": "gripping"}


def _step1_prompt(text: str, name: str, description: str, hint: str) -> str:
    return (f"Attribute: {name} ({description}).\nText: \"{text.strip()}\"\n"
            f"Which words or short phrases of the text should change to make the text {hint}? "
            "Reply only with a JSON list of phrases copied exactly from the text.")


def _step2_prompt(text: str, description: str, hint: str, spans: list[str]) -> str:
    return (f"Text: \"{text.strip()}\"\nRewrite only these phrases so that the text becomes {hint} "
            f"({description}): {json.dumps(spans)}\n"
            "Reply only with a JSON object mapping each phrase to its rewrite.")


def _step1_messages(text: str, attribute: Attribute, direction: int) -> list[dict[str, str]]:
    example = _step1_prompt(_EXAMPLE_TEXT, "sentiment", "how positive the opinion is", "more positive")
    return [{"role": "system", "content": _SYSTEM},
            {"role": "user", "content": example}, {"role": "assistant", "content": json.dumps(_EXAMPLE_SPANS)},
            {"role": "user", "content": _step1_prompt(text, attribute.name, attribute.description,
                                                      attribute.hint(direction))}]


def _step2_messages(text: str, attribute: Attribute, direction: int, spans: list[str]) -> list[dict[str, str]]:
    example = _step2_prompt(_EXAMPLE_TEXT, "how positive the opinion is", "more positive", _EXAMPLE_SPANS)
    return [{"role": "system", "content": _SYSTEM},
            {"role": "user", "content": example}, {"role": "assistant", "content": json.dumps(_EXAMPLE_MAPPING)},
            {"role": "user", "content": _step2_prompt(text, attribute.description, attribute.hint(direction), spans)}]


# ---- the "choices" format: replies a small model gets right. Step 1 picks word numbers from a numbered list
# of the text's own words (a reply can only name words that are there); step 2 asks for one replacement per
# chosen word, a few words long. Both replies are short, so generation is short.
_STOPWORDS = frozenset(
    "a an the and or but nor so yet to of in on at by for with from into onto about as than that which who whom "
    "whose this these those it its is are was were be been being am has have had do does did i me my we our you "
    "your he him his she her they them their there here not no".split())
_CHOICE_SYSTEM = "You are a careful text editor. You answer as briefly as asked, without explanations."
_MAX_CHOICES = 30


def _candidates(text: str) -> list[str]:
    """The text's distinct content words, in order (at most 30): what step 1 chooses from."""
    out: dict[str, None] = {}
    for w in re.findall(r"[A-Za-z][A-Za-z'-]*", text):
        if w.lower() not in _STOPWORDS and len(w) > 1:
            out.setdefault(w, None)
    return list(out)[:_MAX_CHOICES]


def _choice_prompt(text: str, name: str, description: str, hint: str, cands: list[str], k: int) -> str:
    listing = "\n".join(f"{j}. {w}" for j, w in enumerate(cands, start=1))
    return (f"Attribute: {name} ({description}).\nText: \"{text.strip()}\"\nWords of the text:\n{listing}\n"
            f"Which of these words should change to make the text {hint}? Reply only with up to {k} numbers "
            "from the list, separated by commas.")


def _word_prompt(text: str, description: str, hint: str, word: str) -> str:
    return (f"Text: \"{text.strip()}\"\nReplace the word \"{word}\" so that the text becomes {hint} ({description}). "
            "Reply only with the replacement word or short phrase.")


def _choice_messages(text: str, attribute: Attribute, direction: int, cands: list[str], k: int) -> list[dict[str, str]]:
    ex_c = _candidates(_EXAMPLE_TEXT)
    example = _choice_prompt(_EXAMPLE_TEXT, "sentiment", "how positive the opinion is", "more positive", ex_c, k)
    return [{"role": "system", "content": _CHOICE_SYSTEM},
            {"role": "user", "content": example}, {"role": "assistant", "content": str(ex_c.index("dull") + 1)},
            {"role": "user", "content": _choice_prompt(text, attribute.name, attribute.description,
                                                       attribute.hint(direction), cands, k)}]


def _word_messages(text: str, attribute: Attribute, direction: int, word: str) -> list[dict[str, str]]:
    # One worked example. Tried (bench_llm_rewrite.py, 3 comparisons): a second example on politeness and
    # "reply with the new word, not the sentence" made SmolLM2 rewrite whole clauses more often (word
    # replies parsed 43% against 74%).
    example = _word_prompt(_EXAMPLE_TEXT, "how positive the opinion is", "more positive", "dull")
    return [{"role": "system", "content": _CHOICE_SYSTEM},
            {"role": "user", "content": example}, {"role": "assistant", "content": "gripping"},
            {"role": "user", "content": _word_prompt(text, attribute.description, attribute.hint(direction), word)}]


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _letter_prompt(text: str, name: str, description: str, hint: str, cands: list[str]) -> str:
    listing = "\n".join(f"{_LETTERS[j]}. {w}" for j, w in enumerate(cands))
    return (f"Attribute: {name} ({description}).\nText: \"{text.strip()}\"\nWords of the text:\n{listing}\n"
            f"Which word should change most to make the text {hint}? Reply only with its letter.")


def _letter_messages(text: str, attribute: Attribute, direction: int, cands: list[str]) -> list[dict[str, str]]:
    ex_c = _candidates(_EXAMPLE_TEXT)
    example = _letter_prompt(_EXAMPLE_TEXT, "sentiment", "how positive the opinion is", "more positive", ex_c)
    return [{"role": "system", "content": _CHOICE_SYSTEM},
            {"role": "user", "content": example}, {"role": "assistant", "content": _LETTERS[ex_c.index("dull")]},
            {"role": "user", "content": _letter_prompt(text, attribute.name, attribute.description,
                                                       attribute.hint(direction), cands)}]


def _pick_scored(logp: np.ndarray, cands: list[str], k: int, share: float) -> list[str]:
    """The most probable word, and up to ``k - 1`` more whose probability is at least ``share`` times its."""
    order = np.argsort(-logp, kind="stable")
    best = logp[order[0]]
    return [cands[j] for j in order[:k] if logp[j] >= best + np.log(share)]


def _parse_choices(reply: str, cands: list[str], k: int) -> tuple[list[str] | None, str | None]:
    nums = [int(x) for x in re.findall(r"(?<![\d.])\d{1,3}(?![\d.])", reply or "")]
    picked = list(dict.fromkeys(cands[n - 1] for n in nums if 1 <= n <= len(cands)))[:k]
    if picked:
        return picked, None
    return None, ("no number in the reply" if not nums else f"no number between 1 and {len(cands)} in the reply")


_WORDS_MAX = 3  # words in a constrained step-2 reply (the parser accepts up to 5 from a free one)


def _parse_word(reply: str, word: str) -> tuple[str | None, str | None]:
    line = next((ln for ln in (reply or "").strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*(?:replacement|answer|new word|rewrite)\s*:\s*", "", line, flags=re.I)
    cand = line.strip().strip("\"'`*.,;:!?()[]{} ").strip()
    if not cand:
        return None, "empty reply"
    if len(cand.split()) > 5:
        return None, "more than 5 words (expected a word or short phrase)"
    if not re.search(r"[A-Za-z]", cand):
        return None, "no word in the reply"
    if cand.lower() == word.lower():
        return None, "the replacement equals the word (nothing changed)"
    return cand, None


def _apply_mapping(text: str, mapping: dict[str, str]) -> EditResult:
    """Replace the first occurrence of each phrase (longest first, case-insensitive, non-overlapping)."""
    taken: list[tuple[int, int, str, str]] = []
    for phrase in sorted(mapping, key=len, reverse=True):
        for m in re.finditer(re.escape(phrase), text, re.I):
            if all(m.end() <= s or m.start() >= e for s, e, _, _ in taken):
                taken.append((m.start(), m.end(), m.group(0), mapping[phrase]))
                break
    taken.sort()
    out, edits, pos = [], [], 0
    for s, e, before, after in taken:
        out.append(text[pos:s])
        out.append(after)
        edits.append(Edit("replace", before, after, s))
        pos = e
    out.append(text[pos:])
    new = re.sub(r"[ \t]{2,}", " ", "".join(out))
    return EditResult(new, tuple(edits))


@register_generator("llm_rewrite")
class LLMRewriteGenerator:
    """The paper's two-step LLM rewrite through any :class:`~irm.llm.LLMClient`.

    ``max_tokens``/``temperature``/``seed`` go to every call (``seed`` is offset by the run's seed).
    Wrap the client in :class:`~irm.llm.CachedLLM` (``LLMConfig.build()`` does) so reruns are free.
    :attr:`parse_log` counts replies that parsed and failed, with excerpts of the failures.

    >>> gen = LLMRewriteGenerator(LLMConfig(model="smollm2-135m-instruct").build())
    >>> gen.perturb([" was a boring film."], get_attribute("sentiment"), +1, prompts=["It"], seed=0)
    """

    name = "llm_rewrite"

    FORMATS = ("choices", "json")

    STEP1 = ("auto", "scored", "generate")

    STEP2 = ("words", "free")

    def __init__(self, llm: Any, *, max_spans: int = 4, max_tokens: int = 96, temperature: float = 0.0,
                 seed: int = 0, format: str = "choices", step1: str = "generate", pick_share: float = 0.8,
                 step2: str = "words") -> None:
        from irm.llm import LLMClient, ParseLog

        if not isinstance(llm, LLMClient):
            raise TypeError(f"llm must be an irm.llm.LLMClient (name + complete), got {type(llm).__name__}; "
                            "build one with irm.llm.LLMConfig(...).build() or irm.llm.build_llm(kind, ...).")
        if max_spans < 1:
            raise ValueError(f"max_spans must be >= 1, got {max_spans}")
        if format not in self.FORMATS:
            raise ValueError(f"format must be one of {self.FORMATS}, got {format!r}: 'choices' (word numbers, "
                             "then one replacement per word: short replies a small model gets right) or 'json' "
                             "(a JSON list of phrases, then a JSON mapping)")
        if step1 not in self.STEP1:
            raise ValueError(f"step1 must be one of {self.STEP1}, got {step1!r}: 'scored' picks the words from the "
                             "LLM's probabilities of their letters (constrained: always a valid choice; needs a "
                             "client with choice_logprobs, e.g. kind 'local'), 'generate' parses a generated reply "
                             "of word numbers (the default: on bench_llm_rewrite.py's comparisons its rewrites were "
                             "valid more often, 75% against 70%), 'auto' scores where the client exposes probabilities")
        if step2 not in self.STEP2:
            raise ValueError(f"step2 must be one of {self.STEP2}, got {step2!r}: 'words' decodes each replacement under a "
                             "grammar (1-3 words of letters, never the original word; where the client supports it, "
                             "e.g. kind 'local', else it answers freely), 'free' generates and parses the reply as is")
        self.step2 = step2
        if not 0 < pick_share <= 1:
            raise ValueError(f"pick_share must be in (0, 1], got {pick_share}")
        if step1 == "auto":
            step1 = "scored" if callable(getattr(llm, "choice_logprobs", None)) else "generate"
        self.step1 = step1
        self.pick_share = float(pick_share)
        self.format = format
        self.llm = llm
        self.max_spans = int(max_spans)
        self.generation = {"max_tokens": int(max_tokens), "temperature": float(temperature), "seed": int(seed)}
        self.parse_log = ParseLog(max_failures=1_000_000)  # every failed reply is kept and shown in the report

    def perturb(self, texts: Sequence[str], attribute: Attribute | str, direction: int, *,
                prompts: Sequence[str] | None = None, seed: int = 0) -> list[Perturbation]:
        from irm.llm import complete_many, parse_reply

        attribute = get_attribute(attribute)
        _check_direction(direction)
        gen = dict(self.generation, seed=self.generation["seed"] + int(seed))
        texts = list(texts)
        out: list[Perturbation | None] = [None] * len(texts)

        def fail(i: int, reason: str, **meta: Any) -> None:
            out[i] = Perturbation(texts[i], texts[i], attribute.name, direction, self.name, "failed",
                                  reason=reason, meta=meta)

        if self.format == "choices":
            self._perturb_choices(texts, attribute, direction, gen, out, fail)
            return [p for p in out if p is not None]

        replies1 = complete_many(self.llm, [_step1_messages(t, attribute, direction) for t in texts], **gen)
        spans: dict[int, list[str]] = {}
        for i, r in enumerate(replies1):
            p = parse_reply(r, "spans", source=texts[i], max_spans=self.max_spans)
            self.parse_log.record(p, step="spans", attribute=attribute.name, direction=direction)
            if p.ok:
                spans[i] = p.value
            else:
                fail(i, f"step 1 (find spans): {p.error}", reply=p.excerpt)
        todo = sorted(spans)
        replies2 = complete_many(self.llm, [_step2_messages(texts[i], attribute, direction, spans[i]) for i in todo],
                                 **gen)
        for i, r in zip(todo, replies2, strict=True):
            p = parse_reply(r, "mapping", source=texts[i])
            self.parse_log.record(p, step="rewrite", attribute=attribute.name, direction=direction)
            if not p.ok:
                fail(i, f"step 2 (rewrite spans): {p.error}", spans=spans[i], reply=p.excerpt)
                continue
            res = _agree_articles(texts[i], _apply_mapping(texts[i], p.value))
            if res.text == texts[i] or not res.edits:
                fail(i, "step 2 (rewrite spans): the rewrites left the text unchanged", spans=spans[i])
                continue
            out[i] = Perturbation(texts[i], res.text, attribute.name, direction, self.name, "ok", res.edits,
                                  meta={"spans": spans[i], "mapping": p.value})
        return [p for p in out if p is not None]

    def _record(self, kind: str, ok: bool, value: Any, error: str | None, reply: str, **context: Any) -> None:
        from irm.llm.parsing import ParsedReply

        self.parse_log.record(ParsedReply(kind, ok, value, error, (reply or "")[:200]), **context)

    def _perturb_choices(self, texts: list[str], attribute: Attribute, direction: int, gen: dict[str, Any],
                         out: list[Perturbation | None], fail: Callable[..., None]) -> None:
        from irm.llm import LLMError, complete_many

        ctx = {"attribute": attribute.name, "direction": direction}
        cands = {i: _candidates(t) for i, t in enumerate(texts)}
        for i, c in cands.items():
            if not c:
                out[i] = Perturbation(texts[i], texts[i], attribute.name, direction, self.name, "not_applicable",
                                      reason="no content word to rewrite")
        todo = [i for i in range(len(texts)) if cands[i]]
        spans: dict[int, list[str]] = {}
        if self.step1 == "scored" and todo:
            try:
                self._pick_by_scores(texts, attribute, direction, cands, todo, spans, ctx)
            except LLMError as e:  # a server without token probabilities: parse generated replies instead
                log.warning("llm_rewrite: %s gives no token probabilities (%s); step 1 generates its replies.",
                            getattr(self.llm, "name", self.llm), e)
                self.step1 = "generate"
                spans.clear()
        if self.step1 != "scored" and todo:
            # Short replies: a few numbers, then a word or two (the context, not the reply, is long).
            g1 = dict(gen, max_tokens=min(gen["max_tokens"], 12))
            replies1 = complete_many(self.llm, [_choice_messages(texts[i], attribute, direction, cands[i],
                                                                 self.max_spans) for i in todo], **g1)
            for i, r in zip(todo, replies1, strict=True):
                picked, err = _parse_choices(r, cands[i], self.max_spans)
                self._record("choices", picked is not None, picked, err, r, step="spans", **ctx)
                if picked is None:
                    fail(i, f"step 1 (choose words): {err}", reply=(r or "")[:200])
                else:
                    spans[i] = picked
        self._rewrite_words(texts, attribute, direction, gen, spans, out, fail, ctx)

    def _pick_by_scores(self, texts: list[str], attribute: Attribute, direction: int, cands: dict[int, list[str]],
                        todo: list[int], spans: dict[int, list[str]], ctx: dict[str, Any]) -> None:
        """Step 1 constrained: the reply can only be one of the listed letters; the words are read off the
        LLM's probabilities of those letters (one forward pass per text, nothing generated or parsed)."""
        from irm.llm import choice_logprobs

        for i in todo:
            cands[i] = cands[i][: len(_LETTERS)]
        by_n: dict[int, list[int]] = defaultdict(list)
        for i in todo:
            by_n[len(cands[i])].append(i)
        for n, rows in sorted(by_n.items()):
            lp = choice_logprobs(self.llm, [_letter_messages(texts[i], attribute, direction, cands[i])
                                            for i in rows], list(_LETTERS[:n]))
            for i, row in zip(rows, lp, strict=True):
                spans[i] = _pick_scored(row, cands[i], self.max_spans, self.pick_share)
                self._record("letter (scored)", True, spans[i], None, "", step="spans", **ctx)

    def _rewrite_words(self, texts: list[str], attribute: Attribute, direction: int, gen: dict[str, Any],
                       spans: dict[int, list[str]], out: list[Perturbation | None], fail: Callable[..., None],
                       ctx: dict[str, Any]) -> None:
        """Step 2: one short generated replacement per chosen word (under the word grammar of
        :func:`irm.llm.complete_words` with ``step2 = "words"``)."""
        from irm.llm import complete_many, complete_words

        jobs = [(i, w) for i in sorted(spans) for w in spans[i]]
        g2 = dict(gen, max_tokens=min(gen["max_tokens"], 12))
        msgs = [_word_messages(texts[i], attribute, direction, w) for i, w in jobs]
        if self.step2 == "words":
            replies2, _ = complete_words(self.llm, msgs, ban=[w for _, w in jobs], max_words=_WORDS_MAX, **g2)
        else:
            replies2 = complete_many(self.llm, msgs, **g2)
        mapping: dict[int, dict[str, str]] = defaultdict(dict)
        errors: dict[int, list[str]] = defaultdict(list)
        for (i, w), r in zip(jobs, replies2, strict=True):
            repl, err = _parse_word(r, w)
            self._record("word", repl is not None, repl, err, r, step="rewrite", word=w, **ctx)
            if repl is None:
                errors[i].append(f"{w!r}: {err} ({(r or '')[:60]!r})")
            else:
                mapping[i][w] = repl
        for i in sorted(spans):
            if not mapping[i]:
                fail(i, "step 2 (rewrite words): " + "; ".join(errors[i]), spans=spans[i])
                continue
            # Whole words only: "fun" must not rewrite "funny".
            res = _agree_articles(texts[i], swap_words(texts[i], dict(mapping[i])) or EditResult(texts[i], ()))
            if res.text == texts[i] or not res.edits:
                fail(i, "step 2 (rewrite words): the rewrites left the text unchanged", spans=spans[i])
                continue
            out[i] = Perturbation(texts[i], res.text, attribute.name, direction, self.name, "ok", res.edits,
                                  meta={"spans": spans[i], "mapping": mapping[i],
                                        **({"unparsed": errors[i]} if errors[i] else {})})


# ----------------------------------------------------------------------------------------------
class RandomSubstitution:
    """Random-perturbation baseline: random word edits of a given size, with random replacement words.

    :meth:`perturb_like` matches a perturbation's word-level edit: the same numbers of substituted,
    inserted and deleted words (so the same word edit distance), at random positions, with words drawn
    uniformly from ``vocabulary``: by default (:func:`explain`) a *neutral* vocabulary
    (:func:`neutral_vocabulary`: everyday words with no VADER lexicon value, kept only where the RMs being
    explained barely react to them), as the paper's baseline, so that the baseline measures what an edit
    of that size does, not what sentiment words do. Matching the mix and not only the distance matters:
    inserting a 7-word sentence keeps every original word, while substituting 7 of 15 words destroys half
    the text.

    >>> rnd = RandomSubstitution(["apple", "river", "stone"])
    >>> rnd.perturb_edits(" a good film.", 1, 0, 0, np.random.default_rng(0)).text
    """

    name = "random"

    def __init__(self, vocabulary: Sequence[str]) -> None:
        vocab = sorted({w.strip(".,!?;:\"'()").lower() for w in vocabulary} - {""})
        vocab = [w for w in vocab if w.isalpha()]
        if len(vocab) < 2:
            raise ValueError(f"RandomSubstitution needs at least 2 distinct alphabetic words, got {vocab!r}")
        self.vocabulary = vocab

    def _word(self, rng: np.random.Generator, avoid: str = "") -> str:
        while True:
            w = self.vocabulary[int(rng.integers(len(self.vocabulary)))]
            if w != avoid.lower():
                return w

    def perturb_like(self, p: Perturbation, rng: np.random.Generator) -> Perturbation:
        """A random twin of ``p``: random edits with ``p``'s substitution/insertion/deletion counts."""
        n_sub, n_ins, n_del = edit_ops(p.original, p.text)
        out = self.perturb_edits(p.original, n_sub, n_ins, n_del, rng)
        return Perturbation(out.original, out.text, p.attribute, p.direction, self.name, out.status, out.edits,
                            reason=out.reason, meta={"edit_ops": [n_sub, n_ins, n_del]})

    def perturb_edits(self, text: str, n_sub: int, n_ins: int, n_del: int, rng: np.random.Generator) -> Perturbation:
        """``n_sub`` random substitutions, ``n_ins`` random insertions and ``n_del`` random deletions."""
        ws = words(text)
        n_del = min(n_del, max(0, len(ws) - 1))  # never delete everything
        n_sub = min(n_sub, len(ws) - n_del)
        if n_sub + n_ins + n_del < 1:
            return Perturbation(text, text, "random", 0, self.name, "not_applicable", reason="edit size 0")
        lead = text[: len(text) - len(text.lstrip())]
        trail = text[len(text.rstrip()) :]
        pos = rng.permutation(len(ws)).tolist()
        deleted, subbed = set(pos[:n_del]), pos[n_del : n_del + n_sub]
        edits = []
        for i in sorted(subbed):
            m = re.match(r"^(\W*)(.*?)(\W*)$", ws[i])
            pre, core, post = m.groups() if m else ("", ws[i], "")
            new = pre + (match_case(core, self._word(rng, core)) if core else self._word(rng)) + post
            edits.append(Edit("replace", ws[i], new, i))
            ws[i] = new
        kept = [w for i, w in enumerate(ws) if i not in deleted]
        edits += [Edit("delete", ws[i], "", i) for i in sorted(deleted)]
        for _ in range(n_ins):
            at = int(rng.integers(len(kept) + 1))
            w = self._word(rng)
            kept.insert(at, w)
            edits.append(Edit("insert", "", w, at))
        return Perturbation(text, lead + " ".join(kept) + trail, "random", 0, self.name, "ok", tuple(edits))


NEUTRAL_WORDS_RESOURCE = "neutral_words.txt"


def _packaged_neutral_words() -> list[str]:
    from importlib import resources

    text = resources.files("irm.resources").joinpath(NEUTRAL_WORDS_RESOURCE).read_text(encoding="utf-8")
    out: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            out += line.split()
    return list(dict.fromkeys(out))


def neutral_vocabulary(rms: Any = None, *, words: Sequence[str] | None = None, keep: float = 0.5,
                       prompt: str = "", batch: int = 256) -> tuple[list[str], dict[str, Any]]:
    """Words for the random baseline that carry no preference of their own: ``(words, info)``.

    Starts from ``words`` (default: the packaged everyday-word list ``irm/resources/neutral_words.txt``,
    none of which is in the VADER lexicon), then, for each RM in ``rms`` (a dict name -> RM or a list),
    scores every word alone as a response (``" word"`` after ``prompt``) and keeps the words whose
    reward lies closest to that RM's median word reward: the ``keep`` share least distinctive under
    every RM (ties kept together: under a lexicon RM that ignores all of them, all stay). ``info`` says
    how many words each RM kept and the spread of their rewards.
    """
    vocab = list(dict.fromkeys(w.strip().lower() for w in (words if words is not None else _packaged_neutral_words())
                               if w.strip().isalpha()))
    if len(vocab) < 2:
        raise ValueError(f"A neutral vocabulary needs at least 2 alphabetic words, got {vocab!r}")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    info: dict[str, Any] = {"source": "packaged" if words is None else "given", "n_words": len(vocab), "keep": keep,
                            "rms": {}}
    if rms is None:
        return vocab, info
    items = rms.items() if hasattr(rms, "items") else [(getattr(r, "name", str(i)), r) for i, r in enumerate(rms)]
    from scipy.stats import rankdata

    worst = np.zeros(len(vocab))  # per word: its highest distinctiveness rank (0..1] over the RMs
    for name, rm in items:
        scores = np.concatenate([np.asarray(rm.score([prompt] * len(chunk), [f" {w}" for w in chunk]), dtype=np.float64)
                                 for chunk in (vocab[i : i + batch] for i in range(0, len(vocab), batch))])
        if not np.all(np.isfinite(scores)):
            bad = vocab[int(np.flatnonzero(~np.isfinite(scores))[0])]
            raise FloatingPointError(f"Reward model {name!r} returned a non-finite reward for the word {bad!r} (while "
                                     "choosing the random baseline's neutral words); a NaN makes every flip test "
                                     "meaningless.")
        dev = np.abs(scores - np.median(scores))
        rank = rankdata(dev, method="min") / len(vocab)  # ties share the lowest rank: all-equal -> all kept
        mine = rank <= keep
        worst = np.maximum(worst, rank)
        info["rms"][str(name)] = {"n_kept": int(mine.sum()), "reward_sd_all": float(scores.std()),
                                  "reward_sd_kept": float(scores[mine].std())}
    ok = worst <= keep
    if ok.sum() < 20:  # the RMs disagree on which words are neutral: the least distinctive share overall
        ok = worst <= np.quantile(worst, keep)
        info["fallback"] = "fewer than 20 words were among every RM's most neutral; kept the lowest worst ranks"
    kept = [w for w, k in zip(vocab, ok) if k]
    info["n_kept"] = len(kept)
    return kept, info
