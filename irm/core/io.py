"""Small helpers every layer may use: atomic JSON writes, file hashes, conversion to plain JSON, and
redaction of secrets. Nothing here imports the rest of irm."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_json_atomic", "file_sha256", "to_jsonable", "redact", "REDACTED"]


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (sorted keys) through a temporary file and a rename, so a crash
    never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def to_jsonable(obj: Any) -> Any:
    """Numpy/torch scalars and arrays to plain JSON; non-finite floats become None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    torch = sys.modules.get("torch")  # a tensor can exist only once torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    return obj


# ----------------------------------------------------------------------------------------------
# Redaction: no key or secret is ever written to a config, log or artifact.
REDACTED = "<redacted>"

# --------------------------------------------------------------------------- redaction

# Key words are matched on whole parts of a normalized key (lowercase,
# camelCase and punctuation split into "_"), so "client_secret" and "apiKey"
# match but "secretary" does not.
_SECRET_KEY_RE = re.compile(
    r"(?:^|_)(?:api_?key|apikey|secrets?|password|passwd|authorization|credentials?|private_key)(?:_|$)"
)
# "token" is everywhere in language-model configs (max_new_tokens, pad_token,
# pad_token_id, tokenizer): only a key *ending* in the part "token" counts,
# and not when the part before it names a tokenizer special token.
_TOKENIZER_WORDS = frozenset(
    {
        "pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "stop", "sos",
        "begin", "image", "additional", "sentinel", "chat", "think", "tool", "system", "user",
        "assistant", "prompt", "response", "separator", "reward", "value", "score", "label", "first",
        "last", "next", "max", "min", "new", "num", "target", "placeholder", "default",
    }
)  # fmt: skip
# Well-known token shapes (OpenAI "sk-...", Hugging Face "hf_...", new wandb
# keys "wandb_v1_..."). A minimum length keeps names such as "hf_transfer"
# from being mistaken for tokens; the look-behind finds them after a space
# ("Bearer sk-...") but not inside identifiers ("my_hf_dataset_...").
_SECRET_VALUE_RE = re.compile(
    r"(?<![A-Za-z0-9_])(?:sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|wandb_v1_[A-Za-z0-9_\-]{16,})"
)
# Legacy wandb API keys are 40 hex characters; so are git commit hashes, so
# this shape only counts under a key that mentions "key".
_HEX40_RE = re.compile(r"[0-9a-fA-F]{40}")


def _normalize_key(key: object) -> str:
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key))
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _is_secret_key(key: object) -> bool:
    normalized = _normalize_key(key)
    if _SECRET_KEY_RE.search(normalized):
        return True
    parts = normalized.split("_")
    return parts[-1] == "token" and (len(parts) == 1 or parts[-2] not in _TOKENIZER_WORDS)


def _is_secret_value(value: str, key: object | None) -> bool:
    if _SECRET_VALUE_RE.search(value):
        return True
    return key is not None and "key" in str(key).lower() and _HEX40_RE.fullmatch(value.strip()) is not None


def redact(obj: Any) -> Any:
    """Return a deep copy of ``obj`` with secret values replaced by ``"<redacted>"``.

    ``obj`` is a (nested) config of dicts, lists, tuples and scalars; the
    input is never modified. A value is redacted when

    * its key names a secret (case-insensitive, on whole words of the key):
      ``api_key``/``apikey``, ``secret``, ``password``, ``authorization``,
      ``credential(s)``, ``private_key``, or a key ending in ``token`` (but
      not tokenizer keys such as ``pad_token`` or ``max_new_tokens``);
      ``None`` and booleans are kept (``use_auth_token: True`` is no secret);
    * or it is a string containing a token-shaped secret (``sk-...``,
      ``hf_...``, ``wandb_v1_...``), or a 40-hex-digit wandb key under a key
      mentioning "key".

    Dataclass instances become dicts. Other objects are deep-copied as is.

    Example:
        >>> redact({"model": "gpt2", "openai": {"apiKey": "abc"}, "max_new_tokens": 8})
        {'model': 'gpt2', 'openai': {'apiKey': '<redacted>'}, 'max_new_tokens': 8}
    """
    return _redact(obj, key=None)


def _redact(obj: Any, key: object | None) -> Any:
    if key is not None and _is_secret_key(key) and obj is not None and not isinstance(obj, bool):
        return REDACTED
    if isinstance(obj, str):
        return REDACTED if _is_secret_value(obj, key) else obj
    if isinstance(obj, bytes):
        return REDACTED if _is_secret_value(obj.decode("utf-8", "replace"), key) else obj
    if isinstance(obj, Mapping):
        return {k: _redact(v, key=k) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _redact(dataclasses.asdict(obj), key=key)
    if isinstance(obj, (list, tuple, set, frozenset)):
        # Elements inherit the parent key: {"keys": ["<40 hex>"]} is a key list.
        items = [_redact(item, key=key) for item in obj]
        return items if isinstance(obj, list) else type(obj)(items)
    return copy.deepcopy(obj)
