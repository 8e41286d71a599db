"""LLM clients behind one protocol (:mod:`.base`), a disk cache (:mod:`.cache`), reply parsers
(:mod:`.parsing`) and the ``[..llm]`` config (:mod:`.config`).

Anything in irm that asks an LLM something (perturbation rewrites, feature explanations, feature
labels) takes an :class:`LLMClient`: an object with a ``name`` and
``complete(messages, *, max_tokens, temperature, seed) -> str``. Two kinds ship:

- ``"local"``: :class:`LocalChatLLM` (:mod:`.local`), a transformers chat model, by default the embedded
  SmolLM2-135M-Instruct;
- ``"openai"``: :class:`OpenAICompatibleLLM` (:mod:`.openai`), any OpenAI-compatible server (OpenAI,
  vLLM, Ollama, llama.cpp, ``transformers serve``); URL and key from the environment only.

A new backend is a module here with a class registered by ``@register_llm("kind")``.

>>> llm = LLMConfig(kind="local", model="tiny-llama").build()      # cached under $IRM_CACHE_DIR/llm
>>> text = llm.complete([{"role": "user", "content": "Is this positive? Answer 1 or 0."}], max_tokens=4)
>>> parse_reply("Label: 1", "label01").value
1
"""

from irm.llm.base import (
    ENV_API_KEY,
    ENV_BASE_URL,
    LLM_CLIENTS,
    LLMClient,
    LLMError,
    Message,
    build_llm,
    choice_logprobs,
    complete_many,
    complete_words,
    register_llm,
)
from irm.llm.cache import CachedLLM, CacheStats
from irm.llm.config import LLMConfig
from irm.llm.local import LocalChatLLM
from irm.llm.openai import OpenAICompatibleLLM
from irm.llm.parsing import (
    REPLY_PARSERS,
    ParsedReply,
    ParseLog,
    ReplyParseError,
    parse_reply,
    register_parser,
)

__all__ = [
    "Message", "LLMClient", "LLMError", "LocalChatLLM", "OpenAICompatibleLLM", "CachedLLM", "CacheStats",
    "choice_logprobs", "complete_many", "complete_words", "ParsedReply", "ParseLog", "ReplyParseError", "parse_reply",
    "register_parser", "REPLY_PARSERS", "LLM_CLIENTS", "register_llm", "build_llm", "LLMConfig",
    "ENV_BASE_URL", "ENV_API_KEY",
]
