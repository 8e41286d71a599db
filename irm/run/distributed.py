"""Data-parallel capture on torch.distributed: ``torchrun --nproc_per_node N -m irm.run.distributed
capture CONFIG``. Each rank captures its shards of the store; rank 0 writes the run directory, as
``irm capture`` does. The collectives and the streamed ridge fit live in
:mod:`irm.activations.distributed`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from irm.activations.distributed import (
    DistInfo,
    destroy,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    main_process_first,
)
from irm.run.pipeline import open_context

__all__ = ["distributed_capture", "main"]


def _device_for_rank(device: str, info: DistInfo) -> str:
    """One GPU per rank: 'cuda', 'auto' or 'cuda:N' become 'cuda:LOCAL_RANK' under a process group."""
    if info.world_size > 1 and (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())):
        return f"cuda:{info.local_rank}"
    return device


def distributed_capture(cfg: Any, *, overwrite: bool | None = None):
    """``irm capture CONFIG`` on every rank of a process group (or alone, outside one).

    Rank 0 makes the run directory, writes ``results.json`` and the wandb run, as
    :func:`irm.run.pipeline.run_capture` does; every rank loads the models (on GPU ``LOCAL_RANK`` when
    the config's device is CUDA) and captures its shards. Returns the complete store on every rank.
    """
    import time

    from irm.activations.capture import capture_activations, records_from_texts
    from irm.models import ModelPair, load_model
    from irm.run.rundir import seed_everything

    info = init_distributed()
    if overwrite is not None:
        cfg.capture.overwrite = overwrite
    ctx = None
    if info.is_main:
        ctx = open_context(cfg, job_type="capture")
        prompts = ctx.prompts
    else:
        seed_everything(cfg.seed)
        prompts = cfg.data.load()
    try:
        kw = dict(device=_device_for_rank(cfg.models.device, info), dtype=cfg.models.dtype,
                  revision=cfg.models.revision)
        with main_process_first():  # rank 0 fills the model cache (tiny build, GGUF conversion) alone
            base = load_model(cfg.models.base, **kw)
            models = {"base": base}
            if cfg.models.tuned:
                pair = ModelPair(base, load_model(cfg.models.tuned, **kw))
                models = {"base": pair.base, "tuned": pair.tuned}
                if ctx is not None:
                    ctx.run.update_results("pair", pair.identities())
        c = cfg.capture
        store_dir = Path(c.store)
        if not store_dir.is_absolute():
            store_dir = cfg.run_path / store_dir
        t0 = time.perf_counter()
        store = capture_activations(
            models, records_from_texts(prompts), store_dir, hooks=c.hooks, layers=c.layers,
            positions=c.positions, batch_size=c.batch_size, shard_size=c.shard_size, max_length=c.max_length,
            dtype=c.dtype, overwrite=c.overwrite, dataset={"source": cfg.data.prompts},
            rank=info.rank, world_size=info.world_size,
        )
        if ctx is not None:
            seconds = time.perf_counter() - t0
            ctx.run.update_results("capture", {
                "store": str(store.path), "rows": store.n_rows, "hooks": len(store.hooks), "roles": store.roles,
                "positions": c.positions, "seconds": seconds, "world_size": info.world_size})
            ctx.tracker.log({"capture/rows": store.n_rows, "capture/seconds": seconds}, step=ctx.tracker.current_step)
    finally:
        if ctx is not None:
            ctx.tracker.finish()
    return store


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc_per_node N -m irm.run.distributed capture CONFIG [--set KEY=VALUE] [--overwrite]``."""
    from irm.activations.store import StoreError
    from irm.core.log import setup_logging
    from irm.run.config import ConfigError, load_config, parse_overrides

    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m irm.run.distributed",
                                description="Data-parallel `irm capture` on torch.distributed.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="capture activations into a store, shards split across ranks")
    c.add_argument("config", help="experiment TOML file, e.g. experiments/default.toml")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted), e.g. --set capture.batch_size=8")
    c.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")
    args = p.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    joined_here = not is_distributed()  # leave the group at the end only if this call joined it
    # One rank speaks; the others only warn.
    setup_logging("DEBUG" if args.verbose else ("INFO" if rank == 0 else "WARNING"))
    if rank != 0:
        os.environ["IRM_PROGRESS"] = "0"
    try:
        cfg = load_config(args.config, overrides=parse_overrides(args.set))
        store = distributed_capture(cfg, overwrite=True if args.overwrite else None)
        if get_rank() == 0:
            print(f"Store: {store.path}  ({store.n_rows} rows, {len(store.hooks)} hooks, roles {store.roles}, "
                  f"{get_world_size()} rank(s))")
        return 0
    except (ConfigError, StoreError, FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"irm.run.distributed {args.cmd} (rank {rank}): error: {msg}", file=sys.stderr)
        if args.verbose:
            raise
        return 2
    finally:
        if joined_here:
            destroy()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
