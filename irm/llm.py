"""LLM clients behind one protocol, a disk cache, reply parsers and a loopback OpenAI-compatible server.

Anything in irm that asks an LLM something (perturbation rewrites, feature explanations, feature
labels) takes an :class:`LLMClient`: an object with a ``name`` and
``complete(messages, *, max_tokens, temperature, seed) -> str``. Two kinds ship:

- ``"local"``: :class:`LocalChatLLM`, a transformers chat model (default: the embedded
  SmolLM2-135M-Instruct), chat template, greedy at ``temperature == 0``, seeded, batched
  :meth:`LocalChatLLM.complete_many`;
- ``"openai"``: :class:`OpenAICompatibleLLM`, any OpenAI-compatible ``/v1/chat/completions`` server
  (OpenAI, vLLM, llama.cpp, ``transformers serve``...). The base URL and API key are read from the
  environment (``IRM_LLM_BASE_URL``/``OPENAI_BASE_URL``, ``IRM_LLM_API_KEY``/``OPENAI_API_KEY``) and
  never logged, saved, hashed into cache keys or shown in a repr. Transient errors (connection, 429,
  5xx) are retried with exponential backoff; other 4xx are not.

:class:`CachedLLM` wraps any client with an on-disk cache keyed by sha256 of (client identity,
messages, generation parameters), so a rerun costs nothing. :func:`parse_reply` turns a raw reply into
a :class:`ParsedReply` that records success or failure with an excerpt of the text: a reply that does
not parse is counted (:class:`ParseLog`), never a crash and never a silent default.

>>> llm = LLMConfig(kind="local", model="tiny-llama").build()      # cached under $IRM_CACHE_DIR/llm
>>> text = llm.complete([{"role": "user", "content": "Is this positive? Answer 1 or 0."}], max_tokens=4)
>>> parse_reply("Label: 1", "label01").value
1

:class:`OpenAICompatibleServer` serves any client over HTTP on 127.0.0.1 (stdlib only), with injectable
faults (HTTP 500/429/400, malformed bodies or replies); the tests run :class:`OpenAICompatibleLLM`
against it for real.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from irm.log import get_logger

__all__ = [
    "Message",
    "LLMClient",
    "LLMError",
    "LocalChatLLM",
    "OpenAICompatibleLLM",
    "CachedLLM",
    "choice_logprobs",
    "CacheStats",
    "complete_many",
    "ParsedReply",
    "ParseLog",
    "ReplyParseError",
    "parse_reply",
    "register_parser",
    "REPLY_PARSERS",
    "LLM_CLIENTS",
    "register_llm",
    "build_llm",
    "LLMConfig",
    "Fault",
    "OpenAICompatibleServer",
    "ENV_BASE_URL",
    "ENV_API_KEY",
]

log = get_logger(__name__)

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


def _check_messages(messages: Any) -> list[Message]:
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


def _check_params(max_tokens: int, temperature: float, seed: int) -> None:
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
    out = np.asarray(fn([_check_messages(m) for m in batch], list(choices)), dtype=np.float64)
    if out.shape != (len(batch), len(choices)):
        raise LLMError(f"choice_logprobs of {client!r} returned shape {out.shape}, expected "
                       f"{(len(batch), len(choices))}.")
    return out


# ----------------------------------------------------------------------------------------------
# A local transformers chat model
_MIN_SHARED_PROMPT = 16  # shared leading tokens of a call's prompts worth a cached prefix


def _common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest common prefix of ``seqs``, leaving every sequence at least one token of its own."""
    first = seqs[0]
    n = min(len(x) for x in seqs) - 1
    k = 0
    while k < n and all(x[k] == first[k] for x in seqs):
        k += 1
    return list(first[:k])


class LocalChatLLM:
    """A causal LM from :func:`irm.models.load_model` used as a chat model.

    ``model`` is a model spec (default: the embedded SmolLM2-135M-Instruct) or an already
    :class:`~irm.models.LoadedModel` (so a pipeline reuses the base model it has in memory).
    The tokenizer's chat template renders the messages; a tokenizer without one gets a plain
    ``role: content`` transcript. When sampling, each prompt draws from its own random stream keyed
    by ``(seed, prompt)`` (:class:`irm.evaluate.RowSampler`), so a reply depends only on its messages
    and seed, never on how the prompts are batched or on the caller's global RNG.

    >>> llm = LocalChatLLM("smollm2-135m-instruct")
    >>> llm.complete([{"role": "user", "content": "Name a colour."}], max_tokens=8)
    """

    def __init__(
        self,
        model: Any = None,
        *,
        device: str | None = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
        name: str | None = None,
    ) -> None:
        from irm.constants import DEFAULT_MODEL
        from irm.models import LoadedModel, load_model

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if model is None:
            model = DEFAULT_MODEL
        if isinstance(model, LoadedModel):
            self.model = model
        elif isinstance(model, (str, os.PathLike)):
            self.model = load_model(str(model), device=device, dtype=dtype)
        else:
            raise TypeError(
                f"model must be a model spec (str) or an irm.models.LoadedModel, got {type(model).__name__}"
            )
        ident = self.model.identity
        self.batch_size = int(batch_size)
        self.name = name or f"local:{ident.spec}"
        # The weights fingerprint makes the cache forget replies of a model that was rebuilt or retuned.
        # Mixed precision changes replies: its cached replies are kept apart from float32 ones.
        self.cache_id = f"local:{ident.fingerprint or ident.checkpoint}" + (
            f":{ident.compute_dtype}" if getattr(ident, "compute_dtype", None) else "")
        # Log-probabilities at the end of recently generated-from prompts: the first step of generation
        # computes exactly what choice_logprobs asks for, so asking for a label's probabilities after
        # generating it costs no second pass over the (often long, few-shot) prompt.
        self._prompt_end_lp: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._prompt_end_lp_max = 256

    def render(self, messages: list[Message]) -> str:
        """The prompt text the model sees for ``messages`` (chat template + generation prompt)."""
        tok = self.model.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def complete(
        self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0
    ) -> str:
        return self.complete_many([messages], max_tokens=max_tokens, temperature=temperature, seed=seed)[0]

    def complete_many(
        self, batch: Sequence[list[Message]], *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        from irm.models import unwrapped

        with unwrapped(self.model.hf_model):  # no TransformerBridge wrappers: generation needs no hook
            return self._complete_many(batch, max_tokens=max_tokens, temperature=temperature, seed=seed)

    def _complete_many(self, batch: Sequence[list[Message]], *, max_tokens: int, temperature: float,
                       seed: int) -> list[str]:
        from transformers import GenerationConfig

        _check_params(max_tokens, temperature, seed)
        texts = [self.render(_check_messages(m)) for m in batch]
        if not texts:
            return []
        hf, tok = self.model.hf_model, self.model.tokenizer
        n_ctx = int(getattr(hf.config, "max_position_embeddings", 0) or 0)
        greedy = temperature == 0
        eos = tok.eos_token_id
        # Sampling is a Gumbel-max draw per prompt from its own stream (irm.evaluate.RowSampler), keyed by
        # (seed, prompt): a reply does not depend on the batch it was asked in, which the reply cache
        # (keyed by messages and seed) relies on.
        gen_cfg = GenerationConfig(
            max_new_tokens=int(max_tokens), do_sample=False, use_cache=True,
            output_logits=True, return_dict_in_generate=True, temperature=None, top_k=None, top_p=None,
            pad_token_id=tok.pad_token_id, eos_token_id=eos,
        )
        from irm.evaluate import text_key

        keys = [(seed, text_key(t), 0) for t in texts]
        sampler = None if greedy else float(temperature)
        # The chat template already holds the special tokens (BOS, <|im_start|>...).
        ids_all = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        longest = max(len(x) for x in ids_all)
        if n_ctx and longest + max_tokens > n_ctx:
            raise ValueError(
                f"{self.name}: a prompt of {longest} tokens plus max_tokens={max_tokens} exceeds the "
                f"model's context of {n_ctx} tokens; shorten the messages or lower max_tokens."
            )
        from irm.models import compute_dtype
        from irm.threads import ModelThreads, side_by_side_enabled

        mixed = compute_dtype(hf) != hf.dtype  # set_compute_dtype: the prefix check runs in float32
        prefix = _common_prefix(ids_all) if len(texts) > 1 else []
        cache = self._prefill(prefix) if len(prefix) >= _MIN_SHARED_PROMPT else None
        # Batches of prompts of similar length (longest first), so little of a batch is padding. On a CPU
        # with two or more threads, two batches run at once, one thread each (irm.threads): a generation
        # step of a small model uses one core better than two (1.5-1.7x the throughput, bench_threads.py).
        side = len(texts) > 1 and side_by_side_enabled([self.model, self.model], distinct=False)
        n_chunks = -(-len(texts) // self.batch_size)
        n_chunks += side and n_chunks % 2
        order = sorted(range(len(texts)), key=lambda i: (-len(ids_all[i]), i))
        chunks = [c.tolist() for c in np.array_split(np.asarray(order), n_chunks)]
        out: list[str | None] = [None] * len(texts)
        step = 2 if side else 1
        with ModelThreads([self.model] * step, enabled=side, distinct=False) as mt:
            for r0 in range(0, len(chunks), step):
                group = list(range(r0, min(r0 + step, len(chunks))))

                def run(c: int, shared):
                    idx = chunks[c]
                    args = ([ids_all[i] for i in idx], gen_cfg, [keys[i] for i in idx], sampler)
                    return self._generate(*args, shared, len(prefix)) if shared is not None else self._generate(*args)

                results = mt.map([lambda c=c, shared=cache: run(c, shared) for c in group])
                if r0 == 0 and cache is not None:  # once per call: the cached prefix against a plain pass
                    first = ids_all[chunks[0][0]]
                    if not (self._prefix_ok_in_float32(first, prefix, gen_cfg) if mixed
                            else self._prefix_ok(first, results[0][0].logits[0][0])):
                        cache = None
                        results = mt.map([lambda c=c: run(c, None) for c in group])
                for c, (res, width) in zip(group, results, strict=True):
                    idx = chunks[c]
                    self._remember_prompt_ends([texts[i] for i in idx], res.logits[0])
                    replies = tok.batch_decode(res.sequences[:, width:], skip_special_tokens=True)
                    for i, reply in zip(idx, replies, strict=True):
                        out[i] = reply.strip()
        return [x if x is not None else "" for x in out]

    def _generate(self, chunk_ids: list[list[int]], gen_cfg, keys: list[tuple[int, int, int]],
                  temperature: float | None, cache=None, n_prefix: int = 0):
        """``hf.generate`` on one batch: left-padded prompts, or with ``cache`` (the key/value cache of
        the first ``n_prefix`` tokens, which every prompt shares) [prefix, pads, rest] rows whose
        positions skip the pads, so only the rest is run. ``temperature`` None is greedy, else each row
        samples from the stream of its key. Returns the output and the input width."""
        import copy

        import torch

        from irm.evaluate import RowSampler

        hf, dev = self.model.hf_model, self.model.device
        pad = self.model.tokenizer.pad_token_id
        rest = [x[n_prefix:] for x in chunk_ids]
        w = max(len(x) for x in rest)
        ids = torch.full((len(rest), n_prefix + w), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (full, tail) in enumerate(zip(chunk_ids, rest, strict=True)):
            ids[r, :n_prefix], mask[r, :n_prefix] = torch.tensor(full[:n_prefix], dtype=torch.long), 1
            ids[r, n_prefix + w - len(tail):], mask[r, n_prefix + w - len(tail):] = torch.tensor(tail), 1
        kw = {}
        if cache is not None:
            past = copy.deepcopy(cache)  # generation appends to the cache it is given
            if len(rest) > 1:
                past.batch_repeat_interleave(len(rest))
            kw["past_key_values"] = past
        if temperature is not None:
            kw["logits_processor"] = RowSampler.processors(keys, dev, temperature=temperature)
        with torch.no_grad():
            res = hf.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen_cfg, **kw)
        return res, ids.shape[1]

    def _prefill(self, prefix: list[int]):
        """The key/value cache of ``prefix`` (the start every prompt of a call shares: system prompt,
        instructions, few-shot examples), computed once per call."""
        import torch
        from transformers import DynamicCache

        hf, dev = self.model.hf_model, self.model.device
        cache = DynamicCache(config=hf.config)
        try:
            with torch.no_grad():
                hf.base_model(input_ids=torch.tensor([prefix], device=dev), past_key_values=cache, use_cache=True)
        except Exception as e:  # noqa: BLE001 - a model without a usable cache: no sharing
            log.warning("%s: cannot cache the shared prompt prefix (%s: %s); generating without it.",
                        self.name, type(e).__name__, e)
            return None
        return cache

    def _prefix_ok_in_float32(self, ids: list[int], prefix: list[int], gen_cfg) -> bool:
        """:meth:`_prefix_ok` for a model in mixed precision: the prefix cache and one generation step
        redone in float32 (:func:`irm.models.float32_compute`), so the check stays exact."""
        import copy

        from irm.models import float32_compute

        one = copy.deepcopy(gen_cfg)
        one.max_new_tokens = 1
        with float32_compute(self.model.hf_model):
            cache = self._prefill(prefix)
            if cache is None:
                return False
            res, _ = self._generate([ids], one, [(0, 0, 0)], None, cache, len(prefix))
            return self._prefix_ok(ids, res.logits[0][0])

    def _prefix_ok(self, ids: list[int], first_logits) -> bool:
        """The first generated step through the shared-prefix cache against a plain forward pass of the
        same prompt (once per call): a model that mishandles the cache falls back to plain batches."""
        import torch

        hf, dev = self.model.hf_model, self.model.device
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids], device=dev), logits_to_keep=1).logits[0, -1]
        from irm.models import shared_pass_check

        want = torch.log_softmax(logits.float(), -1)
        got = torch.log_softmax(first_logits.float().to(want.device), -1)
        ok, err = shared_pass_check(got, want, hf)
        if not ok:
            log.warning("%s: generation through the shared prompt prefix differs from a plain pass (%.2g); "
                        "generating without it.", self.name, err)
            return False
        return True

    def choice_logprobs(self, batch: Sequence[list[Message]], choices: Sequence[str]) -> np.ndarray:
        """Log-probability of each choice's first token as the reply's first token (see
        :func:`choice_logprobs`); left-padded batches of ``batch_size``."""
        from irm.models import unwrapped

        with unwrapped(self.model.hf_model):
            return self._choice_logprobs(batch, choices)

    def _choice_logprobs(self, batch: Sequence[list[Message]], choices: Sequence[str]) -> np.ndarray:
        import torch

        tok = self.model.tokenizer
        first = []
        for c in choices:
            ids = tok(c, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"choice {c!r} tokenizes to nothing")
            first.append(ids[0])
        if len(set(first)) != len(first):
            raise ValueError(f"choices {list(choices)!r} share their first token; pick choices that differ "
                             "in their first token (e.g. '1' and '0').")
        texts = [self.render(_check_messages(m)) for m in batch]
        hf, dev = self.model.hf_model, self.model.device
        out = np.zeros((len(texts), len(first)))
        todo = []
        for i, t in enumerate(texts):
            if t in self._prompt_end_lp:  # generated from moments ago: the first step's log-probabilities
                out[i] = self._prompt_end_lp[t][first].numpy()
            else:
                todo.append(i)
        side = tok.padding_side
        tok.padding_side = "left"  # the last position of every row is then the prompt's end
        try:
            for start in range(0, len(todo), self.batch_size):
                rows = todo[start: start + self.batch_size]
                enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(dev)
                with torch.no_grad():
                    try:  # only the last position's logits: the unembedding of every position is waste
                        logits = hf(**enc, logits_to_keep=1).logits[:, -1].float()
                    except TypeError:  # models without logits_to_keep
                        logits = hf(**enc).logits[:, -1].float()
                lp = torch.log_softmax(logits, -1)[:, first]
                out[rows] = lp.cpu().numpy()
        finally:
            tok.padding_side = side
        return out

    def _remember_prompt_ends(self, texts: Sequence[str], first_logits) -> None:
        import torch

        lps = torch.log_softmax(first_logits.float(), -1).cpu()
        for t, lp in zip(texts, lps, strict=True):
            self._prompt_end_lp[t] = lp.clone()
            self._prompt_end_lp.move_to_end(t)
        while len(self._prompt_end_lp) > self._prompt_end_lp_max:
            self._prompt_end_lp.popitem(last=False)

    def __repr__(self) -> str:
        return f"LocalChatLLM(name={self.name!r}, batch_size={self.batch_size})"


# ----------------------------------------------------------------------------------------------
# Any OpenAI-compatible server
class _SecretFilter(logging.Filter):
    """Masks the endpoint and key in records of the HTTP/SDK loggers (httpx logs every request URL)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(s in msg for s in self.secrets):
            for s in self.secrets:
                msg = msg.replace(s, "<redacted>")
            record.msg, record.args = msg, None
        return True


# Logger filters are not inherited by child loggers, so each logger that may print a URL is named.
_SDK_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "httpcore.connection", "httpcore2.connection",
                "httpcore.http11", "httpcore2.http11", "httpcore.proxy", "httpcore2.proxy", "openai",
                "openai._base_client")


def _mask_in_sdk_logs(*secrets: str | None) -> None:
    values = [s for s in secrets if s]
    if not values:
        return
    from urllib.parse import urlsplit

    for v in list(values):
        host = urlsplit(v).hostname if "://" in v else None
        if host:  # httpcore logs host and port separately
            values.append(host)
    flt = _SecretFilter([v.rstrip("/") for v in values])
    for name in _SDK_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _SecretFilter) and f.secrets == flt.secrets for f in lg.filters):
            lg.addFilter(flt)


def _first_env(names: Sequence[str]) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


class OpenAICompatibleLLM:
    """Chat completions from an OpenAI-compatible server through the ``openai`` package.

    The endpoint comes from ``$IRM_LLM_BASE_URL`` (else ``$OPENAI_BASE_URL``, else OpenAI's API) and
    the key from ``$IRM_LLM_API_KEY`` (else ``$OPENAI_API_KEY``; a local server without auth needs
    none). Neither is ever logged, stored on a config, put in ``repr`` or hashed into a cache key.

    Connection errors, timeouts, HTTP 429 and 5xx are retried ``max_retries`` times with exponential
    backoff (``backoff_s * 2**attempt``, capped at ``max_backoff_s``; a 429's ``Retry-After`` is
    honoured up to that cap). Any other 4xx means the request itself is wrong and fails at once.
    :attr:`stats` counts requests, retries and failures.

    >>> os.environ["IRM_LLM_BASE_URL"] = "http://127.0.0.1:8000/v1"   # e.g. vLLM or transformers serve
    >>> llm = OpenAICompatibleLLM("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> llm.complete([{"role": "user", "content": "Hi"}], max_tokens=8)
    """

    def __init__(
        self,
        model: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        name: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not model or not isinstance(model, str):
            raise ValueError(f"model must be the server's model name (a non-empty str), got {model!r}")
        if max_retries < 0 or backoff_s < 0 or max_backoff_s < 0 or timeout <= 0:
            raise ValueError(
                f"need max_retries >= 0, backoff_s >= 0, max_backoff_s >= 0 and timeout > 0; got "
                f"{max_retries}, {backoff_s}, {max_backoff_s}, {timeout}"
            )
        base_url, api_key = _first_env(ENV_BASE_URL), _first_env(ENV_API_KEY)
        if not base_url and not api_key:
            raise LLMError(
                "OpenAICompatibleLLM needs an endpoint: set IRM_LLM_BASE_URL (e.g. a local "
                "OpenAI-compatible server, http://127.0.0.1:8000/v1) and/or IRM_LLM_API_KEY (for OpenAI's API) "
                "in the environment. They are read from the environment only, never from a config file."
            )
        from openai import OpenAI

        _mask_in_sdk_logs(base_url, api_key)
        # The SDK's own retries are off: ours are explicit, counted and testable.
        self._client = OpenAI(base_url=base_url or None, api_key=api_key or "no-key", timeout=timeout,
                              max_retries=0)
        self.model = model
        self.name = name or f"openai:{model}"
        self.cache_id = self.name  # the endpoint is deliberately not part of it (it may be sensitive)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._sleep = sleep
        self.stats = {"requests": 0, "retries": 0, "failures": 0}

    def __repr__(self) -> str:  # never the URL or the key
        return f"OpenAICompatibleLLM(model={self.model!r}, max_retries={self.max_retries})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("OpenAICompatibleLLM holds credentials and cannot be pickled; build it again from "
                        "the environment where it is needed (build_llm('openai', model=...)).")

    def _delay(self, attempt: int, err: Exception) -> float:
        delay = self.backoff_s * (2**attempt)
        resp = getattr(err, "response", None)
        retry_after = resp.headers.get("retry-after") if resp is not None else None
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, self.max_backoff_s)

    def complete(
        self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0
    ) -> str:
        import openai

        messages = _check_messages(messages)
        _check_params(max_tokens, temperature, seed)
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            self.stats["requests"] += 1
            try:
                resp = self._client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=max_tokens, temperature=float(temperature),
                    seed=seed,
                )
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
                last = e
                if attempt == self.max_retries:
                    break
                self.stats["retries"] += 1
                delay = self._delay(attempt, e)
                log.warning("%s: transient error (%s), retry %d/%d in %.2fs", self.name, _describe(e),
                            attempt + 1, self.max_retries, delay)
                self._sleep(delay)
                continue
            except openai.APIStatusError as e:
                self.stats["failures"] += 1
                raise LLMError(
                    f"{self.name}: the server rejected the request with HTTP {e.status_code} ({_describe(e)}); "
                    "a 4xx is not retried: check the model name, the parameters and the API key."
                ) from None
            except (openai.APIResponseValidationError, ValueError) as e:  # ValueError: a body that is not JSON
                self.stats["failures"] += 1
                raise LLMError(
                    f"{self.name}: the server's reply is not a valid chat completion ({type(e).__name__}: "
                    f"{str(e)[:120]}); is the endpoint an OpenAI-compatible /v1/chat/completions?"
                ) from None
            return self._content(resp)
        self.stats["failures"] += 1
        raise LLMError(
            f"{self.name}: gave up after {self.max_retries + 1} attempts; last error: {_describe(last)}. "
            "Check that the server is up and reachable, or raise max_retries."
        ) from None

    def _content(self, resp: Any) -> str:
        choices = getattr(resp, "choices", None)
        if not choices:
            self.stats["failures"] += 1
            raise LLMError(
                f"{self.name}: the server answered without choices (got {type(resp).__name__} "
                f"{str(resp)[:120]!r}); is it an OpenAI-compatible /v1/chat/completions endpoint?"
            )
        content = choices[0].message.content
        return "" if content is None else str(content)


def _describe(err: Exception | None) -> str:
    if err is None:
        return "none"
    status = getattr(err, "status_code", None)
    # The SDK's messages hold the server's error text, never the request URL or headers.
    msg = str(getattr(err, "message", "") or err)[:200]
    return f"{type(err).__name__}" + (f" {status}" if status else "") + (f": {msg}" if msg else "")


# ----------------------------------------------------------------------------------------------
# Disk cache
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
        _check_params(max_tokens, temperature, seed)
        params = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        batch = [_check_messages(m) for m in batch]
        keys = [self.key(m, **params) for m in batch]
        out: list[str | None] = [self._get(k) for k in keys]
        todo = [i for i, r in enumerate(out) if r is None]
        self.stats.hits += len(batch) - len(todo)
        self.stats.misses += len(todo)
        if todo:
            # The same conversation twice in one batch is asked once.
            uniq = list(dict.fromkeys(keys[i] for i in todo))
            first = {k: next(i for i in todo if keys[i] == k) for k in uniq}
            replies = complete_many(self.client, [batch[first[k]] for k in uniq], **params)
            for k, r in zip(uniq, replies, strict=True):
                self._put(k, batch[first[k]], params, r)
            got = dict(zip(uniq, replies, strict=True))
            for i in todo:
                out[i] = got[keys[i]]
        return [str(r) for r in out]

    def choice_logprobs(self, batch: Sequence[list[Message]], choices: Sequence[str]) -> np.ndarray:
        """:func:`choice_logprobs` of the wrapped client, cached like replies (a cached entry holds the
        numbers as its reply)."""
        batch = [_check_messages(m) for m in batch]
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
            fresh = choice_logprobs(self.client, [batch[i] for i in todo], choices)
            for i, row in zip(todo, fresh, strict=True):
                out[i] = [float(x) for x in row]
                self._put(keys[i], batch[i], params, json.dumps(out[i]))
        return np.asarray(out, dtype=np.float64)

    def __repr__(self) -> str:
        return f"CachedLLM({self.client!r}, hits={self.stats.hits}, misses={self.stats.misses})"


# ----------------------------------------------------------------------------------------------
# Reply parsing
class ReplyParseError(ValueError):
    """Raised by a parser when a reply does not have the expected form (caught by parse_reply)."""


@dataclass(frozen=True)
class ParsedReply:
    """The outcome of parsing one reply: ``ok`` with a ``value``, or not ok with an ``error``.

    ``excerpt`` is the start of the raw text, so a failure can be inspected in a results file.
    """

    kind: str
    ok: bool
    value: Any = None
    error: str | None = None
    excerpt: str = ""

    def unwrap(self) -> Any:
        """The value; raises :class:`ReplyParseError` when parsing failed."""
        if not self.ok:
            raise ReplyParseError(f"{self.kind} reply did not parse ({self.error}): {self.excerpt!r}")
        return self.value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ParseLog:
    """Counts of parsed and failed replies per kind, with the first ``max_failures`` failures kept.

    >>> plog = ParseLog()
    >>> _ = parse_reply("maybe", "label01", log=plog)
    >>> plog.counts
    {'label01': {'ok': 0, 'failed': 1}}
    """

    max_failures: int = 50
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def record(self, parsed: ParsedReply, **context: Any) -> ParsedReply:
        c = self.counts.setdefault(parsed.kind, {"ok": 0, "failed": 0})
        c["ok" if parsed.ok else "failed"] += 1
        if not parsed.ok and len(self.failures) < self.max_failures:
            self.failures.append({"kind": parsed.kind, "error": parsed.error, "excerpt": parsed.excerpt, **context})
        return parsed

    @property
    def n_failed(self) -> int:
        return sum(c["failed"] for c in self.counts.values())

    @property
    def n_ok(self) -> int:
        return sum(c["ok"] for c in self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "n_ok": self.n_ok, "n_failed": self.n_failed, "failures": self.failures}


REPLY_PARSERS: dict[str, Callable[..., Any]] = {}


def register_parser(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(text, **options) -> value`` (raising :class:`ReplyParseError`) as a reply kind."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if kind in REPLY_PARSERS:
            raise ValueError(f"Reply parser {kind!r} is registered twice.")
        REPLY_PARSERS[kind] = fn
        return fn

    return deco


def parse_reply(text: Any, kind: str, *, log: ParseLog | None = None, excerpt_chars: int = 200,
                **options: Any) -> ParsedReply:
    """Parse an LLM reply of form ``kind`` (see :data:`REPLY_PARSERS`); never raises on a bad reply.

    Kinds: ``"label01"`` (a 0/1 or yes/no label), ``"json"`` (the first JSON object in the text),
    ``"spans"`` (a list of phrases; ``source=`` keeps those that occur in it), ``"mapping"`` (phrase ->
    rewrite pairs, JSON or ``a -> b`` lines; ``source=`` as for spans), ``"text"`` (a rewritten text,
    stripped of fences, quotes and "Here is..." preambles).

    >>> parse_reply('Sure: ["boring", "awful"]', "spans", source="A boring, awful film").value
    ['boring', 'awful']
    >>> r = parse_reply("no idea", "json"); (r.ok, r.error)
    (False, 'no JSON object found')
    """
    if kind not in REPLY_PARSERS:
        close = difflib.get_close_matches(kind, REPLY_PARSERS, n=1)
        raise ValueError(f"Unknown reply kind {kind!r}; valid kinds: {sorted(REPLY_PARSERS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    raw = "" if text is None else str(text)
    excerpt = raw[:excerpt_chars]
    try:
        result = ParsedReply(kind, True, REPLY_PARSERS[kind](raw, **options), None, excerpt)
    except ReplyParseError as e:
        result = ParsedReply(kind, False, None, str(e), excerpt)
    if log is not None:
        log.record(result)
    return result


_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)


def _unfence(text: str) -> str:
    m = _FENCE.search(text)
    return m.group(1) if m else text


def _json_values(text: str, opener: str):
    """Every JSON value starting at an ``opener`` character, in order."""
    dec = json.JSONDecoder()
    for src in dict.fromkeys((_unfence(text), text)):
        for m in re.finditer(re.escape(opener), src):
            try:
                yield dec.raw_decode(src, m.start())[0]
            except ValueError:
                continue


@register_parser("label01")
def _parse_label01(text: str) -> int:
    """A leading 0/1, a leading "yes"/"no"/"true"/"false" standing alone ("No, ...", "Yes | x", not "no idea"),
    else the one digit 0 or 1 that appears as a label anywhere ("Label: 1")."""
    t = text.strip().lower()
    m = re.match(r"^\W*([01])(?!\w|\.\d)", t) or re.match(r"^\W*(yes|no|true|false)\s*(?:[.,:;!)|\-]|$)", t)
    if m:
        return int(m.group(1) in ("1", "yes", "true"))
    found = {int(x) for x in re.findall(r"(?<![\w.])([01])(?!\w|\.\d)", t)}
    if len(found) == 1:
        return found.pop()
    raise ReplyParseError("no 0/1 label found" if not found else "ambiguous: both 0 and 1 appear")


@register_parser("json")
def _parse_json(text: str, required_keys: Sequence[str] = ()) -> dict[str, Any]:
    for v in _json_values(text, "{"):
        if isinstance(v, dict):
            missing = [k for k in required_keys if k not in v]
            if missing:
                raise ReplyParseError(f"JSON object lacks key(s) {missing}")
            return v
    raise ReplyParseError("no JSON object found")


def _in_source(phrases: list[str], source: str | None) -> list[str]:
    if source is None:
        return phrases
    low = source.lower()
    return [p for p in phrases if p.lower() in low]


@register_parser("spans")
def _parse_spans(text: str, source: str | None = None, max_spans: int | None = None) -> list[str]:
    spans: list[str] | None = None
    for v in _json_values(text, "["):
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            spans = v
            break
    if spans is None:
        for v in _json_values(text, "{"):
            if isinstance(v, dict):
                lists = [x for x in v.values() if isinstance(x, list) and all(isinstance(s, str) for s in x)]
                if lists:
                    spans = lists[0]
                    break
    if spans is None:  # bullets, numbered lines or quoted phrases
        lines = [re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", "", ln) for ln in text.splitlines()
                 if re.match(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", ln)]
        spans = lines or re.findall(r'"([^"\n]{1,80})"', text)
    spans = [s.strip().strip("\"'").strip() for s in spans]
    spans = list(dict.fromkeys(s for s in spans if s))
    if not spans:
        raise ReplyParseError("no spans found (expected a JSON list of strings)")
    kept = _in_source(spans, source)
    if not kept:
        raise ReplyParseError(f"none of the {len(spans)} spans occurs in the source text")
    return kept[:max_spans] if max_spans else kept


@register_parser("mapping")
def _parse_mapping(text: str, source: str | None = None) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for v in _json_values(text, "{"):
        if isinstance(v, dict):
            pairs = {str(k).strip(): str(x).strip() for k, x in v.items() if isinstance(x, (str, int, float))}
            if pairs:
                break
    if not pairs:
        for ln in text.splitlines():
            m = re.match(r'^\s*(?:[-*\u2022]|\d+[.)])?\s*"?([^"\n]+?)"?\s*(?:->|=>|\u2192)\s*"?([^"\n]*?)"?\s*$', ln)
            if m:
                pairs[m.group(1).strip()] = m.group(2).strip()
    if not pairs:
        raise ReplyParseError("no phrase -> rewrite pairs found (expected a JSON object)")
    if source is not None:
        low = source.lower()
        pairs = {k: v for k, v in pairs.items() if k and k.lower() in low}
        if not pairs:
            raise ReplyParseError("none of the phrases to rewrite occurs in the source text")
    pairs = {k: v for k, v in pairs.items() if k and k != v}
    if not pairs:
        raise ReplyParseError("every rewrite equals its phrase (nothing changed)")
    return pairs


_PREAMBLE = re.compile(r"^\s*(?:sure[,!.]?\s*)?(?:here(?:'s| is)[^:\n]*:|rewritten(?: response| text)?:|"
                       r"response:|answer:)\s*", re.I)


@register_parser("text")
def _parse_text(text: str) -> str:
    t = _unfence(text).strip()
    t = _PREAMBLE.sub("", t).strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    if not t:
        raise ReplyParseError("empty reply")
    return t


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


register_llm("local")(LocalChatLLM)
register_llm("openai")(OpenAICompatibleLLM)


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


def _h(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class LLMConfig:
    """Which LLM to use and how; no secrets (those come from the environment).

    >>> LLMConfig(kind="openai", model="gpt-4o-mini").build()   # needs IRM_LLM_BASE_URL / IRM_LLM_API_KEY
    """

    kind: str = _h("LLM backend: 'local' (a transformers chat model) or 'openai' (an OpenAI-compatible "
                   "server; endpoint and key from $IRM_LLM_BASE_URL / $IRM_LLM_API_KEY).", "local")
    model: str = _h("local: a model spec (e.g. 'smollm2-135m-instruct', 'tiny-llama', a hub name); "
                    "openai: the server's model name.", "smollm2-135m-instruct")
    max_tokens: int = _h("Most new tokens per reply.", 96)
    temperature: float = _h("Sampling temperature; 0 = greedy.", 0.0)
    seed: int = _h("Seed of sampling (and of the cache key).", 0)
    cache: bool = _h("Cache replies on disk so reruns are free.", True)
    cache_dir: str | None = _h("Cache directory; empty: $IRM_CACHE_DIR/llm.", None)
    params: dict[str, Any] = _h("Extra keyword arguments of the backend (local: device, batch_size; "
                                "openai: timeout, max_retries, backoff_s). Never a secret.", factory=dict)

    def __post_init__(self) -> None:
        from irm.tracking import redact

        if self.kind not in LLM_CLIENTS:
            close = difflib.get_close_matches(self.kind, LLM_CLIENTS, n=1)
            raise ValueError(f"llm kind {self.kind!r} is unknown; valid kinds: {sorted(LLM_CLIENTS)}"
                             + (f" (did you mean {close[0]!r}?)" if close else "") + ".")
        if not self.model:
            raise ValueError("llm model is empty; name a model spec (local) or the server's model name (openai).")
        _check_params(self.max_tokens, self.temperature, self.seed)
        if redact(self.params) != self.params or any(k in ("api_key", "base_url") for k in self.params):
            raise ValueError(
                "llm params hold a secret or an endpoint; those are read from the environment "
                f"({ENV_BASE_URL[0]}, {ENV_API_KEY[0]}), never from a config. Remove it from [..llm.params]."
            )

    @property
    def generation(self) -> dict[str, Any]:
        """``max_tokens``, ``temperature`` and ``seed`` as keyword arguments of ``complete``."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "seed": self.seed}

    def build(self, *, model: Any = None) -> LLMClient:
        """The client (wrapped in :class:`CachedLLM` when ``cache``). ``model`` overrides ``self.model``
        (e.g. a :class:`~irm.models.LoadedModel` already in memory)."""
        client = build_llm(self.kind, model=model if model is not None else self.model, **self.params)
        if not self.cache:
            return client
        if self.cache_dir:
            root = Path(self.cache_dir)
        else:
            from irm.models import cache_dir

            root = cache_dir() / "llm"
        return CachedLLM(client, root)


# ----------------------------------------------------------------------------------------------
# A loopback OpenAI-compatible server (stdlib only): tests, and exposing a local model to OpenAI tools
@dataclass(frozen=True)
class Fault:
    """One injected answer of :class:`OpenAICompatibleServer` in place of the model's.

    ``status``: answer with this HTTP error status (e.g. 500, 429, 400); ``retry_after``: with a
    ``Retry-After`` header; ``reply``: answer 200 with this content; ``body``: answer 200 with these raw
    bytes (a malformed response).
    """

    status: int | None = None
    reply: str | None = None
    body: bytes | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.status, self.reply, self.body)) != 1:
            raise ValueError(f"A Fault sets exactly one of status, reply, body; got {self!r}")


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class OpenAICompatibleServer:
    """Serve an :class:`LLMClient` at ``http://127.0.0.1:PORT/v1/chat/completions`` in a thread.

    Loopback only. The request loop is bounded: it stops itself after ``max_requests`` requests or
    ``lifetime_s`` seconds, or on :meth:`stop` (a context manager calls it). Faults queued with
    :meth:`inject` answer the next requests in order. :attr:`requests` keeps each request's JSON body
    and whether it carried an ``Authorization`` header (never the header itself).

    >>> with OpenAICompatibleServer(LocalChatLLM("tiny-llama"), model_name="tiny") as srv:
    ...     srv.inject(Fault(status=500), Fault(status=429))
    ...     os.environ["IRM_LLM_BASE_URL"] = srv.base_url
    ...     OpenAICompatibleLLM("tiny", backoff_s=0.01).complete([{"role": "user", "content": "hi"}])
    """

    def __init__(self, client: LLMClient, *, model_name: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 max_requests: int = 1000, lifetime_s: float = 600.0, max_body_bytes: int = 1 << 20) -> None:
        if host not in _LOOPBACK:
            raise ValueError(f"host must be a loopback address {_LOOPBACK}, got {host!r}; this server has no auth.")
        if max_requests < 1 or lifetime_s <= 0:
            raise ValueError(f"need max_requests >= 1 and lifetime_s > 0, got {max_requests}, {lifetime_s}")
        self.client = client
        self.model_name = model_name or client.name
        self.max_requests = int(max_requests)
        self.lifetime_s = float(lifetime_s)
        self.max_body_bytes = int(max_body_bytes)
        self.requests: list[dict[str, Any]] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._httpd = HTTPServer((host, port), self._handler_class())
        self._httpd.timeout = 0.1
        self.host, self.port = host, int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def start(self) -> OpenAICompatibleServer:
        if self._thread is not None:
            raise RuntimeError("This server was already started; make a new one.")
        self._thread = threading.Thread(target=self._loop, name=f"llm-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        deadline = time.monotonic() + self.lifetime_s
        try:
            while not self._stop.is_set() and len(self.requests) < self.max_requests and time.monotonic() < deadline:
                self._httpd.handle_request()  # returns after `timeout` when idle
        finally:
            self._httpd.server_close()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._httpd.server_close()

    def __enter__(self) -> OpenAICompatibleServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
                body = {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                                  "code": status}}
                self._send(status, json.dumps(body).encode(), headers)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/") in ("/v1/models", "/models"):
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": server.model_name, "object": "model", "owned_by": "irm"}]}).encode())
                elif self.path.rstrip("/") == "/health":
                    self._send(200, b'{"status": "ok"}')
                else:
                    self._error(404, f"no route {self.path}")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                if length > server.max_body_bytes:
                    self._error(413, f"body of {length} bytes exceeds {server.max_body_bytes}")
                    return
                raw = self.rfile.read(length)
                try:
                    req = json.loads(raw or b"{}")
                except ValueError:
                    self._error(400, "body is not JSON")
                    return
                server.requests.append({"path": self.path, "body": req,
                                        "authorized": bool(self.headers.get("Authorization"))})
                if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                    self._error(404, f"no route {self.path}")
                    return
                fault = server._next_fault()
                if fault is not None and fault.status is not None:
                    hdr = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
                    self._error(fault.status, f"injected fault {fault.status}", hdr)
                    return
                if fault is not None and fault.body is not None:
                    self._send(200, fault.body)
                    return
                if req.get("model") not in (server.model_name, None):
                    self._error(404, f"model {req.get('model')!r} not found; this server serves {server.model_name!r}")
                    return
                try:
                    messages = _check_messages(req.get("messages"))
                    text = fault.reply if fault is not None else server.client.complete(
                        messages, max_tokens=int(req.get("max_tokens") or 256),
                        temperature=float(req.get("temperature") or 0.0), seed=int(req.get("seed") or 0))
                except (TypeError, ValueError) as e:
                    self._error(400, str(e))
                    return
                except Exception as e:  # the model failed: a 500, as a real server would answer
                    self._error(500, f"{type(e).__name__}: {e}")
                    return
                body = {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": int(time.time()),
                    "model": server.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                }
                self._send(200, json.dumps(body).encode())

        return Handler
