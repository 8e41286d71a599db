"""The main job, ``irm run CONFIG``: pair -> evaluation -> divergence -> capture -> IRM -> ... -> report.

Stages run in order over one :class:`RunContext`. Each stage writes its own section of
``results.json`` as soon as it finishes, so nothing computed is lost when a later stage fails. A
stage is a function registered with :func:`stage`; later stages add themselves from their modules.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from irm.config import ExperimentConfig
from irm.log import get_logger
from irm.runs import RunDir, seed_everything

__all__ = ["RunContext", "stage", "STAGES", "ordered_stages", "run_experiment", "run_capture", "open_context"]

log = get_logger(__name__)


@dataclass
class RunContext:
    cfg: ExperimentConfig
    run: RunDir
    tracker: Any
    force: bool = False
    prompts: list[str] = field(default_factory=list)
    train_prompts: list[str] = field(default_factory=list)
    test_prompts: list[str] = field(default_factory=list)
    pair: Any = None  # irm.models.ModelPair, or a lone base model wrapper until a tuned model exists
    base: Any = None
    rm: Any = None
    store: Any = None
    state: dict[str, Any] = field(default_factory=dict)  # what stages hand to later stages
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def run_path(self) -> Path:
        return self.run.path

    @property
    def generations(self):
        """The run's :class:`irm.evaluate.GenerationMemo`: stages that sample the same prompts from a model
        (the evaluation, the contrastive comparisons) reuse and continue each other's completions."""
        if "generation_memo" not in self.state:
            from irm.evaluate import GenerationMemo

            self.state["generation_memo"] = GenerationMemo()
        return self.state["generation_memo"]

    def load_models(self) -> None:
        """Load the base model, and the pair once a tuned model is known (named in the config or made by
        the tune stage); what is already loaded is kept. Stages that run alone call this."""
        from irm.models import ModelPair, load_model

        cfg = self.cfg
        kw = dict(device=cfg.models.device, dtype=cfg.models.dtype, revision=cfg.models.revision,
                  compute_dtype=None if cfg.models.compute_dtype == "float32" else cfg.models.compute_dtype)
        if self.base is None:
            self.base = load_model(cfg.models.base, **kw)
        if self.pair is None:
            tuned_spec = cfg.models.tuned or self.state.get("tuned_checkpoint")
            if tuned_spec:
                self.pair = ModelPair(self.base, load_model(tuned_spec, **kw))
                self.run.update_results("pair", self.pair.identities())


StageFn = Callable[[RunContext], None]
# name -> (order, fn). Orders in use: reward 10, tune 20, pair 30, evaluate 40, divergence 50,
# capture 60, irm 70, features 80, contrastive 90, report 100.
STAGES: dict[str, tuple[int, StageFn]] = {}


def stage(name: str, *, order: int) -> Callable[[StageFn], StageFn]:
    """Register a pipeline stage; stages run by increasing ``order``."""

    def deco(fn: StageFn) -> StageFn:
        if name in STAGES and STAGES[name][1] is not fn:
            raise ValueError(f"Stage {name!r} is registered twice.")
        STAGES[name] = (order, fn)
        return fn

    return deco


def ordered_stages() -> list[tuple[str, StageFn]]:
    return [(n, fn) for n, (_, fn) in sorted(STAGES.items(), key=lambda kv: kv[1][0])]


# ----------------------------------------------------------------------------------------------
def open_context(cfg: ExperimentConfig, *, force: bool = False, job_type: str = "run") -> RunContext:
    from irm.data import split_texts
    from irm.tracking import Tracker

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


def _load_models(ctx: RunContext) -> None:
    ctx.load_models()


# ----------------------------------------------------------------------------------------------
@stage("reward", order=10)
def _stage_reward(ctx: RunContext) -> None:
    """Build the explicit RM and record what it says of the prompts themselves."""
    import numpy as np

    ctx.rm = ctx.cfg.reward.build()
    r = ctx.rm.score(ctx.test_prompts, [""] * len(ctx.test_prompts))
    info: dict[str, Any] = {"name": ctx.rm.name, "kind": ctx.cfg.reward.kind,
                            "held_out_prompt_reward": {"mean": float(np.mean(r)), "std": float(np.std(r))}}
    if hasattr(ctx.rm, "table"):
        info["table_size"] = len(ctx.rm.table)
    ctx.run.update_results("reward", info)


@stage("pair", order=30)
def _stage_pair(ctx: RunContext) -> None:
    _load_models(ctx)
    if ctx.pair is None:
        log.warning("No tuned model: [models] tuned is empty and no tuning stage produced one; "
                    "later stages run on the base model alone.")
        ctx.run.update_results("pair", {"base": ctx.base.identity.to_dict(), "tuned": None})


@stage("capture", order=60)
def _stage_capture(ctx: RunContext) -> None:
    ctx.store = capture_for_config(ctx)


def capture_for_config(ctx: RunContext):
    """Capture the config's [capture] section on the held-out + train prompts of both models."""
    from irm.capture import capture_activations, records_from_texts

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


# ----------------------------------------------------------------------------------------------
def run_experiment(cfg: ExperimentConfig, *, force: bool = False, only: list[str] | None = None,
                   skip: list[str] | None = None) -> RunContext:
    """Run every registered stage in order (or ``only`` those named); returns the context."""
    _import_stages()
    names = [n for n, _ in ordered_stages()]
    for n in (only or []) + (skip or []):
        if n not in names:
            raise ValueError(f"Unknown stage {n!r}; stages are {names}.")
    ctx = open_context(cfg, force=force)
    selected = [n for n in names if not ((only and n not in only) or (skip and n in skip))]
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
        _load_models(ctx)
        store = capture_for_config(ctx)
    finally:
        ctx.tracker.finish()
    return store


def _import_stages() -> None:
    import importlib

    for mod in ("irm.pair_stages", "irm.implicit.stage", "irm.features",
                "irm.contrastive", "irm.report"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
