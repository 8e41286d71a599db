"""The LLM protocol and what every client shares: message and parameter checks, batched calls,
choice log-probabilities, and the registry of client kinds (:func:`register_llm`, :func:`build_llm`).

A new backend is a class with a ``name`` and ``complete(messages, *, max_tokens, temperature, seed)``,
registered with ``@register_llm("kind")`` in a module of this package."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Message", "LLMClient", "LLMError", "check_messages", "check_params", "complete_many",
           "complete_words", "choice_logprobs", "LLM_CLIENTS", "register_llm", "build_llm", "ENV_BASE_URL", "ENV_API_KEY"]

Message = dict[str, str]
_ROLES = ("system", "user", "assistant")

# Environment variables read (first one set wins). Their *values* never leave this module.
ENV_BASE_URL = ("IRM_LLM_BASE_URL", "OPENAI_BASE_URL")
ENV_API_KEY = ("IRM_LLM_API_KEY", "OPENAI_API_KEY")


class LLMError(RuntimeError):
    """An LLM call failed for good (after retries, or a request the server rejected)."""


# ----------------------------------------------------------------------------------------------
# The protocol
@runtime_checkable
class LLMClient(Protocol):
    """What irm asks of an LLM: a name and a chat completion.

    ``messages`` are ``{"role": "system"|"user"|"assistant", "content": str}`` dicts.
    ``temperature == 0`` means greedy decoding; ``seed`` makes sampling reproducible where the backend
    allows it. Clients may add ``complete_many(batch, **same_params) -> list[str]`` for batching and a
    ``cache_id`` (a more precise identity than ``name``, e.g. with a weights fingerprint) for caching.
    """

    name: str

    def complete(
        self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0
    ) -> str: ...


def check_messages(messages: Any) -> list[Message]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {type(messages).__name__} "
            f"{str(messages)[:60]!r}; e.g. [{{'role': 'user', 'content': 'Hello'}}]"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
            raise TypeError(f"messages[{i}] must be a dict with exactly the keys 'role' and 'content', got {m!r}")
        if m["role"] not in _ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; valid roles are {list(_ROLES)}")
        if not isinstance(m["content"], str):
            raise TypeError(f"messages[{i}]['content'] must be a str, got {type(m['content']).__name__}")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def check_params(max_tokens: int, temperature: float, seed: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def complete_many(
    client: LLMClient, batch: Sequence[list[Message]], *, max_tokens: int = 256, temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Complete many conversations: the client's own batched ``complete_many`` when it has one.

    >>> complete_many(llm, [[{"role": "user", "content": "Hi"}]] * 2, max_tokens=8)
    """
    fn = getattr(client, "complete_many", None)
    if callable(fn):
        return list(fn(batch, max_tokens=max_tokens, temperature=temperature, seed=seed))
    return [client.complete(m, max_tokens=max_tokens, temperature=temperature, seed=seed) for m in batch]


def complete_words(
    client: LLMClient, batch: Sequence[list[Message]], *, ban: Sequence[str | None] | None = None,
    max_words: int = 3, max_tokens: int = 12, temperature: float = 0.0, seed: int = 0,
) -> tuple[list[str], bool]:
    """Replies that are a word or a short phrase: ``(replies, constrained)``.

    A client with ``complete_words`` (:class:`LocalChatLLM`, and :class:`CachedLLM` around one) decodes
    under a grammar: the reply is 1 to ``max_words`` words of letters (``'`` and ``-`` inside a word), and
    ends where the model would go on with anything else (punctuation, a new line, a clause past
    ``max_words``); ``ban[i]`` (a word) cannot be the reply to conversation ``i`` (its first tokens are
    masked). Any other client answers freely (``constrained`` False), so callers still parse the replies.

    >>> replies, constrained = complete_words(llm, batch, ban=["dull"], max_words=3)
    """
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"max_words must be an int >= 1, got {max_words!r}")
    bans = list(ban) if ban is not None else [None] * len(batch)
    if len(bans) != len(batch):
        raise ValueError(f"ban has {len(bans)} entries for {len(batch)} conversations; give one per conversation "
                         "(None: nothing banned)")
    fn = getattr(client, "complete_words", None)
    if callable(fn):
        out = list(fn(batch, ban=bans, max_words=max_words, max_tokens=max_tokens, temperature=temperature,
                      seed=seed))
        return out, bool(getattr(client, "constrains_words", True))
    return complete_many(client, batch, max_tokens=max_tokens, temperature=temperature, seed=seed), False


def choice_logprobs(client: Any, batch: Sequence[list[Message]], choices: Sequence[str]) -> np.ndarray:
    """``[len(batch), len(choices)]``: log-probability of each choice's first token as the first token of
    the assistant's reply to each conversation (one forward pass, no sampling).

    Only clients that expose token probabilities have it (:class:`LocalChatLLM`, and :class:`CachedLLM`
    around one); for others it raises :class:`LLMError` naming the alternative.
    """
    fn = getattr(client, "choice_logprobs", None)
    if not callable(fn):
        raise LLMError(f"{getattr(client, 'name', client)!r} does not expose token log-probabilities, which "
                       "scored (calibrated) labels need; use the generated labels instead "
                       "(e.g. [features] classify_mode = 'generate').")
    if not choices or len(set(choices)) != len(choices):
        raise ValueError(f"choices must be distinct and non-empty, got {list(choices)!r}")
    out = np.asarray(fn([check_messages(m) for m in batch], list(choices)), dtype=np.float64)
    if out.shape != (len(batch), len(choices)):
        raise LLMError(f"choice_logprobs of {client!r} returned shape {out.shape}, expected "
                       f"{(len(batch), len(choices))}.")
    return out


# ----------------------------------------------------------------------------------------------
# Registry, factory, config
LLM_CLIENTS: dict[str, Callable[..., LLMClient]] = {}


def register_llm(kind: str) -> Callable[[Callable[..., LLMClient]], Callable[..., LLMClient]]:
    """Register an LLM client factory under ``kind`` (a new backend is a new entry, not an if/elif)."""

    def deco(factory: Callable[..., LLMClient]) -> Callable[..., LLMClient]:
        if kind in LLM_CLIENTS:
            raise ValueError(f"LLM kind {kind!r} is registered twice.")
        LLM_CLIENTS[kind] = factory
        return factory

    return deco




def build_llm(kind: str, **params: Any) -> LLMClient:
    """Build a registered client: ``build_llm("local", model="tiny-llama")``, ``build_llm("openai", model="gpt-4o")``."""
    if kind not in LLM_CLIENTS:
        close = difflib.get_close_matches(kind, LLM_CLIENTS, n=1)
        raise ValueError(f"Unknown LLM kind {kind!r}; valid kinds: {sorted(LLM_CLIENTS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else "") + ".")
    try:
        return LLM_CLIENTS[kind](**params)
    except TypeError as e:
        raise TypeError(f"build_llm({kind!r}, ...): {e}") from e
