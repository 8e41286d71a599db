"""Data-parallel capture and probe fitting on ``torch.distributed``, launched with ``torchrun``.

One process per GPU (or a few on a CPU). Every rank loads the models, computes the shards
``i % world_size == rank`` of one store directory (which every rank must see: a local disk on one
node, a shared filesystem across nodes), and rank 0 writes the manifest once all shards are in.
Probe fitting reads the same split of shards on each rank, sums the ridge sufficient statistics with
one all-reduce, and so every rank ends with the exact fit of the whole store.

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here runs as one process.
The command-line entry point is :mod:`irm.run.distributed`:

    torchrun --nproc_per_node 2 -m irm.run.distributed capture experiments/tiny.toml            # CPU, gloo
    torchrun --nproc_per_node 8 -m irm.run.distributed capture experiments/default.toml \\
        --set models.device=cuda                                                  # 8 GPUs, nccl

>>> info = init_distributed()
>>> store = ActivationStore("runs/tiny/store")
>>> probe = fit_ridge_from_store(store, "tuned", "blocks.3.hook_resid_post", rewards_per_text)
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from irm.core.log import get_logger

if TYPE_CHECKING:  # probes pulls in scikit-learn; capture imports this module for barrier() alone
    from probes import RidgeProbe, RidgeSufficientStats

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "barrier",
    "main_process_first",
    "all_reduce_stats",
    "ridge_stats_from_store",
    "fit_ridge_from_store",
    "destroy",
]

log = get_logger(__name__)

#: A target function: ``(x [rows, d], index) -> y [rows] or [rows, k]`` for one shard's rows, where
#: ``index`` holds the shard's ``text``, ``pos`` and ``token`` int64 tensors (see :mod:`irm.activations.store`).
TargetFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], Any]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, GPU ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _uses_cuda() -> bool:
    return is_distributed() and dist.get_backend() == "nccl"


def init_distributed(backend: str | None = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` (or ``accelerate launch``) describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``). Backend:
    ``nccl`` when CUDA is available, else ``gloo``; with ``nccl`` each process takes GPU ``LOCAL_RANK``.
    Without ``WORLD_SIZE`` > 1 it does nothing and returns rank 0 of 1; called twice it returns the
    group already made.
    """
    if is_distributed():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _local_rank(), dist.get_backend())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} is set but {missing} are not: launch with "
                           "`torchrun --nproc_per_node N -m irm.run.distributed ...`, which sets them all.")
    if not dist.is_available():
        raise RuntimeError("This torch build has no torch.distributed; install a build that has it.")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    valid = ("gloo", "nccl")
    if backend not in valid:
        raise ValueError(f"Unknown backend {backend!r}; valid: {valid}.")
    local_rank = _local_rank()
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                               "visible; use --nproc_per_node <= the number of GPUs.")
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    log.debug("Joined process group: rank %d of %d (%s)", info.rank, info.world_size, backend)
    return info


def barrier() -> None:
    """Wait for every rank; a no-op outside a process group."""
    if not is_distributed():
        return
    if _uses_cuda():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others after it: for work that fills a shared cache
    (building a tiny model, dequantising a GGUF) which concurrent ranks would otherwise race on."""
    if get_rank() != 0:
        barrier()
    yield
    if get_rank() == 0:
        barrier()


def destroy() -> None:
    """Leave the process group (if any)."""
    if is_distributed():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
def all_reduce_stats(stats: RidgeSufficientStats) -> RidgeSufficientStats:
    """Sum :class:`~probes.RidgeSufficientStats` over all ranks; returns new stats (every rank gets
    the same). A rank that saw no rows may pass empty stats. Outside a process group: ``stats``.

    All arrays travel in one float64 tensor, so the sum is exact up to float64 round-off: the
    solve equals a one-process fit over the same rows to ~1e-12 relative.
    """
    if not is_distributed():
        return stats
    from probes import RidgeSufficientStats
    from probes.streaming import SUM_KEYS

    empty = stats.sum_x is None
    shape = None if empty else (int(stats.n_features), int(stats.n_targets),
                                None if stats.targets_1d is None else bool(stats.targets_1d))
    shapes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, shape)
    known = {s[:2] for s in shapes if s is not None}
    if not known:
        raise ValueError("all_reduce_stats: no rank has any statistics (every rank's stats are empty); "
                         "check that the store has rows for this role and hook.")
    if len(known) > 1:
        raise ValueError(f"all_reduce_stats: ranks hold stats of different shapes (n_features, n_targets) "
                         f"{[s[:2] if s else None for s in shapes]}; every rank must use the same hook and targets.")
    d, k = known.pop()
    flags = {s[2] for s in shapes if s is not None and s[2] is not None}
    if len(flags) > 1:
        raise ValueError("all_reduce_stats: some ranks had 1-D targets [n], others 2-D [n, k]; use one shape.")
    targets_1d = flags.pop() if flags else None
    arrays = stats.to_arrays() if not empty else {
        "n_samples": np.zeros(()), "sum_x": np.zeros(d), "sum_y": np.zeros(k), "xtx": np.zeros((d, d)),
        "xty": np.zeros((d, k)), "yty": np.zeros((k, k))}
    device = torch.device("cuda", torch.cuda.current_device()) if _uses_cuda() else torch.device("cpu")
    flat = torch.from_numpy(np.concatenate([np.asarray(arrays[key], np.float64).ravel() for key in SUM_KEYS]))
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat_np = flat.cpu().numpy()
    out: dict[str, np.ndarray] = {}
    offset = 0
    for key in SUM_KEYS:
        shape_k = np.shape(arrays[key])
        size = int(np.prod(shape_k))
        out[key] = flat_np[offset:offset + size].reshape(shape_k)
        offset += size
    return RidgeSufficientStats.from_arrays(out, targets_1d=targets_1d)


def _open_store(store: Any):
    from irm.activations.store import ActivationStore

    return store if isinstance(store, ActivationStore) else ActivationStore(store)


def _targets_for(targets: TargetFn | Sequence[float] | np.ndarray, x: torch.Tensor,
                 index: dict[str, torch.Tensor], n_texts: int | None) -> Any:
    if callable(targets):
        return targets(x, index)
    if n_texts is not None and len(targets) != n_texts:
        raise ValueError(f"targets has {len(targets)} values but the store holds {n_texts} texts; pass one "
                         "target per text (in dataset order), or a function (x, index) -> y for per-row targets.")
    return np.asarray(targets, dtype=np.float64)[index["text"].numpy()]


def ridge_stats_from_store(
    store: Any,
    role: str,
    hook: str,
    targets: TargetFn | Sequence[float] | np.ndarray,
    *,
    texts: Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> RidgeSufficientStats:
    """Ridge sufficient statistics of ``(activations, targets)`` over the whole store, every rank
    reading only its shards (``i % world_size == rank``), summed across ranks.

    ``targets``: one value (or row of values) per text, in dataset order, broadcast to each text's
    rows; or a function ``(x [rows, d], index) -> y`` for per-row targets. ``texts``: keep only rows
    of these text indices (e.g. the training split). ``device``: where the float64 Gram is summed
    (default: this rank's GPU under nccl, else the CPU).
    """
    from safetensors import safe_open

    from probes import RidgeSufficientStats

    store = _open_store(store)
    key = store._check(role, hook)
    n_texts = store.manifest.get("dataset", {}).get("n_texts")
    rank, world_size = get_rank(), get_world_size()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if _uses_cuda() else torch.device("cpu")
    keep = None if texts is None else np.unique(np.asarray(texts, dtype=np.int64))
    stats = RidgeSufficientStats()
    for info in store.completed_shards():
        if info.index % world_size != rank:
            continue
        with safe_open(str(store.shard_path(info.index)), framework="pt") as f:
            x = f.get_tensor(key)
            index = {k: f.get_tensor(f"index/{k}") for k in ("text", "pos", "token")}
        if keep is not None:
            rows = torch.from_numpy(np.isin(index["text"].numpy(), keep))
            x, index = x[rows], {k: v[rows] for k, v in index.items()}
        if len(x) == 0:
            continue
        y = _targets_for(targets, x, index, n_texts)
        stats.update(x.to(device), y)
    return all_reduce_stats(stats)


def fit_ridge_from_store(
    store: Any,
    role: str,
    hook: str,
    targets: TargetFn | Sequence[float] | np.ndarray,
    *,
    alpha: float | str = "auto",
    alphas: Sequence[float] | None = None,
    fit_intercept: bool = True,
    standardize: bool = False,
    texts: Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> RidgeProbe:
    """A :class:`~probes.RidgeProbe` fitted on a store's ``(role, hook)`` activations, data-parallel.

    Each rank accumulates its shards (see :func:`ridge_stats_from_store`); one all-reduce sums them;
    every rank then solves the same system, so all ranks return the same probe, equal to a
    one-process fit. ``alpha="auto"`` chooses the penalty by GCV over ``alphas``.

    >>> probe = fit_ridge_from_store("runs/tiny/store", "tuned", "blocks.3.hook_resid_post",
    ...                              reward_per_text, texts=train_ids)
    """
    from probes import RidgeProbe

    stats = ridge_stats_from_store(store, role, hook, targets, texts=texts, device=device)
    probe = RidgeProbe(alpha=alpha, fit_intercept=fit_intercept, standardize=standardize, alphas=alphas)
    return probe.fit_stats(stats)
