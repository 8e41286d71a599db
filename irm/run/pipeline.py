"""The main job, ``irm run CONFIG``: pair -> evaluation -> divergence -> capture -> IRM -> ... -> report.

Stages run in order over one :class:`~irm.run.registry.RunContext`. Each stage writes its own section
of ``results.json`` as soon as it finishes, so nothing computed is lost when a later stage fails. A
stage is a function registered with :func:`irm.run.registry.stage` in its package's stage module
(:data:`irm.run.registry.STAGE_MODULES`); this module only orders and runs them.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from irm.core.log import get_logger
from irm.run.config import ExperimentConfig
from irm.run.registry import RunContext, import_stages, ordered_stages, run_preflights
from irm.run.rundir import RunDir, seed_everything

__all__ = ["run_experiment", "run_capture", "open_context"]

log = get_logger(__name__)


# ----------------------------------------------------------------------------------------------
def open_context(cfg: ExperimentConfig, *, force: bool = False, job_type: str = "run") -> RunContext:
    from irm.data import split_texts
    from irm.run.tracking import Tracker

    seed_everything(cfg.seed)
    if cfg.num_threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(cfg.num_threads)
        # numpy's BLAS too: on a busy CPU a multi-threaded eigh of a 576 x 576 matrix took 10 s
        # instead of 0.3 s. The limit holds for the rest of the process.
        threadpool_limits(cfg.num_threads)
    run = RunDir.create(cfg.run_path, cfg.to_dict(), seed=cfg.seed)
    tracker = Tracker.open(cfg.to_dict(), run_dir=run.path, project=cfg.tracking.project, mode=cfg.tracking.mode,
                           name=cfg.name, group=cfg.tracking.group, tags=cfg.tracking.tags, job_type=job_type)
    prompts = cfg.data.load()
    train, test = split_texts(prompts, cfg.data.test_fraction, cfg.seed)
    run.update_results("data", {"source": cfg.data.prompts, "n_prompts": len(prompts), "n_train": len(train),
                                "n_test": len(test)})
    return RunContext(cfg=cfg, run=run, tracker=tracker, force=force, prompts=prompts, train_prompts=train,
                      test_prompts=test)


# ----------------------------------------------------------------------------------------------
def run_experiment(cfg: ExperimentConfig, *, force: bool = False, only: list[str] | None = None,
                   skip: list[str] | None = None) -> RunContext:
    """Run every registered stage in order (or ``only`` those named); returns the context."""
    import_stages()
    names = [n for n, _ in ordered_stages()]
    for n in (only or []) + (skip or []):
        if n not in names:
            raise ValueError(f"Unknown stage {n!r}; stages are {names}.")
    selected = [n for n in names if not ((only and n not in only) or (skip and n in skip))]
    run_preflights(cfg, selected)  # inputs checked before anything runs (tuning takes minutes)
    ctx = open_context(cfg, force=force)
    ctx.state["stages"] = selected  # stages may leave to a later one what it does anyway
    t_all = time.perf_counter()
    try:
        for name, fn in ordered_stages():
            if name not in selected:
                continue
            log.info("stage %s", name)
            t0 = time.perf_counter()
            try:
                fn(ctx)
            except Exception as e:
                ctx.run.update_results(f"error_{name}", {"type": type(e).__name__, "message": str(e),
                                                          "traceback": traceback.format_exc()})
                raise
            ctx.timings[name] = time.perf_counter() - t0
            ctx.run.update_results("timings", dict(ctx.timings, total=time.perf_counter() - t_all))
    finally:
        ctx.tracker.summary({f"timings/{k}": v for k, v in ctx.timings.items()})
        ctx.tracker.finish()
    return ctx


def run_capture(cfg: ExperimentConfig) -> Any:
    """``irm capture CONFIG``: load the pair (base alone if no tuned model is named) and capture."""
    ctx = open_context(cfg, job_type="capture")
    try:
        from irm.activations.stage import capture_for_config

        ctx.load_models()
        store = capture_for_config(ctx)
    finally:
        ctx.tracker.finish()
    return store
