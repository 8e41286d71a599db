"""Word utilities of any reward model: what the RM itself says a word is worth.

The word-level comparison of the IRM with the explicit RM needs the explicit RM's utility of each
word. A lexicon reads its table. Any other RM (a learned classifier, an LLM-style RM) is asked
directly: it scores sentence templates with the word in the slot and the same templates with neutral
words in it; the word's utility is the mean, over templates, of its score minus the neutral words'
mean score in that template, and its spread is the standard deviation of that difference across
templates (how much the utility depends on the context). A model with its own word read-out (the
probe IRM, ``utilities_of_words``) is asked through that.

Template sets ship for several domains and are chosen by name; a run can also bring its own
(a list, a file with one template per line, or templates made from its own prompts). Every template
ends with its ``{w}`` slot, so the word is the last thing the model reads.

>>> wu = word_utilities(load_rm("classifier:my-sentiment-rm?label=POSITIVE"), ["great", "awful"],
...                     templates="everyday")
>>> wu.values, wu.spread
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TEMPLATE_SETS", "NEUTRAL_WORDS", "WordUtilities", "word_utilities", "resolve_templates",
           "templates_from_prompts"]

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    # The paper's domain (movie reviews), and the sentences the default experiment has always used.
    "reviews": (
        "The movie was {w}",
        "I thought the film was {w}",
        "Honestly, the acting felt {w}",
        "The ending left me feeling {w}",
        "My friends said the story was {w}",
        "Overall, I would call it {w}",
    ),
    "everyday": (
        "Today was {w}",
        "To be honest, I feel {w}",
        "The weather this morning was {w}",
        "My neighbour said the party was {w}",
        "Looking back, the whole week felt {w}",
        "In one word, the trip was {w}",
    ),
    "assistant": (
        "Sure, here is my answer. In short, the result is {w}",
        "Thanks for asking! I would describe it as {w}",
        "Here is a summary of the situation: it is {w}",
        "Based on what you described, the outcome sounds {w}",
        "I checked the details, and the plan looks {w}",
        "To answer your question directly, it was {w}",
    ),
}
# Words with no VADER utility, used as the neutral variant (the zero) of word utilities.
NEUTRAL_WORDS: tuple[str, ...] = ("long", "new", "recent", "ordinary", "typical", "different", "american",
                                  "short", "familiar", "another")


def _check_templates(templates: Sequence[str], where: str) -> tuple[str, ...]:
    out = tuple(str(t) for t in templates if str(t).strip())
    if not out:
        raise ValueError(f"{where}: no templates; give at least one sentence ending with '{{w}}', or a set name "
                         f"({', '.join(TEMPLATE_SETS)}).")
    bad = [t for t in out if t.count("{w}") != 1 or not t.rstrip().endswith("{w}")]
    if bad:
        raise ValueError(f"{where}: every template must hold exactly one '{{w}}' slot, at its end (the word is "
                         f"the last thing the model reads); these do not: {bad[:3]}.")
    return tuple(t.rstrip() for t in out)


def templates_from_prompts(prompts: Sequence[str], n: int = 6) -> tuple[str, ...]:
    """Templates from a run's own prompts: the first ``n`` distinct prompts with a ``{w}`` slot appended
    (the word is read where a response would begin)."""
    seen: list[str] = []
    for p in prompts:
        p = " ".join(str(p).split())
        if p and "{" not in p and "}" not in p and p not in seen:
            seen.append(p)
        if len(seen) == n:
            break
    if not seen:
        raise ValueError("templates = 'prompts' needs prompts; the run has none usable (empty, or with braces).")
    return tuple(f"{p} {{w}}" for p in seen)


def resolve_templates(spec: str | Sequence[str], *, prompts: Sequence[str] | None = None,
                      base_dir: str | Path | None = None) -> tuple[str, ...]:
    """Templates from a set name (``reviews``, ``everyday``, ``assistant``), ``"prompts"`` (from
    ``prompts``), a file (one template per line; relative to ``base_dir``) or a list of templates."""
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return TEMPLATE_SETS[spec]
        if spec == "prompts":
            if prompts is None:
                raise ValueError("templates = 'prompts' needs the run's prompts.")
            return templates_from_prompts(prompts)
        p = Path(spec)
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        if p.is_file():
            lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
            return _check_templates(lines, str(p))
        if "{w}" in spec:
            return _check_templates([spec], "templates")
        raise ValueError(f"templates {spec!r} is no template set ({', '.join(TEMPLATE_SETS)}, prompts), no file "
                         f"({p.resolve()} does not exist) and no template with a '{{w}}' slot.")
    return _check_templates(spec, "templates")


@dataclass
class WordUtilities:
    words: list[str]
    values: np.ndarray  # [n] utility per word (nan: the RM has none, e.g. a word outside a lexicon)
    spread: np.ndarray  # [n] std of the per-template differences (0 for a table)
    method: str  # "table" | "templates" | "probe"
    templates: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "templates": list(self.templates), "n_words": len(self.words)}


def word_utilities(rm: Any, words: Sequence[str], *, templates: str | Sequence[str] = "reviews",
                   neutral_words: Sequence[str] = NEUTRAL_WORDS, batch_size: int = 256) -> WordUtilities:
    """Each word's utility according to ``rm`` (see the module docstring)."""
    words = [str(w) for w in words]
    tpl = resolve_templates(templates)
    if hasattr(rm, "table") and callable(getattr(rm, "word_utility", None)):
        vals = np.array([np.nan if (u := rm.word_utility(w)) is None else u for w in words], dtype=np.float64)
        return WordUtilities(words, vals, np.zeros(len(words)), "table")
    if callable(getattr(rm, "utilities_of_words", None)):
        vals = np.asarray(rm.utilities_of_words(words), dtype=np.float64)
        return WordUtilities(words, vals, np.zeros(len(words)), "probe", tuple(getattr(rm.meta, "templates", ())))
    neutral = [w for w in neutral_words if w not in set(words)] or list(neutral_words)
    allw = words + neutral
    texts = [t.replace("{w}", w) for w in allw for t in tpl]
    scores = np.concatenate([np.asarray(rm.score([""] * len(texts[i:i + batch_size]), texts[i:i + batch_size]),
                                        dtype=np.float64) for i in range(0, len(texts), batch_size)])
    if not np.all(np.isfinite(scores)):
        raise FloatingPointError(f"{getattr(rm, 'name', rm)} returned non-finite scores for template sentences, "
                                 f"e.g. {texts[int(np.argmin(np.isfinite(scores)))]!r}.")
    s = scores.reshape(len(allw), len(tpl))
    diff = s[: len(words)] - s[len(words):].mean(0, keepdims=True)
    spread = diff.std(1, ddof=1) if len(tpl) > 1 else np.zeros(len(words))
    return WordUtilities(words, diff.mean(1), spread, "templates", tpl)
