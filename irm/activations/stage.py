"""The ``capture`` stage: activations of the run's prompts, both models, into the run's store."""

from __future__ import annotations

import time
from pathlib import Path

from irm.run.registry import RunContext, stage

__all__ = ["capture_for_config"]


@stage("capture", order=60)
def _stage_capture(ctx: RunContext) -> None:
    ctx.store = capture_for_config(ctx)


def capture_for_config(ctx: RunContext):
    """Capture the config's [capture] section on the held-out + train prompts of both models."""
    from irm.activations.capture import capture_activations, records_from_texts

    cfg = ctx.cfg.capture
    models = {"base": ctx.base} if ctx.pair is None else {"base": ctx.pair.base, "tuned": ctx.pair.tuned}
    store_dir = Path(cfg.store)
    if not store_dir.is_absolute():
        store_dir = ctx.run_path / store_dir
    t0 = time.perf_counter()
    store = capture_activations(
        models, records_from_texts(ctx.prompts), store_dir, hooks=cfg.hooks, layers=cfg.layers,
        positions=cfg.positions, batch_size=cfg.batch_size, shard_size=cfg.shard_size,
        max_length=cfg.max_length, dtype=cfg.dtype, overwrite=cfg.overwrite,
        dataset={"source": ctx.cfg.data.prompts},
    )
    info = {"store": str(store.path), "rows": store.n_rows, "hooks": len(store.hooks), "roles": store.roles,
            "positions": cfg.positions, "seconds": time.perf_counter() - t0}
    ctx.run.update_results("capture", info)
    ctx.tracker.log({"capture/rows": store.n_rows, "capture/seconds": info["seconds"]}, step=ctx.tracker.current_step)
    return store
