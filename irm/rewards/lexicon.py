"""A token-utility reward model: a word -> utility table, by default the VADER lexicon.

This is the explicit RM of "Beyond Training Objectives" (arXiv 2310.08164): the reward of a text is
the sum of the utilities of its lower-cased words divided by 5, clipped to [-10, 10]. Following the
paper, the prompt is scored together with the response (``score_prompt=True``); set it to False to
score the response alone. The table is exposed as :attr:`TokenUtilityRM.table`: that is the type
signature the implicit reward model is later reconstructed into.

>>> rm = TokenUtilityRM.from_vader()
>>> rm.score(["The film was"], [" a great joy"])   # (3.1 + 2.8) / 5
array([1.18])
"""

from __future__ import annotations

import csv
import importlib.util
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from irm.rewards.base import BaseRewardModel, register_reward_model

__all__ = ["TokenUtilityRM", "vader_lexicon_path", "load_lexicon", "split_words"]

_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019"


def vader_lexicon_path() -> Path:
    """Path of ``vader_lexicon.txt`` inside the installed ``vaderSentiment`` package (not imported)."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The VADER lexicon ships in the package 'vaderSentiment', which is not installed. "
            "Install it with: pip install vaderSentiment"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "vader_lexicon.txt"
    if not path.is_file():
        raise FileNotFoundError(f"vaderSentiment is installed but {path} is missing; reinstall the package.")
    return path


def load_lexicon(path: str | Path, *, word_column: int = 0, value_column: int = 1) -> dict[str, float]:
    """Read a TSV of ``word<TAB>utility[<TAB>...]`` lines into a dict (words lower-cased).

    Lines starting with ``#`` and blank lines are skipped. A header line whose value column is not a
    number is skipped too, so a TSV with ``word\\tutility`` on top loads as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Lexicon file {path.resolve()} does not exist.")
    table: dict[str, float] = {}
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or not row[0].strip() or row[0].startswith("#"):
                continue
            if len(row) <= max(word_column, value_column):
                raise ValueError(
                    f"{path}:{lineno}: expected at least {max(word_column, value_column) + 1} tab-separated "
                    f"columns (word, utility), got {len(row)}: {row!r}"
                )
            word, raw = row[word_column].strip().lower(), row[value_column].strip()
            try:
                value = float(raw)
            except ValueError:
                if lineno == 1:  # a header
                    continue
                raise ValueError(f"{path}:{lineno}: utility {raw!r} of word {word!r} is not a number.") from None
            if not math.isfinite(value):
                raise ValueError(f"{path}:{lineno}: utility of word {word!r} is {value}; it must be finite.")
            table[word] = value
    if not table:
        raise ValueError(f"Lexicon file {path} holds no (word, utility) rows.")
    return table


def split_words(text: str) -> list[str]:
    """Lower-cased whitespace words. Punctuation stays attached; :meth:`TokenUtilityRM.word_utilities`
    tries the word as written first (so emoticons such as ``:)`` match) and then stripped."""
    return text.lower().split()


class TokenUtilityRM(BaseRewardModel):
    """Reward = clip(sum of word utilities / ``scale``, -``clip``, ``clip``).

    Parameters
    ----------
    table: word -> utility (words are lower-cased).
    scale: divisor of the summed utilities (5 in the paper).
    clip: rewards are clipped to ``[-clip, clip]`` (10 in the paper); ``None`` disables clipping.
    score_prompt: score prompt + response (the paper's choice) or the response alone.
    """

    def __init__(
        self,
        table: Mapping[str, float],
        *,
        scale: float = 5.0,
        clip: float | None = 10.0,
        score_prompt: bool = True,
        name: str = "lexicon",
    ) -> None:
        if not table:
            raise ValueError("TokenUtilityRM needs a non-empty word -> utility table.")
        bad = [w for w, v in table.items() if not math.isfinite(float(v))]
        if bad:
            raise ValueError(f"Utilities must be finite; {len(bad)} are not, e.g. {bad[:3]}.")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        self.table: dict[str, float] = {str(w).lower(): float(v) for w, v in table.items()}
        self.scale = float(scale)
        self.clip = None if clip is None else float(clip)
        self.score_prompt = bool(score_prompt)
        self.name = name

    @classmethod
    def from_vader(cls, **kwargs) -> TokenUtilityRM:
        """The VADER lexicon shipped inside ``vaderSentiment`` (7,520 entries, utilities in [-4, 4])."""
        kwargs.setdefault("name", "vader")
        return cls(load_lexicon(vader_lexicon_path()), **kwargs)

    @classmethod
    def from_tsv(cls, path: str | Path, **kwargs) -> TokenUtilityRM:
        """Any ``word<TAB>utility`` file, so users can plant a reward of their own."""
        kwargs.setdefault("name", Path(path).stem)
        return cls(load_lexicon(path), **kwargs)

    # -------------------------------------------------------------------------------------------
    def word_utility(self, word: str) -> float | None:
        """Utility of one word, or None when the word is not in the table."""
        w = word.lower()
        if w in self.table:
            return self.table[w]
        stripped = w.strip(_PUNCT)
        return self.table.get(stripped) if stripped else None

    def word_utilities(self, text: str) -> list[tuple[str, float]]:
        """(word, utility) for every word of ``text`` that the table knows, in order."""
        out = []
        for w in split_words(text):
            u = self.word_utility(w)
            if u is not None:
                out.append((w, u))
        return out

    def text_reward(self, text: str) -> float:
        total = sum(u for _, u in self.word_utilities(text)) / self.scale
        if self.clip is not None:
            total = min(max(total, -self.clip), self.clip)
        return float(total)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        self._check_batch(prompts, responses)
        texts: Iterable[str] = (
            (p + " " + r if self.score_prompt else r) for p, r in zip(prompts, responses, strict=True)
        )
        # The space keeps the prompt's last word and the response's first word apart when the
        # response does not begin with a space; words are whitespace-split, so it adds nothing else.
        return np.array([self.text_reward(t) for t in texts], dtype=np.float64)

    # -------------------------------------------------------------------------------------------
    @property
    def words(self) -> list[str]:
        return sorted(self.table)

    def alphabetic_words(self) -> list[str]:
        """Table words made of letters only (VADER also lists emoticons such as ``:-)``)."""
        return sorted(w for w in self.table if re.fullmatch(r"[a-z]+", w))

    def to_tsv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", encoding="utf-8") as f:
            for w in self.words:
                f.write(f"{w}\t{self.table[w]}\n")
        return path

    def __repr__(self) -> str:
        return f"TokenUtilityRM(name={self.name!r}, words={len(self.table)}, scale={self.scale}, clip={self.clip})"


@register_reward_model("lexicon")
def _build_lexicon(
    path: str | None = None,
    scale: float = 5.0,
    clip: float | None = 10.0,
    score_prompt: bool = True,
    name: str | None = None,
) -> TokenUtilityRM:
    """``kind = "lexicon"``: ``path`` of a TSV, or none / "vader" for the VADER lexicon."""
    kw = dict(scale=scale, clip=clip, score_prompt=score_prompt)
    if name:
        kw["name"] = name
    if path is None or str(path).lower() == "vader":
        return TokenUtilityRM.from_vader(**kw)
    return TokenUtilityRM.from_tsv(path, **kw)
