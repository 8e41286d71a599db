"""What a pipeline stage is: a function of a :class:`RunContext`, registered with :func:`stage`.

A stage lives in its package's ``stage`` (or ``stages``) module, next to the work it runs, and
registers its config section (:func:`irm.run.config.register_section`) and its report renderer
(:func:`irm.run.report.renderer`) there too. :data:`STAGE_MODULES` names those modules; they are
imported by name (:func:`import_stages`) when a config is read or a run starts, so this package never
imports the stage packages themselves: they sit above it. A new stage adds its module here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from irm.run.config import ExperimentConfig
    from irm.run.rundir import RunDir

__all__ = ["RunContext", "stage", "STAGES", "STAGE_MODULES", "ordered_stages", "import_stages", "preflight",
           "run_preflights", "PREFLIGHTS"]

#: The modules that register the built-in stages, their config sections and report renderers.
STAGE_MODULES = (
    "irm.rewards.stage",        # reward (10), train_rm (15), humans (75)
    "irm.pair.stages",          # tune (20), pair (30), evaluate (40), divergence (50)
    "irm.activations.stage",    # capture (60)
    "irm.implicit.stage",       # irm (70)
    "irm.features.stage",       # features (80)
    "irm.contrastive.stage",    # contrastive (90)
    "irm.run.report",           # report (100)
)


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
        """The run's :class:`irm.models.generation.GenerationMemo`: stages that sample the same prompts
        from a model (the evaluation, the contrastive comparisons) reuse and continue each other's
        completions."""
        if "generation_memo" not in self.state:
            from irm.models.generation import GenerationMemo

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
# name -> (order, fn). Orders in use: reward 10, train_rm 15, tune 20, pair 30, evaluate 40, divergence 50,
# capture 60, irm 70, humans 75, features 80, contrastive 90, report 100.
STAGES: dict[str, tuple[int, StageFn]] = {}


def stage(name: str, *, order: int) -> Callable[[StageFn], StageFn]:
    """Register a pipeline stage; stages run by increasing ``order``."""

    def deco(fn: StageFn) -> StageFn:
        if name in STAGES and STAGES[name][1] is not fn:
            raise ValueError(f"Stage {name!r} is registered twice.")
        STAGES[name] = (order, fn)
        return fn

    return deco


PreflightFn = Callable[[Any], None]
#: stage name -> checks of the config that run before any stage does (``preflight``).
PREFLIGHTS: dict[str, list[PreflightFn]] = {}


def preflight(name: str) -> Callable[[PreflightFn], PreflightFn]:
    """Register a check of stage ``name``'s inputs, ``fn(cfg)``, run before the first stage of a run that
    includes ``name``: a typo'd path or a too-small word list fails in seconds, not after tuning. Checks
    read files and configs only; they load no model. They raise ``ConfigError`` saying what to fix."""

    def deco(fn: PreflightFn) -> PreflightFn:
        if fn not in PREFLIGHTS.setdefault(name, []):
            PREFLIGHTS[name].append(fn)
        return fn

    return deco


def run_preflights(cfg: Any, stages: list[str]) -> None:
    """Every registered check of the given stages, in stage order."""
    for name in stages:
        for fn in PREFLIGHTS.get(name, []):
            fn(cfg)


def ordered_stages() -> list[tuple[str, StageFn]]:
    return [(n, fn) for n, (_, fn) in sorted(STAGES.items(), key=lambda kv: kv[1][0])]


def import_stages() -> None:
    """Import every module of :data:`STAGE_MODULES`, so their stages, config sections and renderers
    are registered. An import error inside one of them is raised, not hidden."""
    for mod in STAGE_MODULES:
        importlib.import_module(mod)
