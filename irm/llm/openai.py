"""``kind = "openai"``: any OpenAI-compatible ``/v1/chat/completions`` server (OpenAI, vLLM, Ollama,
llama.cpp, ``transformers serve``). The base URL and API key come from the environment
(``IRM_LLM_BASE_URL``/``OPENAI_BASE_URL``, ``IRM_LLM_API_KEY``/``OPENAI_API_KEY``) and are never logged,
saved, hashed into cache keys or shown in a repr. Transient errors (connection, 429, 5xx) are retried
with exponential backoff; other 4xx are not. Token log-probabilities (calibrated labels, scored
explanations) are asked for with ``logprobs``/``top_logprobs`` where the server returns them."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from irm.core.log import get_logger
from irm.llm.base import (
    ENV_API_KEY,
    ENV_BASE_URL,
    LLMError,
    Message,
    check_messages,
    check_params,
    register_llm,
)

__all__ = ["OpenAICompatibleLLM"]

log = get_logger(__name__)

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


@register_llm("openai")
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
        top_logprobs: int = 20,
        name: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not model or not isinstance(model, str):
            raise ValueError(f"model must be the server's model name (a non-empty str), got {model!r}")
        if not 1 <= top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [1, 20] (the OpenAI API's range), got {top_logprobs!r}")
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
        self.top_logprobs = int(top_logprobs)
        self.logprobs_unavailable: str | None = None  # why, once the server has shown it has none
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "logprob_requests": 0,
                      "choices_outside_top_logprobs": 0}

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
        messages = check_messages(messages)
        check_params(max_tokens, temperature, seed)
        return self._content(self._create(messages, max_tokens=max_tokens, temperature=float(temperature),
                                          seed=seed))

    def _create(self, messages: list[Message], **params: Any) -> Any:
        """One chat completion, with the retries of transient errors."""
        import openai

        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            self.stats["requests"] += 1
            try:
                return self._client.chat.completions.create(model=self.model, messages=messages, **params)
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
                what = "a request for token log-probabilities" if "logprobs" in params else "the request"
                raise LLMError(
                    f"{self.name}: the server rejected {what} with HTTP {e.status_code} ({_describe(e)}); "
                    "a 4xx is not retried: check the model name, the parameters and the API key."
                ) from None
            except (openai.APIResponseValidationError, ValueError) as e:  # ValueError: a body that is not JSON
                self.stats["failures"] += 1
                raise LLMError(
                    f"{self.name}: the server's reply is not a valid chat completion ({type(e).__name__}: "
                    f"{str(e)[:120]}); is the endpoint an OpenAI-compatible /v1/chat/completions?"
                ) from None
        self.stats["failures"] += 1
        raise LLMError(
            f"{self.name}: gave up after {self.max_retries + 1} attempts; last error: {_describe(last)}. "
            "Check that the server is up and reachable, or raise max_retries."
        ) from None

    def choice_logprobs(self, batch: Sequence[list[Message]], choices: Sequence[str]) -> np.ndarray:
        """``[len(batch), len(choices)]`` log-probabilities of each choice as the reply's first token (see
        :func:`irm.llm.choice_logprobs`): one greedy one-token request per conversation with
        ``logprobs=true, top_logprobs=N``. A choice matches a returned token that equals it (else one that
        equals it without surrounding spaces). A choice outside the top ``N`` gets the log of the mass the
        top ``N`` leave, capped at the smallest returned log-probability: an upper bound (counted in
        ``stats["choices_outside_top_logprobs"]``).

        A server that returns no log-probabilities (``transformers serve`` ignores the fields, some reject
        them) raises :class:`LLMError` saying so, once; later calls fail at once without a request, and
        callers fall back to the labels the LLM writes."""
        if self.logprobs_unavailable:
            raise LLMError(self.logprobs_unavailable)
        out = np.zeros((len(batch), len(choices)))
        for i, messages in enumerate(batch):
            messages = check_messages(messages)
            self.stats["logprob_requests"] += 1
            try:
                resp = self._create(messages, max_tokens=1, temperature=0.0, seed=0, logprobs=True,
                                    top_logprobs=self.top_logprobs)
            except LLMError as e:
                if "log-probabilities" in str(e):  # rejected: this server has none
                    self.logprobs_unavailable = f"{e} Token log-probabilities are unavailable from this server."
                raise
            top = _top_logprobs(resp)
            if top is None:
                self.logprobs_unavailable = (
                    f"{self.name}: the server returned no token log-probabilities (it ignored `logprobs`/"
                    "`top_logprobs`, as `transformers serve` does; vLLM and OpenAI return them). "
                    "Scored (calibrated) labels need them; the labels the LLM writes are used instead "
                    "(classify_mode = 'generate' / score_mode = 'generate' make that explicit).")
                raise LLMError(self.logprobs_unavailable)
            rest = max(1.0 - sum(math.exp(lp) for lp in top.values()), 1e-12)
            floor = min(min(top.values()), math.log(rest))
            for j, c in enumerate(choices):
                hits = [lp for tok, lp in top.items() if tok == c] or \
                       [lp for tok, lp in top.items() if tok.strip() == c.strip()]
                if hits:
                    out[i, j] = max(hits)
                else:
                    out[i, j] = floor
                    self.stats["choices_outside_top_logprobs"] += 1
        return out

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


def _top_logprobs(resp: Any) -> dict[str, float] | None:
    """``{token: logprob}`` of the first generated token, or None when the reply carries none."""
    choices = getattr(resp, "choices", None)
    lp = getattr(choices[0], "logprobs", None) if choices else None
    content = getattr(lp, "content", None) if lp is not None else None
    if not content:
        return None
    first = content[0]
    top = {str(t.token): float(t.logprob) for t in (getattr(first, "top_logprobs", None) or [])}
    top.setdefault(str(first.token), float(first.logprob))
    return top or None


def _describe(err: Exception | None) -> str:
    if err is None:
        return "none"
    status = getattr(err, "status_code", None)
    # The SDK's messages hold the server's error text, never the request URL or headers.
    msg = str(getattr(err, "message", "") or err)[:200]
    return f"{type(err).__name__}" + (f" {status}" if status else "") + (f": {msg}" if msg else "")
