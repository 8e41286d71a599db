"""A memo of response log-probabilities shared by everything that scores the same texts with one model.

Explaining several RMs of one pair (:mod:`irm.contrastive`) runs the same 1,500 (prompt, response)
texts through the same models up to five times: the fluency check (base log-probabilities), the probe
IRM (activations of both models) and the log-ratio IRM (log-probabilities of both). Inside
:func:`sharing_logprobs` each model keeps, per (prompt, response), the sum and count of its response
tokens' log-probabilities wherever one of them computed them (the probe's capture computes them in the
same forward pass as its activations), and the others read them instead of running the model again.

Entries are exact in the sense of the scorers: the same tokenisation, the same response tokens (those
covering a response character, the first token excluded), never truncated (an entry records the text's
token count, and a reader with a smaller ``max_length`` computes the text itself). Values from
different batchings agree to float precision, not bit for bit.

The memo lives only inside the ``with`` block: a model whose weights change (tuning) never reads a
stale value.

>>> with sharing_logprobs(pair.base, pair.tuned):
...     probe.score(prompts, texts); logratio.score(prompts, texts)  # the second runs no model
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["LogprobEntry", "sharing_logprobs", "logprob_memo"]

_ATTR = "_irm_logprob_memo"


@dataclass(frozen=True)
class LogprobEntry:
    """``total``: sum of the response tokens' log-probabilities; ``n``: how many; ``n_tokens``: tokens of
    the whole text (prompt + response, special tokens included)."""

    total: float
    n: int
    n_tokens: int


@contextlib.contextmanager
def sharing_logprobs(*models: Any) -> Iterator[None]:
    """Turn the memo on for ``models`` (LoadedModels; None entries are ignored) for the block. Nested
    blocks share the outer block's memo; it is dropped when the block that made it ends."""
    made = []
    for m in models:
        if m is not None and getattr(m, _ATTR, None) is None:
            setattr(m, _ATTR, {})
            made.append(m)
    try:
        yield
    finally:
        for m in made:
            with contextlib.suppress(AttributeError):
                delattr(m, _ATTR)


def logprob_memo(model: Any) -> dict[tuple[str, str], LogprobEntry] | None:
    """The model's memo ((prompt, response) -> :class:`LogprobEntry`) inside :func:`sharing_logprobs`, else None."""
    return getattr(model, _ATTR, None)
