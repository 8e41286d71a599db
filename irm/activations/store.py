"""The on-disk activation store: safetensors shards plus a JSON manifest.

Layout of a store directory::

    manifest.json                   settings, models, hooks, dataset hash, shards, completeness
    shards/shard-00000.safetensors  "{role}/{hook}" -> [rows, d] activations, "index/*" -> [rows] int64
    shards/shard-00000.json         written after its shard: rows and sha256 (the completion marker)

Shard ``i`` always holds texts ``[i * shard_size, (i + 1) * shard_size)``, so a capture that was killed
can resume by computing only the shards without a completion marker. Index tensors:
``index/text`` (the text's position in the dataset), ``index/pos`` (token position in the unpadded
text, -1 for a reduced row) and ``index/token`` (token id, -1 for a reduced row).

Readers stream: one shard in memory at a time, so one store feeds probes and sae-lens alike.

>>> store = ActivationStore("stores/tiny")
>>> for x in store.iter_batches("tuned", "blocks.1.hook_resid_post", batch_size=4096): ...
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from irm.core.constants import (
    STORE_FORMAT_VERSION,
    STORE_MANIFEST,
    STORE_SHARD_DIR,
    STORE_SHARD_DONE_FMT,
    STORE_SHARD_FMT,
)
from irm.core.io import file_sha256

__all__ = ["ActivationStore", "StoreError", "activation_key", "logprob_key"]

INDEX_KEYS = ("index/text", "index/pos", "index/token")


class StoreError(RuntimeError):
    """A store is missing, incomplete, or does not hold what was asked for."""


def activation_key(role: str, hook: str) -> str:
    return f"{role}/{hook}"


def logprob_key(role: str) -> str:
    """Key of the per-text response log-probabilities of a store captured with ``logprobs=True``."""
    return f"logprob/{role}"


@dataclass(frozen=True)
class ShardInfo:
    index: int
    rows: int
    sha256: str


class ActivationStore:
    """Read access to a store written by :func:`irm.activations.capture.capture_activations`."""

    def __init__(self, path: str | Path, *, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        mf = self.path / STORE_MANIFEST
        if not mf.is_file():
            raise StoreError(f"No activation store at {self.path.resolve()} (no {STORE_MANIFEST}). "
                             "Create one with `irm capture CONFIG`.")
        self.manifest: dict[str, Any] = json.loads(mf.read_text())
        if self.manifest.get("format_version") != STORE_FORMAT_VERSION:
            raise StoreError(f"Store {self.path} has format version {self.manifest.get('format_version')}; "
                             f"this irm reads version {STORE_FORMAT_VERSION}. Recapture it.")
        if not self.manifest.get("complete") and not allow_incomplete:
            raise StoreError(f"Store {self.path} is incomplete ({len(self.completed_shards())} of "
                             f"{self.manifest['n_shards']} shards). Rerun the same `irm capture` to resume it.")

    # -------------------------------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def roles(self) -> list[str]:
        return list(self.manifest["roles"])

    @property
    def n_shards(self) -> int:
        return int(self.manifest["n_shards"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest.get("total_rows") or sum(s.rows for s in self.completed_shards()))

    def d(self, hook: str) -> int:
        return int(self.manifest["d"][hook])

    def shard_path(self, i: int) -> Path:
        return self.path / STORE_SHARD_DIR / STORE_SHARD_FMT.format(i)

    def done_path(self, i: int) -> Path:
        return self.path / STORE_SHARD_DIR / STORE_SHARD_DONE_FMT.format(i)

    def completed_shards(self) -> list[ShardInfo]:
        out = []
        for i in range(int(self.manifest["n_shards"])):
            p = self.done_path(i)
            if p.is_file():
                d = json.loads(p.read_text())
                out.append(ShardInfo(i, int(d["rows"]), d["sha256"]))
        return out

    def _check(self, role: str, hook: str) -> str:
        if role not in self.roles:
            raise StoreError(f"Role {role!r} is not in store {self.path}; it holds {self.roles}.")
        if hook not in self.hooks:
            import difflib

            close = difflib.get_close_matches(hook, self.hooks, n=3)
            raise StoreError(f"Hook {hook!r} is not in store {self.path}; it holds {len(self.hooks)} hooks"
                             + (f", closest: {close}" if close else f": {self.hooks[:6]}..."))
        return activation_key(role, hook)

    # -------------------------------------------------------------------------------------------
    def iter_shards(
        self, role: str, hook: str, *, with_index: bool = False
    ) -> Iterator[Tensor | tuple[Tensor, dict[str, Tensor]]]:
        """Yield each shard's ``[rows, d]`` activations (and its index tensors), one shard in memory."""
        from safetensors import safe_open

        key = self._check(role, hook)
        for info in self.completed_shards():
            with safe_open(str(self.shard_path(info.index)), framework="pt") as f:
                x = f.get_tensor(key)
                if with_index:
                    yield x, {k.split("/", 1)[1]: f.get_tensor(k) for k in INDEX_KEYS}
                else:
                    yield x

    def iter_batches(
        self,
        role: str,
        hook: str,
        batch_size: int = 4096,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        loop: bool = False,
    ) -> Iterator[Float[Tensor, "batch d"]]:
        """Fixed-size batches of activation rows (what sae-lens's trainer takes as a data provider).

        ``shuffle`` shuffles shard order and rows within a shard (memory stays one shard);
        ``loop`` repeats the store forever, with a new shuffle each epoch.
        """
        rng = np.random.default_rng(seed)
        buf: list[Tensor] = []
        n_buf = 0
        while True:
            shard_ids = [s.index for s in self.completed_shards()]
            if shuffle:
                rng.shuffle(shard_ids)
            for x in self._iter_shard_ids(role, hook, shard_ids):
                if shuffle:
                    x = x[torch.from_numpy(rng.permutation(len(x)))]
                buf.append(x)
                n_buf += len(x)
                while n_buf >= batch_size:
                    cat = torch.cat(buf)
                    yield cat[:batch_size].to(device=device, dtype=dtype)
                    rest = cat[batch_size:]
                    buf, n_buf = ([rest] if len(rest) else []), len(rest)
            if not loop:
                break
        if buf and not drop_last:
            yield torch.cat(buf).to(device=device, dtype=dtype)

    def _iter_shard_ids(self, role: str, hook: str, ids: list[int]) -> Iterator[Tensor]:
        from safetensors import safe_open

        key = self._check(role, hook)
        for i in ids:
            with safe_open(str(self.shard_path(i)), framework="pt") as f:
                yield f.get_tensor(key)

    def load(self, role: str, hook: str, *, dtype: torch.dtype = torch.float32) -> Float[Tensor, "rows d"]:
        """All rows of one (role, hook) in memory, in dataset order."""
        parts = list(self.iter_shards(role, hook))
        if not parts:
            raise StoreError(f"Store {self.path} has no completed shards.")
        return torch.cat(parts).to(dtype)

    def logprobs(self, role: str) -> np.ndarray:
        """``[n_texts]`` float64: the model's log-probability of each text's response (stores captured with
        ``logprobs=True``), in dataset order."""
        from safetensors import safe_open

        if not self.manifest.get("logprobs"):
            raise StoreError(f"Store {self.path} holds no log-probabilities; capture it with logprobs=True.")
        if role not in self.roles:
            raise StoreError(f"Role {role!r} is not in store {self.path}; it holds {self.roles}.")
        parts = []
        for info in self.completed_shards():
            with safe_open(str(self.shard_path(info.index)), framework="np") as f:
                parts.append(f.get_tensor(logprob_key(role)))
        if not parts:
            raise StoreError(f"Store {self.path} has no completed shards.")
        return np.concatenate(parts)

    def index(self) -> dict[str, np.ndarray]:
        """The index arrays (``text``, ``pos``, ``token``) of all rows, in store order."""
        from safetensors import safe_open

        cols: dict[str, list[np.ndarray]] = {k.split("/", 1)[1]: [] for k in INDEX_KEYS}
        for info in self.completed_shards():
            with safe_open(str(self.shard_path(info.index)), framework="np") as f:
                for k in INDEX_KEYS:
                    cols[k.split("/", 1)[1]].append(f.get_tensor(k))
        return {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in cols.items()}

    def verify(self) -> list[int]:
        """Indices of shards whose file no longer matches its recorded sha256."""
        return [s.index for s in self.completed_shards() if file_sha256(self.shard_path(s.index)) != s.sha256]

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({str(self.path)!r}, roles={self.roles}, hooks={len(self.hooks)}, "
                f"positions={m['positions']['rule']!r}, rows={m.get('total_rows')}, complete={m.get('complete')})")
