"""RLHF-tune a base model against any explicit reward model with trl, cached by what determines it.

:func:`tune` runs trl's ``GRPOTrainer`` (default) or ``RLOOTrainer`` with a KL penalty to the base
(``beta > 0``), the RM as a trl reward function (every irm RM is ``rm(prompts, completions) ->
list[float]``), plain-text prompts of which a held-out share is never seen by tuning, and a fixed seed.
The tuned model is written as a plain HF checkpoint (``irm.models.load_model(path)`` loads it) under::

    cache_root/tuned/<key>/
        config.json, model.safetensors, tokenizer files   the tuned model
        tune_config.json    TuneConfig, seed, base and RM identities, prompt hash, versions, wall time, and
                            "outcome": steps run, the step kept and why, budget checks, flags
        curves.json         per step: reward mean/std, kl, loss, ... and held-out reward every eval_every
        split.json          the train and held-out prompts
        evaluation.json     irm.pair.evaluate.evaluate_pair on the held-out prompts (final_eval=True)

``<key>`` hashes (base identity, RM identity, tune config, prompts): a second call with the same
inputs returns the cached model (``reused=True``); ``force=True`` retrains.

Two guardrails. **Zero reward variance**: when the RM gives every completion of a prompt the same score
in each of the first :data:`ZERO_VARIANCE_STEPS` steps, GRPO/RLOO have no advantage to learn from; a
:class:`ZeroRewardVarianceWarning` says so once and the result carries the flag ``zero_reward_variance``
(:func:`zero_variance_flag`). **A budget** (``max_kl_per_token``, ``stop_on_over_optimised``): every
held-out check measures the exact KL(tuned || base) per token and the repetition flag of its samples;
the first check over budget stops tuning and the saved model is the last check within it
(``TuneResult.outcome``: ``kept_step``, ``stopped_early``, ``stop_reason``, ``checks``).

The defaults are a recipe measured on a 2-core CPU with SmolLM2-135M-Instruct against VADER (full
fine-tuning, GRPO, lr 1e-4 decayed linearly over 30 steps, beta 0.04, 2 prompts x 8 generations, 20
new tokens, pure sampling). Measured (one seed, 64 held-out prompts): reward 0.19 +- 0.53 (base) ->
1.23 +- 0.83 (tuned), effect size 1.97 base std (bootstrap CI 1.53-2.77), repetition 0.25x the base's,
KL 0.48 nats/token. lr 3e-5 over 45 steps gave only 0.44 std; lr 1e-4 over 45 steps gave 5.0 std
but repeated twice as much as the base. About 8 s per step on an idle 2-core CPU.

>>> from irm.rewards import TokenUtilityRM
>>> from irm.data import default_prompts
>>> res = tune("smollm2-135m-instruct", TokenUtilityRM.from_vader(), default_prompts(), TuneConfig(),
...            cache_root=Path("~/.cache/irm").expanduser())
>>> res.checkpoint, res.evaluation["reward"]["effect_size"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irm.core.constants import CHECKPOINT_SOURCE
from irm.core.log import get_logger
from irm.data import split_texts, texts_hash
from irm.pair.evaluate import EVAL_JSON

__all__ = [
    "TuneConfig",
    "TuneResult",
    "tune",
    "tune_key",
    "reward_model_identity",
    "ALGORITHMS",
    "TUNE_CONFIG_JSON",
    "CURVES_JSON",
    "SPLIT_JSON",
    "ZERO_VARIANCE_STEPS",
    "ZERO_STD_TOL",
    "ZeroRewardVarianceWarning",
    "zero_variance_flag",
]

log = get_logger(__name__)

ALGORITHMS = ("grpo", "rloo")
TUNED_SUBDIR = "tuned"
TUNE_CONFIG_JSON = "tune_config.json"
CURVES_JSON = "curves.json"
SPLIT_JSON = "split.json"
TUNE_SUMMARY_JSON = "tune.json"
CURVES_PNG = "tune_curves.png"
# Bump when the meaning of a cached tuned model changes (layout, what the key covers).
_CACHE_VERSION = 1
# The zero-variance guardrail (zero_variance_flag): the RM's scores do not vary within any prompt's group
# (std <= ZERO_STD_TOL, in reward units) in each of the first ZERO_VARIANCE_STEPS steps.
ZERO_VARIANCE_STEPS = 5
ZERO_STD_TOL = 1e-6


def _f(default: Any, help: str, **kw: Any):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TuneConfig:
    """How to RLHF-tune a base model. Defaults: the measured SmolLM2 + VADER recipe (see module docs).

    Fields marked ``in_key=False`` change what is recorded, not the trained weights, so they are left
    out of the cache key: changing them reuses a cached model. Fields marked ``in_key="when_set"`` (the
    budget) enter the key only when set (see :meth:`key_dict`).
    """

    algorithm: str = _f("grpo", "trl trainer: 'grpo' (GRPOTrainer) or 'rloo' (RLOOTrainer).")
    steps: int = _f(30, "Optimiser steps; each generates prompts_per_step x num_generations completions.")
    learning_rate: float = _f(1e-4, "Peak learning rate (AdamW), decayed linearly. Full fine-tuning of SmolLM2-135M: 1e-4; "
                                    "LoRA: ~3e-4.")
    lr_scheduler: str = _f("linear", "transformers lr scheduler: linear (decay to 0), constant, cosine, ...")
    beta: float = _f(0.04, "KL penalty to the base model; must be > 0 (trl's default 0 drops the base).")
    num_generations: int = _f(8, "Completions sampled per prompt (the group GRPO/RLOO compares), >= 2.")
    prompts_per_step: int = _f(2, "Distinct prompts per step; the batch holds prompts_per_step x "
                                  "num_generations completions.")
    max_new_tokens: int = _f(20, "Completion length in tokens (trl's default is 512).")
    temperature: float = _f(1.0, "Sampling temperature during tuning.")
    top_k: int = _f(0, "Top-k sampling during tuning; 0 disables it (pure sampling).")
    top_p: float = _f(1.0, "Nucleus sampling during tuning; 1.0 disables it.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    lora: bool = _f(False, "Train a LoRA adapter instead of all weights (needs peft: `pip install 'irm[lora]'`); "
                           "the adapter is merged into a plain checkpoint when saved.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int | None = _f(None, "LoRA alpha; None: 2 x lora_r.")
    seed: int = _f(0, "Seed of the prompt split, data order, sampling and initialisation.")
    held_out_fraction: float = _f(0.2, "Share of the prompts held out from tuning (for evaluation).")
    eval_every: int = _f(15, "Score samples on held-out prompts every this many steps (0: only at the "
                             "start and the end).", in_key=False)
    eval_prompts: int = _f(32, "Held-out prompts used by the in-training evaluation.", in_key=False)
    save_every: int = _f(0, "Save an intermediate checkpoint (weights only) every this many steps; 0: never.",
                         in_key=False)
    num_threads: int | None = _f(None, "torch CPU threads while tuning; None keeps torch's setting. On a CPU "
                                       "shared with other jobs, 1 can be several times faster than 2.",
                                 in_key=False)
    final_eval: bool = _f(True, "Run irm.pair.evaluate.evaluate_pair on all held-out prompts after tuning and "
                                "save it beside the model.", in_key=False)
    max_kl_per_token: float | None = _f(
        None, "KL budget in nats per completion token. At every held-out check (step 0, every eval_every steps, "
              "the last step) the exact KL(tuned || base) over the vocabulary is measured on the check's samples "
              "(as irm.pair.evaluate.completion_kl), averaged over their completion tokens; the first check above "
              "the budget stops tuning, and the tuned model is the last check within it (`kept_step` in the "
              "results; its weights are held in memory, one copy of the trainable parameters). None: no budget. "
              "Needs eval_every >= 1; with a budget on, eval_every and eval_prompts enter the cache key.",
        in_key="when_set")
    stop_on_over_optimised: bool = _f(
        False, "Stop at the first held-out check whose samples irm.pair.evaluate.repetition_report flags as "
               "over-optimised against the base's samples of step 0 (rep-2 above max(2 x base, base + 0.05), or "
               "distinct-2 below half the base's), and keep the last check that was not (as max_kl_per_token). "
               "Needs eval_every >= 1.", in_key="when_set")

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"TuneConfig.algorithm {self.algorithm!r} is not one of {ALGORITHMS}; "
                             "use 'grpo' (default) or 'rloo'.")
        for name in ("steps", "num_generations", "prompts_per_step", "max_new_tokens", "lora_r", "eval_prompts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TuneConfig.{name} must be an integer >= 1, got {v!r}.")
        if self.num_generations < 2:
            raise ValueError(f"TuneConfig.num_generations is {self.num_generations}; GRPO and RLOO compare "
                             "completions of the same prompt, so it must be >= 2 (8 is the default).")
        for name in ("eval_every", "save_every", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TuneConfig.{name} must be an integer >= 0, got {v!r}.")
        if not (self.beta > 0 and np.isfinite(self.beta)):
            raise ValueError(f"TuneConfig.beta is {self.beta!r}; it must be > 0: without the KL penalty to the "
                             "base there is no implicit reward to study (try 0.04).")
        if not (self.learning_rate > 0 and np.isfinite(self.learning_rate)):
            raise ValueError(f"TuneConfig.learning_rate must be > 0, got {self.learning_rate!r} (try 1e-4).")
        if not self.temperature > 0:
            raise ValueError(f"TuneConfig.temperature must be > 0 for sampling, got {self.temperature!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"TuneConfig.top_p must be in (0, 1], got {self.top_p!r}; 1.0 disables it.")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"TuneConfig.held_out_fraction must be in (0, 1), got {self.held_out_fraction!r} "
                             "(e.g. 0.2).")
        if not self.max_grad_norm > 0:
            raise ValueError(f"TuneConfig.max_grad_norm must be > 0, got {self.max_grad_norm!r}.")
        n = self.num_threads
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"TuneConfig.num_threads must be an integer >= 1 or None, got {self.num_threads!r}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"TuneConfig.lora_alpha must be > 0 or None (2 x lora_r), got {self.lora_alpha!r}.")
        m = self.max_kl_per_token
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not (m > 0 and np.isfinite(m)):
                raise ValueError(f"TuneConfig.max_kl_per_token must be a number > 0 (nats per token, e.g. 0.5) or "
                                 f"None (no KL budget), got {m!r}.")
            self.max_kl_per_token = float(m)  # 1 and 1.0 are one budget, and one cache key
        if not isinstance(self.stop_on_over_optimised, bool):
            raise ValueError(f"TuneConfig.stop_on_over_optimised must be true or false, got "
                             f"{self.stop_on_over_optimised!r}.")
        if self.has_budget and self.eval_every == 0:
            raise ValueError(
                "TuneConfig.max_kl_per_token / stop_on_over_optimised are checked at the held-out checks, but "
                "eval_every is 0 (checks only at step 0 and the last step), so a run over budget could only fall "
                "back to the untuned base; set eval_every >= 1 (e.g. 5) to keep intermediate steps."
            )

    @property
    def has_budget(self) -> bool:
        """Whether a held-out check can stop tuning (max_kl_per_token or stop_on_over_optimised)."""
        return self.max_kl_per_token is not None or self.stop_on_over_optimised

    @property
    def batch_size(self) -> int:
        """Completions per step (trl counts the batch in completions, not prompts)."""
        return self.prompts_per_step * self.num_generations

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key_dict(self) -> dict[str, Any]:
        """The fields that determine the trained weights (the cache key's part of the config).

        Fields marked ``in_key="when_set"`` (the budget options) enter only when they differ from their
        default, so a config without them keeps the key it had before they existed. With a budget on,
        the held-out checks decide which step is kept, so their schedule and samples (``eval_every``,
        ``eval_prompts``) enter too.
        """
        d = {}
        for f in dataclasses.fields(self):
            in_key, v = f.metadata.get("in_key", True), getattr(self, f.name)
            if in_key is True or (in_key == "when_set" and v != f.default):
                d[f.name] = v
        if self.has_budget:
            d["eval_every"], d["eval_prompts"] = self.eval_every, self.eval_prompts
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown TuneConfig field(s) {unknown}; valid fields: {sorted(known)}.")
        return cls(**d)


@dataclass
class TuneResult:
    """What :func:`tune` made: the checkpoint (load it with ``irm.models.load_model``) and its record."""

    checkpoint: Path
    key: str
    train_prompts: list[str]
    held_out_prompts: list[str]
    curves: list[dict[str, Any]]
    wall_time_s: float  # of the training that made the model (also when reused)
    reused: bool
    config: TuneConfig
    evaluation: dict[str, Any] | None = None
    record: dict[str, Any] = field(default_factory=dict)  # tune_config.json

    @property
    def held_out(self) -> list[str]:
        return self.held_out_prompts

    @property
    def outcome(self) -> dict[str, Any]:
        """How tuning ended: ``steps_run``, ``kept_step``, ``stopped_early``, ``stop_reason``, ``stop_message``,
        ``checks`` (the held-out checks of a KL / over-optimisation budget) and ``flags`` (warnings such as
        ``zero_reward_variance``). Read from the record; a model cached before these existed gets them
        from its curves (no budget then: the last step run is the one kept)."""
        out = self.record.get("outcome")
        if out is not None:
            return out
        return _outcome(self.curves, self.config, _Budget(self.config))

    @property
    def flags(self) -> dict[str, Any]:
        return self.outcome["flags"]

    @property
    def kept_step(self) -> int | None:
        return self.outcome["kept_step"]

    def to_dict(self) -> dict[str, Any]:
        """A results.json section: everything but the prompt lists (their counts and hashes instead)."""
        return {
            "checkpoint": str(self.checkpoint),
            "key": self.key,
            "reused": self.reused,
            "wall_time_s": self.wall_time_s,
            "config": self.config.to_dict(),
            "n_train_prompts": len(self.train_prompts),
            "n_held_out_prompts": len(self.held_out_prompts),
            "held_out_hash": texts_hash(self.held_out_prompts),
            **self.outcome,
            "curves": self.curves,
            "evaluation": self.evaluation,
            "base": self.record.get("base"),
            "rm": self.record.get("rm"),
        }


# ----------------------------------------------------------------------------------------------
# Identities and the cache key
def reward_model_identity(rm: Any) -> dict[str, Any]:
    """What an RM is, for cache keys: its class, name and a digest of what defines its scores.

    An RM may define ``identity() -> dict`` to say so itself; the lexicon and classifier RMs of
    :mod:`irm.rewards` are recognised; any other callable is identified by its qualified name only
    (a warning says so: change its name when you change its behaviour, or pass ``force=True``).
    """
    from irm.rewards import SequenceClassifierRM, TokenUtilityRM

    ident: dict[str, Any] = {"class": f"{type(rm).__module__}.{type(rm).__qualname__}",
                             "name": getattr(rm, "name", None) or getattr(rm, "__name__", None)}
    own = getattr(rm, "identity", None)
    if callable(own):
        ident.update(own())
    elif isinstance(rm, TokenUtilityRM):
        table = json.dumps(sorted(rm.table.items())).encode()
        ident.update(table_sha256=hashlib.sha256(table).hexdigest(), scale=rm.scale, clip=rm.clip,
                     score_prompt=rm.score_prompt)
    elif isinstance(rm, SequenceClassifierRM):
        cfg = rm.model.config
        ident.update(model=str(getattr(cfg, "_name_or_path", "")), commit=getattr(cfg, "_commit_hash", None),
                     label_index=rm.label_index, input_format=rm.input_format, max_length=rm.max_length)
    else:
        fn = getattr(rm, "__func__", rm)
        ident["qualname"] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(rm).__qualname__)}"
        warnings.warn(
            f"Reward function {ident['qualname']} has no identity(); the tuning cache key knows only its name. "
            "If you change what it scores, rename it or pass force=True.",
            stacklevel=3,
        )
    return ident


def _base_identity(identity) -> dict[str, Any]:
    # The checkpoint path is left out of the key: moving the cache must not invalidate it. A local
    # checkpoint is known by its fingerprint, a hub model by its name and revision.
    d = identity.to_dict()
    if d.get("fingerprint"):
        return {"kind": d["kind"], "fingerprint": d["fingerprint"]}
    return {"kind": d["kind"], "checkpoint": d["checkpoint"], "revision": d.get("revision")}


def tune_key(base_identity: dict[str, Any], rm_identity: dict[str, Any], config: TuneConfig,
             prompts_hash: str) -> str:
    """16 hex digits of sha256 over (base, RM, the config's weight-determining fields, prompts)."""
    blob = json.dumps({"v": _CACHE_VERSION, "base": base_identity, "rm": rm_identity,
                       "config": config.key_dict(), "prompts": prompts_hash}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    out = {}
    for p in ("irm", "trl", "transformers", "torch", "peft"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str, allow_nan=False))
    tmp.replace(path)


def _clean(v: Any) -> Any:
    """A float for JSON (non-finite -> None)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers/trl/accelerate chatter (info logs, deprecation warnings) while tuning."""
    import transformers

    old = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    names = ("trl", "accelerate", "datasets")
    levels = {n: logging.getLogger(n).level for n in names}
    transformers.logging.set_verbosity_error()
    # "Loading weights" / "Writing model shards" bars; the training bar is the Trainer's own.
    transformers.logging.disable_progress_bar()
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(trl|transformers|accelerate|torch)")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(old)
        if bars:
            transformers.logging.enable_progress_bar()
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def _trainer_classes(algorithm: str):
    if algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    from trl import RLOOConfig, RLOOTrainer

    return RLOOConfig, RLOOTrainer


def _trainer_args(config: TuneConfig, out_dir: Path, device: torch.device, disable_tqdm: bool):
    ArgsCls, _ = _trainer_classes(config.algorithm)
    # transformers >= 5.x renamed gradient_checkpointing (trl still defaults the old name to True):
    # set the new name too where it exists, so checkpointing is off without a deprecation warning.
    extra = {"activation_checkpointing": False} if "activation_checkpointing" in {
        f.name for f in dataclasses.fields(ArgsCls)} else {}
    # Every trl/transformers default that would hurt here is set explicitly: trl defaults to beta 0 (no
    # KL, no base copy), bf16, gradient checkpointing, lr 1e-6, 512 new tokens, and reporting to every
    # installed tracker.
    return ArgsCls(
        output_dir=str(out_dir),
        max_steps=config.steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=0,
        max_grad_norm=config.max_grad_norm,
        beta=config.beta,
        num_generations=config.num_generations,
        per_device_train_batch_size=config.batch_size,  # counts completions
        gradient_accumulation_steps=1,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        seed=config.seed,
        data_seed=config.seed,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_dropout=True,  # dropout would make the tuned/base log-ratio noisy
        use_cpu=device.type == "cpu",
        report_to="none",
        logging_steps=1,
        save_strategy="no",  # irm saves the model itself (and save_every checkpoints)
        eval_strategy="no",
        log_completions=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=disable_tqdm,
        **extra,
    )


def _plot_curves(curves: list[dict[str, Any]], path: Path) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [c for c in curves if c.get("reward_mean") is not None]
    held = [c for c in curves if c.get("held_out_reward_mean") is not None]
    if not train and not held:
        return None
    fig = Figure(figsize=(10, 3.2))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    if train:
        s = [c["step"] for c in train]
        ax1.plot(s, [c["reward_mean"] for c in train], label="train samples", lw=1)
    if held:
        ax1.errorbar([c["step"] for c in held], [c["held_out_reward_mean"] for c in held],
                     yerr=[c["held_out_reward_std"] for c in held], fmt="o-", capsize=3, label="held-out")
    ax1.set(title="reward", xlabel="step")
    ax1.legend(fontsize=7)
    for ax, key, title in ((ax2, "kl", "KL(tuned || base) per token"), (ax3, "loss", "loss")):
        pts = [(c["step"], c[key]) for c in train if c.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        ax.set(title=title, xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------------------------
# The zero-variance guardrail
class ZeroRewardVarianceWarning(UserWarning):
    """The explicit RM gave every completion of a prompt the same score in the first steps of tuning."""


def _callable_name(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


class _RewardRecorder:
    """The RM as trl calls it, scores unchanged, recording each call's within-group spread of the scores.

    trl samples ``num_generations`` completions of each prompt side by side in the batch it scores, so
    row ``i`` of ``scores.reshape(-1, num_generations)`` is one prompt's group; its std (ddof 1, as trl's)
    is what a GRPO/RLOO advantage is made of. Measured on the RM's own scores, before trl adds anything
    (RLOO's KL penalty), so the same criterion holds for both algorithms.
    """

    def __init__(self, rm: Callable[..., list[float]], num_generations: int) -> None:
        self.rm, self.num_generations = rm, num_generations
        self.__name__ = _callable_name(rm)  # trl names the reward in its logs by this
        self._pending: list[float] = []

    def __call__(self, prompts, completions, **kwargs):
        out = self.rm(prompts, completions, **kwargs)
        r = np.asarray([np.nan if v is None else v for v in out], dtype=np.float64)
        if len(r) and len(r) % self.num_generations == 0:
            for g in r.reshape(-1, self.num_generations):
                g = g[np.isfinite(g)]
                if len(g) >= 2:
                    self._pending.append(float(np.std(g, ddof=1)))
        return out

    def drain(self) -> float | None:
        """The largest within-group std since the last call (None: nothing scored)."""
        out, self._pending = (max(self._pending) if self._pending else None), []
        return out


def _zero_variance_step(row: dict[str, Any]) -> bool | None:
    """Whether a logged step had no within-group reward variance (None: not recorded)."""
    if row.get("reward_group_std_max") is not None:  # the RM's own scores (_RewardRecorder)
        return row["reward_group_std_max"] <= ZERO_STD_TOL
    if row.get("frac_reward_zero_std") is not None:  # trl's: share of groups whose std is ~0
        return row["frac_reward_zero_std"] >= 1.0
    if row.get("reward_std") is not None:  # a model cached before either: the batch std bounds every group's
        return row["reward_std"] <= ZERO_STD_TOL
    return None


def zero_variance_flag(curves: Sequence[dict[str, Any]], first_steps: int,
                       num_generations: int | None = None) -> dict[str, Any] | None:
    """The ``zero_reward_variance`` flag of a tuning run, or None when it does not apply.

    Criterion: in **each** of the first ``first_steps`` logged steps, every prompt's group of completions
    got scores whose std is at most :data:`ZERO_STD_TOL` (the RM's own scores; trl's ``frac_reward_zero_std``
    = 1, or a batch ``reward_std`` of ~0, for records that lack them). GRPO and RLOO compare completions
    of the same prompt, so their advantages are then all zero: the steps carry no learning signal and
    the policy stays (almost) where it started, which also makes the later steps very likely the same.
    """
    train = [c for c in curves if "reward_mean" in c][:first_steps]
    if len(train) < first_steps or first_steps < 1:
        return None
    zero = [_zero_variance_step(c) for c in train]
    if not all(z is True for z in zero):
        return None
    all_rows = [c for c in curves if "reward_mean" in c]
    stds = [c.get("reward_group_std_max") for c in train if c.get("reward_group_std_max") is not None]
    means = [c["reward_mean"] for c in train if c.get("reward_mean") is not None]
    n_zero = sum(_zero_variance_step(c) is True for c in all_rows)
    group = f"{num_generations} completions" if num_generations else "completions"
    message = (
        f"The explicit reward did not vary within any prompt's group of {group} in each of the first "
        f"{first_steps} tuning steps (within-group std <= {ZERO_STD_TOL:g}; mean reward "
        f"{np.mean(means) if means else 0.0:.4g}): GRPO/RLOO advantages were all zero, so those steps had no "
        f"learning signal and left the policy (almost) where it started ({n_zero} of the {len(all_rows)} steps "
        "run had no variance). Usual causes: the prompts never elicit what "
        "the reward pays for (e.g. a lexicon whose words the completions never contain: look at a few samples "
        "and at the RM's scores of them), or the reward is constant (a classifier saturated at one label, a "
        "reward function that returns a fixed value). Fix: prompts that elicit the rewarded content, a denser "
        "reward, longer completions (max_new_tokens) or more completions per prompt (num_generations)."
    )
    return {"first_steps": first_steps, "max_group_std": max(stds) if stds else None,
            "reward_mean": float(np.mean(means)) if means else None, "zero_variance_steps": n_zero,
            "steps": len(all_rows), "message": message}


# ----------------------------------------------------------------------------------------------
# The KL / over-optimisation budget
def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class _Budget:
    """The held-out checks of a KL / over-optimisation budget, and the weights of the last check within it.

    The weights are a copy of the trainable parameters (all of them in full fine-tuning, the adapter
    with LoRA), in memory: one copy, replaced at each passing check. The frozen parameters cannot
    differ from any check's.
    """

    def __init__(self, config: TuneConfig) -> None:
        self.config = config
        self.checks: list[dict[str, Any]] = []
        self.kept_step: int | None = None
        self.stop_step: int | None = None
        self.stop_reason: str | None = None
        self.stop_message: str | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None

    def check(self, model, step: int, kl: float | None, repetition: dict[str, Any]) -> bool:
        """Record one check; keep the weights when it is within budget. Returns whether it is."""
        c = self.config
        failed: list[tuple[str, str]] = []
        if step > 0:  # step 0 is the base itself: KL(base || base) = 0 up to float noise, nothing to repeat
            if c.max_kl_per_token is not None and kl is not None and kl > c.max_kl_per_token:
                failed.append(("max_kl_per_token", f"KL(tuned || base) {kl:.4g} nats/token > max_kl_per_token "
                                                   f"{c.max_kl_per_token:g}"))
            if c.stop_on_over_optimised and repetition["flag_over_optimised"]:
                failed.append(("over_optimised", "over-optimised (" + "; ".join(repetition["reasons"]) + ")"))
        self.checks.append({"step": step, "kl_per_token": kl, "over_optimised": repetition["flag_over_optimised"],
                            "over_optimised_reasons": list(repetition["reasons"]), "within_budget": not failed})
        if not failed:
            with torch.no_grad():
                self._snapshot = {n: p.detach().clone() for n, p in _trainable(model)}
            self.kept_step = step
            return True
        if self.stop_step is None:
            kept = next(ch for ch in reversed(self.checks) if ch["step"] == self.kept_step)
            self.stop_step = step
            self.stop_reason = ", ".join(name for name, _ in failed)
            self.stop_message = (f"Held-out check at step {step}: {'; '.join(msg for _, msg in failed)}. Tuning "
                                 f"stopped there and kept the model of step {self.kept_step} (KL "
                                 f"{_fmt(kept['kl_per_token'])} nats/token, the last check within budget).")
        return False

    def discard(self) -> None:
        """Free the copy of the weights (the model in hand is the one kept)."""
        self._snapshot = None

    def restore(self, model) -> None:
        """Put the kept check's weights back into ``model``."""
        if self._snapshot is None:
            raise RuntimeError("The KL budget has no check within it to restore; step 0 (the base) always is, "
                               "so the check at step 0 did not run. This is a bug in irm.pair.tune.")
        with torch.no_grad():
            for n, p in _trainable(model):
                p.copy_(self._snapshot[n])
        self._snapshot = None


def _outcome(curves: list[dict[str, Any]], config: TuneConfig, budget: _Budget) -> dict[str, Any]:
    """How a tuning run ended (TuneResult.outcome): steps run, the step kept and why, the checks, flags."""
    steps_run = max((int(c["step"]) for c in curves if "reward_mean" in c), default=0)
    flags = {}
    zv = zero_variance_flag(curves, min(ZERO_VARIANCE_STEPS, config.steps), config.num_generations)
    if zv is not None:
        flags["zero_reward_variance"] = zv
    return {
        "steps_run": steps_run,
        "kept_step": budget.kept_step if config.has_budget and budget.checks else steps_run,
        "stopped_early": steps_run < config.steps,
        "stop_reason": budget.stop_reason,
        "stop_message": budget.stop_message,
        "checks": budget.checks,
        "flags": flags,
    }


def _make_callback(*, config: TuneConfig, eval_prompts: list[str], rm, tokenizer, tracker, curves: list,
                   partial: Path, t0: float, recorder: _RewardRecorder | None = None, budget: _Budget | None = None,
                   ref_model: Callable[[], Any] | None = None):
    """The trl callback. ``budget`` (with ``ref_model``, a function that returns the frozen base) turns on
    the KL and repetition checks that can stop tuning; ``recorder`` is the RM as trl calls it."""
    from transformers import TrainerCallback

    from irm.models.generation import generate
    from irm.pair.evaluate import completion_kl, repetition_report

    base_ids: list[list[int]] = []  # the base's completions (step 0): what repetition is compared with
    checked: list[int] = []
    first = min(ZERO_VARIANCE_STEPS, config.steps)
    warned = []

    def held_out_eval(model, step: int) -> bool:
        """Score samples of the held-out prompts; with a budget, measure KL and judge. True: within budget."""
        gens = generate(model, tokenizer, eval_prompts, max_new_tokens=config.max_new_tokens,
                        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                        seed=config.seed, batch_size=32, desc="held-out eval")
        r = np.asarray(rm(gens.prompts, gens.completions), dtype=np.float64)
        ids = gens.content_ids()
        if not base_ids:
            base_ids.extend(ids)  # step 0: the untouched base, on the same prompts and random streams
        rep, dist = repetition_report(base_ids, ids)
        row = {"step": step, "held_out_reward_mean": float(r.mean()),
               "held_out_reward_std": float(r.std(ddof=1)) if len(r) > 1 else 0.0,
               "rep_2": rep["tuned"], "distinct_2": dist["tuned"]["distinct_2"],
               "over_optimised": rep["flag_over_optimised"]}
        within = True
        if budget is not None:
            kls = [k for k in completion_kl(ref_model(), model, gens, pad_token_id=tokenizer.pad_token_id,
                                            batch_size=32) if len(k)]
            row["kl_per_token"] = float(np.concatenate(kls).mean()) if kls else None
            within = budget.check(model, step, row["kl_per_token"], rep)
            row["within_budget"] = within
        row["elapsed_s"] = time.perf_counter() - t0
        curves.append(row)
        checked.append(step)
        log.info("step %d/%d: held-out reward %.3f +- %.3f%s%s (%.0f s)", step, config.steps,
                 row["held_out_reward_mean"], row["held_out_reward_std"],
                 f", KL {_fmt(row['kl_per_token'])} nats/token" if "kl_per_token" in row else "",
                 ", over-optimised" if row["over_optimised"] else "", row["elapsed_s"])
        if not within:
            log.warning("%s", budget.stop_message if budget.stop_step == step else f"step {step} over budget")
        if tracker is not None:
            names = {"held_out_reward_mean": "held_out_reward_mean", "held_out_reward_std": "held_out_reward_std",
                     "kl_per_token": "held_out_kl_per_token", "rep_2": "held_out_rep_2",
                     "over_optimised": "held_out_over_optimised"}
            tracker.log({f"tune/{name}": float(row[k]) for k, name in names.items() if row.get(k) is not None},
                        step=step)
        return within

    class _IrmCallback(TrainerCallback):
        """Records curves, logs to the tracker, evaluates on held-out prompts (and keeps the KL budget),
        warns when the reward has no variance, saves checkpoints."""

        def on_train_begin(self, args, state, control, model=None, **kw):
            held_out_eval(model, 0)  # the base itself: step 0 of the held-out curve

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "reward" not in logs:  # the end-of-training summary, not a step
                return
            row = {
                "step": int(state.global_step),
                "reward_mean": _clean(logs.get("reward")),
                "reward_std": _clean(logs.get("reward_std")),
                "reward_group_std_max": recorder.drain() if recorder is not None else None,
                "frac_reward_zero_std": _clean(logs.get("frac_reward_zero_std")),
                "kl": _clean(logs.get("kl")),
                "loss": _clean(logs.get("loss")),
                "entropy": _clean(logs.get("entropy")),
                "completion_length": _clean(logs.get("completions/mean_length")),
                "grad_norm": _clean(logs.get("grad_norm")),
                "learning_rate": _clean(logs.get("learning_rate")),
                "elapsed_s": time.perf_counter() - t0,
            }
            curves.append(row)
            if row["step"] % max(1, config.steps // 10) == 0:
                log.info("step %d/%d: train reward %.3f +- %.3f, kl %s, loss %s (%.0f s)", row["step"], config.steps,
                         row["reward_mean"] or 0.0, row["reward_std"] or 0.0, _fmt(row["kl"]), _fmt(row["loss"]),
                         row["elapsed_s"])
            if not warned and sum("reward_mean" in c for c in curves) == first:
                warned.append(True)  # once: the flag is decided by the first steps
                flag = zero_variance_flag(curves, first, config.num_generations)
                if flag is not None:
                    log.warning("%s", flag["message"])
                    # stacklevel 1: issued from irm, not from the trainer, whose warnings _quiet() silences
                    warnings.warn(flag["message"], ZeroRewardVarianceWarning, stacklevel=1)
            if tracker is not None:
                tracker.log({f"tune/{k}": v for k, v in row.items() if k != "step" and v is not None},
                            step=row["step"])

        def on_step_end(self, args, state, control, model=None, **kw):
            step = int(state.global_step)
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                if not held_out_eval(model, step):
                    control.should_training_stop = True
            if config.save_every and step % config.save_every == 0 and step != config.steps:
                # Weights only (no optimiser state): these are for looking at, not for resuming.
                out = partial / "checkpoints" / f"step-{step:06d}"
                model.save_pretrained(out)
                tokenizer.save_pretrained(out)

        def on_train_end(self, args, state, control, model=None, **kw):
            step = int(state.global_step)
            if not checked or checked[-1] != step:  # a check that stopped tuning was this step's already
                held_out_eval(model, step)
            if budget is not None and budget.kept_step != step:
                budget.restore(model)
                log.warning("KL budget: the tuned model is the one of step %s, not of step %d (%s).",
                            budget.kept_step, step, budget.stop_reason)
            elif budget is not None:
                budget.discard()  # the last step is within budget: its copy is not needed

    return _IrmCallback()


def _drop_log_printing(trainer, disable_tqdm: bool) -> None:
    """Keep the Trainer's progress bar but not its dump of every log dict to stdout (curves.json has them)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            pass

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not disable_tqdm:
        trainer.add_callback(_BarOnly)


def _train(config, hf_model, tokenizer, rm, train, eval_prompts, tracker, curves, partial, dev, disable_tqdm,
           peft_config, t0, budget: _Budget | None = None, load_base: Callable[[], Any] | None = None):
    """Build the trl trainer, train, and save the (merged) model into ``partial``.

    With a ``budget``, the held-out checks measure KL against trl's frozen base copy (with LoRA, where trl
    keeps none, against ``load_base()``), and the saved model is the last check within budget.
    """
    from datasets import Dataset

    _, TrainerCls = _trainer_classes(config.algorithm)
    # An nn.Module RM is run by trl as a sequence classifier on token ids: it is passed as it is, and the
    # zero-variance guardrail reads trl's frac_reward_zero_std instead of the recorder's.
    recorder = None if isinstance(rm, torch.nn.Module) else _RewardRecorder(rm, config.num_generations)
    refs: list[Any] = []

    def ref_model():
        if not refs:
            ref = getattr(trainer, "ref_model", None)
            if ref is None:  # LoRA: trl disables the adapter instead of keeping a copy
                if load_base is None:
                    raise RuntimeError("The KL budget needs the base model, but trl kept no copy of it and no "
                                       "loader was given; this is a bug in irm.pair.tune.")
                ref = load_base()
            refs.append(ref)
        return refs[0]

    with _quiet():
        args = _trainer_args(config, partial / "trainer", dev, disable_tqdm)
        callback = _make_callback(config=config, eval_prompts=eval_prompts, rm=rm, tokenizer=tokenizer,
                                  tracker=tracker, curves=curves, partial=partial, t0=t0, recorder=recorder,
                                  budget=budget, ref_model=ref_model)
        trainer = TrainerCls(
            model=hf_model,
            reward_funcs=recorder if recorder is not None else rm,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": train}),
            processing_class=tokenizer,
            callbacks=[callback],
            peft_config=peft_config,
        )
        _drop_log_printing(trainer, disable_tqdm)
        trainer.train()
        wall = time.perf_counter() - t0

        model = trainer.model
        if config.lora:
            model = model.merge_and_unload()  # a plain checkpoint: every later stage loads it like any model
        model.eval()
        # Training turns the KV cache off in the config; a saved model is for generating with, so turn it on.
        model.config.use_cache = True
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return trainer, model, wall


def _lora_config(config: TuneConfig):
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError(
            "TuneConfig.lora=True needs the package 'peft', which is not installed: pip install 'irm[lora]' "
            "(or pip install peft), or set lora = false for full fine-tuning, the default."
        ) from e
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _load_cached(out: Path, key: str, config: TuneConfig) -> TuneResult:
    record = json.loads((out / TUNE_CONFIG_JSON).read_text())
    split = json.loads((out / SPLIT_JSON).read_text())
    curves = json.loads((out / CURVES_JSON).read_text())
    ev_path = out / EVAL_JSON
    evaluation = json.loads(ev_path.read_text()) if ev_path.is_file() else None
    return TuneResult(checkpoint=out, key=key, train_prompts=split["train"], held_out_prompts=split["held_out"],
                      curves=curves, wall_time_s=float(record.get("wall_time_s", 0.0)), reused=True,
                      config=config, evaluation=evaluation, record=record)


def _is_complete(out: Path) -> bool:
    return all((out / f).is_file() for f in ("config.json", TUNE_CONFIG_JSON, CURVES_JSON, SPLIT_JSON))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def tune(
    base_spec: str,
    rm: Callable[..., list[float]],
    prompts: Sequence[str],
    config: TuneConfig | None = None,
    *,
    cache_root: str | Path,
    run_dir: str | Path | None = None,
    force: bool = False,
    tracker=None,
    device: str | torch.device = "cpu",
) -> TuneResult:
    """RLHF-tune ``base_spec`` against ``rm`` on ``prompts`` (minus a held-out share); cached.

    Parameters
    ----------
    base_spec: any :func:`irm.models.load_model` spec; a GGUF/embedded model is tuned from its plain
        dequantised checkpoint (a GGUF-loaded model cannot be fine-tuned).
    rm: any irm RM or trl reward function ``rm(prompts, completions, **kw) -> list[float]``.
    prompts: plain-text prompts; ``config.held_out_fraction`` of them (split with ``config.seed``) are
        never used for tuning and are returned as ``held_out_prompts`` for evaluation.
    cache_root: the model lands in ``cache_root/tuned/<key>/``.
    run_dir: if given, ``tune.json`` (the result without the model) and ``tune_curves.png`` go there.
    force: retrain even if the cache holds this model.
    tracker: an :class:`irm.run.tracking.Tracker` or None; logs ``tune/...`` keys with the trainer step.
    device: ``"cpu"``, ``"cuda"``, ``"auto"``...

    Returns a :class:`TuneResult`; ``result.checkpoint`` loads with ``irm.models.load_model``.
    """
    config = config or TuneConfig()
    with _threads(config.num_threads):
        return _tune(base_spec, rm, prompts, config, cache_root=cache_root, run_dir=run_dir, force=force,
                     tracker=tracker, device=device)


def _tune(base_spec, rm, prompts, config: TuneConfig, *, cache_root, run_dir, force, tracker, device) -> TuneResult:
    from irm.models import load_model, model_identity, resolve_device

    prompts = list(prompts)
    if not prompts:
        raise ValueError("tune got no prompts; pass a list of plain-text prompts (e.g. irm.data.default_prompts()).")
    train, held_out = split_texts(prompts, config.held_out_fraction, config.seed)
    if len(train) < config.prompts_per_step:
        raise ValueError(
            f"Only {len(train)} training prompts remain after holding out {len(held_out)}, fewer than "
            f"prompts_per_step={config.prompts_per_step}; pass more prompts or lower prompts_per_step."
        )
    dev = resolve_device(device)
    peft_config = _lora_config(config) if config.lora else None  # fails early if peft is missing

    # The key needs the base's weight fingerprint, not its weights: a cached tuned model is found without
    # loading the base. A GGUF spec resolves to its plain checkpoint.
    base_ident = _base_identity(model_identity(base_spec))
    rm_ident = reward_model_identity(rm)
    key = tune_key(base_ident, rm_ident, config, texts_hash(prompts))
    root = Path(cache_root).expanduser() / TUNED_SUBDIR
    out = root / key

    if _is_complete(out) and not force:
        log.info("Reusing the tuned model cached at %s (force=True retrains).", out)
        result = _load_cached(out, key, config)
        for name, flag in result.flags.items():
            log.warning("The cached tuned model is flagged %s: %s", name, flag["message"])
        if config.final_eval and result.evaluation is None:
            result.evaluation = _final_eval(base_spec, out, rm, held_out, config, dev)
        _write_run_dir(run_dir, result)
        return result

    with _quiet():
        base = load_model(base_spec, device=dev)
    if _base_identity(base.identity) != base_ident:  # e.g. a hub model that moved on in between
        raise RuntimeError(f"{base_spec!r} changed while it was being loaded ({base_ident} -> "
                           f"{_base_identity(base.identity)}); run again.")
    if force and out.exists():
        shutil.rmtree(out)
    partial = root / f"{key}.partial"
    if partial.exists():
        shutil.rmtree(partial)  # a crashed earlier run: start over (no resumption)
    partial.mkdir(parents=True)

    hf_model = base.hf_model
    # trl rebuilds the frozen base copy from config._name_or_path: it must be the real plain checkpoint.
    hf_model.config._name_or_path = base.identity.checkpoint
    hf_model.train()
    curves: list[dict[str, Any]] = []
    rng_eval = np.random.default_rng(config.seed)
    eval_prompts = [held_out[i] for i in sorted(rng_eval.permutation(len(held_out))[: config.eval_prompts])]
    disable_tqdm = os.environ.get("IRM_PROGRESS", "1") == "0"

    from transformers import set_seed

    set_seed(config.seed)
    log.info("Tuning %s against %s with %s: %d steps x %d completions (%d train / %d held-out prompts) -> %s",
             base_spec, rm_ident.get("name"), config.algorithm.upper(), config.steps, config.batch_size,
             len(train), len(held_out), out)
    budget = _Budget(config)

    def load_base():
        with _quiet():
            return load_model(base_spec, device=dev).hf_model

    t0 = time.perf_counter()
    try:
        trainer, model, wall = _train(config, hf_model, base.tokenizer, rm, train, eval_prompts, tracker, curves,
                                      partial, dev, disable_tqdm, peft_config, t0,
                                      budget=budget if config.has_budget else None, load_base=load_base)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # no half-made model is ever mistaken for a cached one
        raise

    shutil.rmtree(partial / "trainer", ignore_errors=True)
    record = {
        "key": key,
        "base_spec": str(base_spec),
        "base": base.identity.to_dict(),
        "rm": rm_ident,
        "config": config.to_dict(),
        "seed": config.seed,
        "prompts_hash": texts_hash(prompts),
        "n_prompts": len(prompts),
        "device": str(dev),
        "wall_time_s": wall,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "outcome": _outcome(curves, config, budget),
    }
    _write_json(partial / TUNE_CONFIG_JSON, record)
    _write_json(partial / CURVES_JSON, curves)
    _write_json(partial / SPLIT_JSON, {"seed": config.seed, "held_out_fraction": config.held_out_fraction,
                                       "train": train, "held_out": held_out})
    _write_json(partial / CHECKPOINT_SOURCE, {"kind": "tuned", "key": key, "base": base.identity.to_dict(),
                                              "rm": rm_ident})
    del trainer, model, hf_model, base
    if out.exists():
        shutil.rmtree(out)
    partial.replace(out)
    outcome = record["outcome"]
    if outcome["stop_message"]:
        log.info("%s", outcome["stop_message"])
    log.info("Tuned in %.0f s (%d steps, kept step %s); saved to %s", wall, outcome["steps_run"],
             outcome["kept_step"], out)

    result = TuneResult(checkpoint=out, key=key, train_prompts=train, held_out_prompts=held_out, curves=curves,
                        wall_time_s=wall, reused=False, config=config, record=record)
    if config.final_eval:
        result.evaluation = _final_eval(base_spec, out, rm, held_out, config, dev)
    _write_run_dir(run_dir, result)
    return result


def _final_eval(base_spec: str, out: Path, rm, held_out: list[str], config: TuneConfig, dev) -> dict[str, Any]:
    from irm.models import ModelPair, load_model
    from irm.pair.evaluate import evaluate_pair

    with _quiet():
        pair = ModelPair(load_model(base_spec, device=dev), load_model(str(out), device=dev))
    return evaluate_pair(pair, rm, held_out, max_new_tokens=config.max_new_tokens, seed=config.seed,
                         temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                         batch_size=32, run_dir=out)


def _write_run_dir(run_dir: str | Path | None, result: TuneResult) -> None:
    if run_dir is None:
        return
    rd = Path(run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    _write_json(rd / TUNE_SUMMARY_JSON, result.to_dict())
    try:
        _plot_curves(result.curves, rd / CURVES_PNG)
    except Exception as e:  # a plot must never lose a finished tuning run
        log.warning("Could not plot the tuning curves: %s", e)
