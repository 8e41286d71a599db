"""Perturbation generators: change one attribute of a response and record the edit.

A generator is anything with a ``name`` and
``perturb(texts, attribute, direction, *, prompts, seed) -> list[Perturbation]`` (one per text, in
order). Two ship, registered in :data:`GENERATORS`:

- ``"programmatic"`` (:class:`ProgrammaticGenerator`): the attribute's own deterministic edits
  (lexicon swaps, trimming or padding, inserted refusals, hedges, polite markers, noise); no LLM.
- ``"llm_rewrite"`` (:class:`LLMRewriteGenerator`): the two-step rewrite of the paper through any
  :class:`~irm.llm.LLMClient`: (1) ask for the words or phrases of the response related to the
  attribute, (2) ask for a rewrite of only those phrases towards more or less of the attribute; the
  rewrites are applied by string replacement, so nothing outside the chosen spans can change. A
  reply that does not parse gives a ``failed`` perturbation with the reason, counted in a
  :class:`~irm.llm.ParseLog`.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from irm.contrastive.attributes import Attribute, get_attribute
from irm.contrastive.textops import Edit, EditResult, edit_ops, match_case, word_edit_distance, words

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
        out = []
        for t in texts:
            r = attribute.perturb(t, direction, item_rng(seed, self.name, attribute.name, direction, t))
            if isinstance(r, EditResult):
                out.append(Perturbation(t, r.text, attribute.name, direction, self.name, "ok", r.edits))
            else:
                out.append(Perturbation(t, t, attribute.name, direction, self.name, "not_applicable", reason=str(r)))
        return out


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

    def __init__(self, llm: Any, *, max_spans: int = 4, max_tokens: int = 96, temperature: float = 0.0,
                 seed: int = 0) -> None:
        from irm.llm import LLMClient, ParseLog

        if not isinstance(llm, LLMClient):
            raise TypeError(f"llm must be an irm.llm.LLMClient (name + complete), got {type(llm).__name__}; "
                            "build one with irm.llm.LLMConfig(...).build() or irm.llm.build_llm(kind, ...).")
        if max_spans < 1:
            raise ValueError(f"max_spans must be >= 1, got {max_spans}")
        self.llm = llm
        self.max_spans = int(max_spans)
        self.generation = {"max_tokens": int(max_tokens), "temperature": float(temperature), "seed": int(seed)}
        self.parse_log = ParseLog()

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
            res = _apply_mapping(texts[i], p.value)
            if res.text == texts[i] or not res.edits:
                fail(i, "step 2 (rewrite spans): the rewrites left the text unchanged", spans=spans[i])
                continue
            out[i] = Perturbation(texts[i], res.text, attribute.name, direction, self.name, "ok", res.edits,
                                  meta={"spans": spans[i], "mapping": p.value})
        return [p for p in out if p is not None]


# ----------------------------------------------------------------------------------------------
class RandomSubstitution:
    """Random-perturbation baseline: random word edits of a given size, with random replacement words.

    :meth:`perturb_like` matches a perturbation's word-level edit: the same numbers of substituted,
    inserted and deleted words (so the same word edit distance), at random positions, with words drawn
    uniformly from ``vocabulary`` (the stage passes the words of all responses being explained, i.e.
    in-domain words). Matching the mix and not only the distance matters: inserting a 7-word sentence
    keeps every original word, while substituting 7 of 15 words destroys half the text.

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
