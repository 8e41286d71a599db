"""``LLMConfig``: which LLM a stage uses and how (the ``[..llm]`` sections of a config); no secrets."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import irm.llm.local  # noqa: F401  (registers kind "local")
import irm.llm.openai  # noqa: F401  (registers kind "openai")
from irm.core.io import redact
from irm.llm.base import ENV_API_KEY, ENV_BASE_URL, LLM_CLIENTS, LLMClient, build_llm, check_params
from irm.llm.cache import CachedLLM

__all__ = ["LLMConfig"]

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
        if self.kind not in LLM_CLIENTS:
            close = difflib.get_close_matches(self.kind, LLM_CLIENTS, n=1)
            raise ValueError(f"llm kind {self.kind!r} is unknown; valid kinds: {sorted(LLM_CLIENTS)}"
                             + (f" (did you mean {close[0]!r}?)" if close else "") + ".")
        if not self.model:
            raise ValueError("llm model is empty; name a model spec (local) or the server's model name (openai).")
        check_params(self.max_tokens, self.temperature, self.seed)
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
