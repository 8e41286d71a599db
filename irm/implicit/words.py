"""Words in contexts: the data the word-level IRM is fitted and evaluated on.

The explicit RM is a word -> utility table, so the IRM is reconstructed as one too. Each lexicon word
is put in a few neutral sentence templates whose slot is the last word ("The movie was {w}"). From
the pair we read, per word:

- ``log p(w | template)`` under base and tuned (all of the word's tokens), giving the log-ratio;
- activations at the word's last token (where the model has read the whole word), base and tuned.

A deterministic split keeps held-out words out of every fit; it is recorded in the results.

>>> split = WordSplit.from_words(rm.alphabetic_words(), test_fraction=0.2, max_words=1500, seed=0)
>>> lp = word_logprobs(pair.tuned, split.all_words)          # [n_words, n_templates]
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from irm.activations.capture import CaptureRecord
from irm.implicit.logratio import response_logprobs
from irm.rewards.utilities import NEUTRAL_WORDS, TEMPLATE_SETS

__all__ = ["TEMPLATES", "NEUTRAL_WORDS", "WordSplit", "word_logprobs", "word_records", "Triple", "build_triples"]

# The slot is always last, so a word's log-probability is that of the text's final tokens. The
# default set; others (irm.rewards.utilities.TEMPLATE_SETS) are chosen with [irm] templates.
TEMPLATES: tuple[str, ...] = TEMPLATE_SETS["reviews"]


@dataclass(frozen=True)
class WordSplit:
    fit_words: tuple[str, ...]
    test_words: tuple[str, ...]
    seed: int
    test_fraction: float

    @classmethod
    def from_words(cls, words: Sequence[str], *, test_fraction: float = 0.2, max_words: int | None = None,
                   seed: int = 0) -> WordSplit:
        """Deterministic: a word's side depends on a hash of (seed, word) only, not on the word list."""
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
        words = sorted(set(words))
        n_all = len(words)

        def h(w: str) -> float:
            return int(hashlib.sha256(f"{seed}:{w}".encode()).hexdigest()[:12], 16) / 16**12

        if max_words is not None and len(words) > max_words:
            # Subsample by a second hash so the test side is the same fraction of the subsample.
            words = sorted(words, key=lambda w: h("sub:" + w))[:max_words]
            words.sort()
        test = tuple(w for w in words if h(w) < test_fraction)
        fit = tuple(w for w in words if h(w) >= test_fraction)
        if len(test) < 10 or len(fit) < 10:
            if len(test) < 10 and len(fit) >= 10:
                fix = (f"raise irm.test_fraction (now {test_fraction}) so that at least 10 words are held out"
                       + (", or irm.max_words" if max_words is not None and max_words < n_all else ""))
            elif len(fit) < 10 and len(test) >= 10:
                fix = f"lower irm.test_fraction (now {test_fraction}) so that at least 10 words are left to fit"
            else:
                fix = "use a larger lexicon"
            raise ValueError(f"Too few words to split: {len(fit)} to fit and {len(test)} held out of {len(words)} "
                             f"words (each side needs >= 10); {fix}.")
        return cls(fit, test, seed, test_fraction)

    @property
    def all_words(self) -> tuple[str, ...]:
        return self.fit_words + self.test_words

    def to_dict(self) -> dict:
        return {"seed": self.seed, "test_fraction": self.test_fraction, "n_fit": len(self.fit_words),
                "n_test": len(self.test_words), "test_words": list(self.test_words)}


def word_logprobs(model, words: Sequence[str], templates: Sequence[str] = TEMPLATES, *,
                  batch_size: int = 64) -> np.ndarray:
    """``[n_words, n_templates]``: log-probability of all of each word's tokens after each template."""
    prompts, responses = [], []
    for w in words:
        for t in templates:
            prefix = t.replace("{w}", "").rstrip()
            prompts.append(prefix)
            responses.append(" " + w)
    lps = response_logprobs(model, prompts, responses, batch_size=batch_size)
    sums = np.array([float(x.sum()) for x in lps])
    return sums.reshape(len(words), len(templates))


def word_records(words: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[CaptureRecord]:
    """Records for ``positions="target"``: word-major order (word i, template j) -> row i * T + j."""
    recs = []
    for w in words:
        for t in templates:
            text = t.replace("{w}", w)
            start = t.index("{w}")
            # The "response" is the word with its leading space, as in word_logprobs: with
            # capture_activations(logprobs=True) the store's log-probabilities equal word_logprobs.
            prefix = len(t[:start].rstrip())
            recs.append(CaptureRecord(text, prompt_chars=prefix, target=(start, start + len(w))))
    return recs


@dataclass(frozen=True)
class Triple:
    """A contrastive triple: one template with a positive, a negative and a neutral word in its slot."""

    template: str
    positive: str
    negative: str
    neutral: str

    def sentences(self) -> tuple[str, str, str]:
        return tuple(self.template.replace("{w}", w) for w in (self.positive, self.negative, self.neutral))


def build_triples(words: Sequence[str], utilities: Sequence[float], templates: Sequence[str] = TEMPLATES, *,
                  seed: int = 0) -> list[Triple]:
    """Lexicon-driven triples: each word is paired with a word of the opposite sign and similar
    magnitude (the "swapped" variant) and a neutral word, in every template."""
    rng = np.random.default_rng(seed)
    u = np.asarray(utilities, dtype=float)
    pos = [i for i in np.argsort(-u) if u[i] > 0]
    neg = [i for i in np.argsort(u) if u[i] < 0]
    if not pos or not neg:
        raise ValueError("Triples need words of both signs; the lexicon slice has "
                         f"{len(pos)} positive and {len(neg)} negative words.")
    triples = []
    for i, w in enumerate(words):
        if u[i] == 0:
            continue
        # The opposite word of the nearest |utility| rank: a strong word swaps with a strong word.
        same, other = (pos, neg) if u[i] > 0 else (neg, pos)
        rank = same.index(i) / max(1, len(same) - 1)
        j = other[int(round(rank * (len(other) - 1)))]
        for t in templates:
            n = NEUTRAL_WORDS[int(rng.integers(len(NEUTRAL_WORDS)))]
            p_, n_ = (w, words[j]) if u[i] > 0 else (words[j], w)
            triples.append(Triple(t, p_, n_, n))
    return triples
