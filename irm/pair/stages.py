"""Pipeline stages that make and measure the pair: ``tune`` (20), ``pair`` (30), ``evaluate`` (40),
``divergence`` (50).

Their config sections are ``[tune]`` (:class:`irm.pair.tune.TuneConfig`), ``[evaluation]`` and
``[divergence]``. Tuning runs only when ``[models] tuned`` is empty; a named tuned model (hub,
local directory or GGUF) is used as it is.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from irm.core.constants import ROLES
from irm.core.log import get_logger
from irm.pair.tune import CURVES_PNG, TuneConfig, tune
from irm.run.config import ConfigError, register_section
from irm.run.registry import RunContext, stage
from irm.run.report import fmt, md_table, renderer

__all__ = ["EvaluationConfig", "DivergenceConfig"]

log = get_logger(__name__)


@dataclass
class EvaluationConfig:
    n_prompts: int | None = field(default=None, metadata={"help": "Held-out prompts to evaluate on (None: all)."})
    n_samples_per_prompt: int = field(default=1, metadata={"help": "Generations per prompt and model."})
    max_new_tokens: int = field(default=20, metadata={"help": "Tokens per generation."})
    batch_size: int = field(default=32, metadata={"help": "Generation batch size (speed only: each completion samples from its own random stream)."})
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap resamples for CIs."})

    def __post_init__(self) -> None:
        if self.n_samples_per_prompt < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("[evaluation] n_samples_per_prompt, max_new_tokens and batch_size must be >= 1.")


@dataclass
class DivergenceConfig:
    top_k: int = field(default=5, metadata={"help": "Most divergent layers handed to later stages."})
    rank_by: str = field(default="param_abs", metadata={
        "help": "param_abs (the paper), param_rel, act_rel_l2 or act_cosine."})
    n_texts: int = field(default=64, metadata={"help": "Held-out prompts for activation divergence."})
    max_length: int = field(default=64, metadata={"help": "Token limit of those texts."})

    def __post_init__(self) -> None:
        from irm.pair.divergence import RANK_BY

        if self.rank_by not in RANK_BY:
            raise ConfigError(f"[divergence] rank_by {self.rank_by!r} is not one of {RANK_BY}.")
        if self.top_k < 1:
            raise ConfigError(f"[divergence] top_k must be >= 1, got {self.top_k}.")


register_section("tune", TuneConfig)
register_section("evaluation", EvaluationConfig)
register_section("divergence", DivergenceConfig)


@stage("pair", order=30)
def _stage_pair(ctx: RunContext) -> None:
    ctx.load_models()
    if ctx.pair is None:
        log.warning("No tuned model: [models] tuned is empty and no tuning stage produced one; "
                    "later stages run on the base model alone.")
        ctx.run.update_results("pair", {"base": ctx.base.identity.to_dict(), "tuned": None})


@stage("tune", order=20)
def _stage_tune(ctx: RunContext) -> None:
    if ctx.cfg.models.tuned:
        ctx.run.update_results("tune", {"skipped": f"ready-made tuned model {ctx.cfg.models.tuned!r}"})
        return
    from irm.models import cache_dir

    cfg: TuneConfig = ctx.cfg.section("tune")
    if cfg.final_eval and "evaluate" in ctx.state.get("stages", ()):
        # The evaluate stage measures the pair on the run's held-out prompts; tune's own final evaluation
        # (on its split of the train prompts) would repeat the same generations and scores. A cached
        # model without one gets it when `irm tune` reuses it (final_eval does not change the key).
        log.info("tune: final evaluation left to the evaluate stage")
        cfg = dataclasses.replace(cfg, final_eval=False)
    # Tuning sees only the run's train prompts; the run's held-out prompts stay unseen by every stage
    # that fits anything. trl splits off its own in-training evaluation prompts from these.
    result = tune(ctx.cfg.models.base, ctx.rm, ctx.train_prompts, cfg, cache_root=cache_dir(), run_dir=ctx.run_path,
                  force=ctx.force, tracker=ctx.tracker, device=ctx.cfg.models.device)
    ctx.state["tuned_checkpoint"] = str(result.checkpoint)
    ctx.state["tune_beta"] = cfg.beta
    _link_tuned(ctx.run_path / "tuned", Path(result.checkpoint))
    ctx.run.update_results("tune", result.to_dict())
    log.info("Tuned model %s (%s, %.0f s of training)", result.checkpoint,
             "reused from cache" if result.reused else "trained", result.wall_time_s)


@renderer("tune", order=15)
def _render_tune(sec: dict, run: Path) -> str:
    """The tune section: where the model is, which step was kept and why, the budget's checks, and any flag
    (a flagged run is shown first, in bold: its tuned model may not be what the rest of the report assumes)."""
    if "skipped" in sec:
        return f"Skipped: {sec['skipped']}\n"
    out = [f"**Warning: {name.replace('_', ' ')}.** {flag.get('message', '')}\n\n"
           for name, flag in (sec.get("flags") or {}).items()]
    keys = ("checkpoint", "key", "reused", "wall_time_s", "n_train_prompts", "n_held_out_prompts", "held_out_hash",
            "steps_run", "kept_step", "stopped_early", "stop_reason")
    out.append(md_table(["key", "value"], [[k, sec[k]] for k in keys if k in sec]))
    if sec.get("stop_message"):
        out.append(f"\n{sec['stop_message']}\n")
    checks = sec.get("checks") or []
    if checks:
        cfg = sec.get("config") or {}
        budget = [f"max_kl_per_token {cfg['max_kl_per_token']:g}" if cfg.get("max_kl_per_token") is not None else None,
                  "stop_on_over_optimised" if cfg.get("stop_on_over_optimised") else None]
        out.append(f"\nHeld-out checks of the budget ({', '.join(b for b in budget if b)}): exact KL(tuned || base) "
                   "per completion token, and repetition against the base's samples of step 0.\n\n")
        out.append(md_table(["step", "KL/token", "over-optimised", "within budget", "kept"],
                            [[c["step"], c.get("kl_per_token"),
                              "; ".join(c.get("over_optimised_reasons") or []) or c.get("over_optimised"),
                              c.get("within_budget"), "**kept**" if c["step"] == sec.get("kept_step") else ""]
                             for c in checks]))
    ev = sec.get("evaluation") or {}
    if ev.get("reward"):
        r = ev["reward"]
        out.append(f"\nTune's own held-out evaluation: reward {fmt(r['base']['mean'])} (base) -> "
                   f"{fmt(r['tuned']['mean'])} (tuned), effect size {fmt(r.get('effect_size'), 2)} base std, "
                   f"KL {fmt((ev.get('kl_per_token') or {}).get('mean'))} nats/token.\n")
    if (run / CURVES_PNG).is_file():
        out.append(f"\n![tuning curves]({CURVES_PNG})\n")
    return "".join(out)


def _link_tuned(link: Path, checkpoint: Path) -> None:
    """``RUN_DIR/tuned``: a symlink to the cached checkpoint, so ``load_model("runs/NAME/tuned")`` works
    (where symlinks are not allowed, ``tuned.txt`` holds the path instead)."""
    try:
        if link.is_symlink() or link.is_file():
            link.unlink()
        if not link.exists():
            link.symlink_to(checkpoint.resolve(), target_is_directory=True)
    except OSError:
        link.with_suffix(".txt").write_text(str(checkpoint.resolve()) + "\n")


@stage("evaluate", order=40)
def _stage_evaluate(ctx: RunContext) -> None:
    from irm.pair.evaluate import evaluate_pair, evaluation_metrics

    if ctx.pair is None:
        ctx.run.update_results("evaluation", {"skipped": "no tuned model"})
        return
    cfg: EvaluationConfig = ctx.cfg.section("evaluation")
    prompts = ctx.test_prompts[: cfg.n_prompts] if cfg.n_prompts else ctx.test_prompts
    out_dir = ctx.run.sub("evaluation")
    res = evaluate_pair(ctx.pair, ctx.rm, prompts, n_samples_per_prompt=cfg.n_samples_per_prompt,
                        max_new_tokens=cfg.max_new_tokens, seed=ctx.cfg.seed, run_dir=out_dir,
                        batch_size=cfg.batch_size, n_boot=cfg.n_boot, memo=ctx.generations)
    ctx.run.update_results("evaluation", res)
    ctx.tracker.log(evaluation_metrics(res), step=ctx.tracker.current_step)
    samples = [json.loads(line) for line in (out_dir / "eval_samples.jsonl").read_text().splitlines() if line]
    ctx.state["samples"] = [{k: s[k] for k in ("prompt", *ROLES)} for s in samples]
    ctx.tracker.log_table("eval/samples", ["prompt", "base", "tuned", "reward_base", "reward_tuned"],
                          [[s["prompt"], s["base"], s["tuned"], s["reward_base"], s["reward_tuned"]]
                           for s in samples[:50]])


@stage("divergence", order=50)
def _stage_divergence(ctx: RunContext) -> None:
    from irm.pair.divergence import layer_divergence

    if ctx.pair is None:
        ctx.run.update_results("divergence", {"skipped": "no tuned model"})
        return
    cfg: DivergenceConfig = ctx.cfg.section("divergence")
    top_k = min(cfg.top_k, ctx.pair.base.n_layers)
    res = layer_divergence(ctx.pair, ctx.test_prompts[: cfg.n_texts], top_k=top_k, run_dir=ctx.run.sub("plots"),
                           rank_by=cfg.rank_by, max_length=cfg.max_length)
    ctx.state["top_layers"] = list(res["top_k"])
    ctx.run.update_results("divergence", res)
    cols = ["layer", "param_abs", "param_rel", "act_rel_l2", "act_cosine"]
    ctx.tracker.log_table("divergence/layers", cols, [[row.get(c) for c in cols] for row in res["layers"]])

