"""An on-disk cache of LLM replies around any client, keyed by sha256 of (client identity, messages,
generation parameters), so a rerun costs nothing."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from irm.core.log import get_logger
from irm.llm.base import (
    LLMClient,
    Message,
    check_messages,
    check_params,
    choice_logprobs,
    complete_many,
    complete_words,
)

__all__ = ["CachedLLM", "CacheStats"]

log = get_logger(__name__)

@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}


class CachedLLM:
    """Wrap a client with an on-disk cache: one JSON file per (client, messages, parameters).

    The key is sha256 of the client's ``cache_id`` (else ``name``), the messages and
    ``max_tokens``/``temperature``/``seed``. Files hold the messages, parameters and reply (never a
    credential), written atomically, so an interrupted run keeps what it got and a rerun is free.

    >>> llm = CachedLLM(LocalChatLLM("tiny-llama"), "/tmp/llm-cache")
    >>> a = llm.complete([{"role": "user", "content": "Hi"}], max_tokens=4)
    >>> b = llm.complete([{"role": "user", "content": "Hi"}], max_tokens=4)   # from disk
    >>> llm.stats.hits, llm.stats.misses
    (1, 1)
    """

    def __init__(self, client: LLMClient, cache_dir: str | Path) -> None:
        if not isinstance(client, LLMClient):
            raise TypeError(f"client must implement LLMClient (name + complete), got {type(client).__name__}")
        self.client = client
        self.cache_dir = Path(cache_dir).expanduser()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.name = client.name
        self.cache_id = getattr(client, "cache_id", client.name)
        self.stats = CacheStats()
        # A client that batches (a local model) is asked for all misses at once; one that answers a request
        # at a time (a server) is asked one by one and each reply is saved as it arrives, so a run whose
        # server dies for good resumes from every reply it got.
        self._batches = callable(getattr(client, "complete_many", None))
        # complete_words decodes under its grammar only where the wrapped client does.
        self.constrains_words = bool(callable(getattr(client, "complete_words", None))
                                     and getattr(client, "constrains_words", True))

    def key(self, messages: list[Message], *, max_tokens: int, temperature: float, seed: int) -> str:
        return self._key(messages, {"max_tokens": int(max_tokens), "temperature": float(temperature),
                                    "seed": int(seed)})

    def _key(self, messages: list[Message], params: dict[str, Any]) -> str:
        blob = json.dumps({"v": 1, "client": self.cache_id, "messages": messages, "params": params},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _get(self, key: str) -> str | None:
        p = self._path(key)
        try:
            return str(json.loads(p.read_text(encoding="utf-8"))["reply"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, OSError):
            log.warning("Unreadable LLM cache entry %s; it is recomputed", p)
            return None

    def _put(self, key: str, messages: list[Message], params: dict[str, Any], reply: str) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"client": self.name, "messages": messages, "params": params, "reply": reply},
                                  ensure_ascii=False, indent=1), encoding="utf-8")
        tmp.replace(p)

    def complete(
        self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0
    ) -> str:
        return self.complete_many([messages], max_tokens=max_tokens, temperature=temperature, seed=seed)[0]

    def complete_many(
        self, batch: Sequence[list[Message]], *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        check_params(max_tokens, temperature, seed)
        params = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        batch = [check_messages(m) for m in batch]
        keys = [self.key(m, **params) for m in batch]
        out: list[str | None] = [self._get(k) for k in keys]
        todo = [i for i, r in enumerate(out) if r is None]
        self.stats.hits += len(batch) - len(todo)
        self.stats.misses += len(todo)
        if todo:
            # The same conversation twice in one batch is asked once.
            uniq = list(dict.fromkeys(keys[i] for i in todo))
            first = {k: next(i for i in todo if keys[i] == k) for k in uniq}
            if self._batches:
                replies = complete_many(self.client, [batch[first[k]] for k in uniq], **params)
                for k, r in zip(uniq, replies, strict=True):
                    self._put(k, batch[first[k]], params, r)
            else:  # one request at a time, each reply saved as it comes (see _batches)
                replies = []
                for k in uniq:
                    replies.append(self.client.complete(batch[first[k]], **params))
                    self._put(k, batch[first[k]], params, replies[-1])
            got = dict(zip(uniq, replies, strict=True))
            for i in todo:
                out[i] = got[keys[i]]
        return [str(r) for r in out]

    def complete_words(self, batch: Sequence[list[Message]], *, ban: Sequence[str | None], max_words: int,
                       max_tokens: int, temperature: float, seed: int) -> list[str]:
        """:func:`complete_words` of the wrapped client, cached like replies (the grammar and the banned word
        are part of the key, so constrained and free replies never mix)."""
        check_params(max_tokens, temperature, seed)
        batch = [check_messages(m) for m in batch]
        gen = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        params = [{**gen, "kind": "words", "max_words": int(max_words), "ban": b} for b in ban]
        keys = [self._key(m, p) for m, p in zip(batch, params, strict=True)]
        out: list[str | None] = [self._get(k) for k in keys]
        todo = list(dict.fromkeys(keys[i] for i, r in enumerate(out) if r is None))
        self.stats.hits += sum(r is not None for r in out)
        self.stats.misses += sum(r is None for r in out)
        if todo:
            first = {k: keys.index(k) for k in todo}
            parts = [todo] if self._batches else [[k] for k in todo]
            got: dict[str, str] = {}
            for part in parts:
                rows = [first[k] for k in part]
                replies, _ = complete_words(self.client, [batch[i] for i in rows], ban=[ban[i] for i in rows],
                                            max_words=max_words, **gen)
                for k, i, r in zip(part, rows, replies, strict=True):
                    self._put(k, batch[i], params[i], r)
                    got[k] = r
            out = [r if r is not None else got[k] for k, r in zip(keys, out, strict=True)]
        return [str(r) for r in out]

    def choice_logprobs(self, batch: Sequence[list[Message]], choices: Sequence[str]) -> np.ndarray:
        """:func:`choice_logprobs` of the wrapped client, cached like replies (a cached entry holds the
        numbers as its reply)."""
        batch = [check_messages(m) for m in batch]
        params = {"choices": list(choices), "kind": "choice_logprobs"}
        keys = [self._key(m, params) for m in batch]
        out: list[list[float] | None] = []
        for k in keys:
            got = self._get(k)
            try:
                vals = json.loads(got) if got is not None else None
                out.append(vals if isinstance(vals, list) and len(vals) == len(choices) else None)
            except ValueError:
                out.append(None)
        todo = [i for i, v in enumerate(out) if v is None]
        self.stats.hits += len(batch) - len(todo)
        self.stats.misses += len(todo)
        if todo:
            for part in ([todo] if self._batches else [[i] for i in todo]):
                fresh = choice_logprobs(self.client, [batch[i] for i in part], choices)
                for i, row in zip(part, fresh, strict=True):
                    out[i] = [float(x) for x in row]
                    self._put(keys[i], batch[i], params, json.dumps(out[i]))
        return np.asarray(out, dtype=np.float64)

    def __repr__(self) -> str:
        return f"CachedLLM({self.client!r}, hits={self.stats.hits}, misses={self.stats.misses})"
