"""The ``reward`` stage (build the explicit RM of ``[reward]``), the ``train_rm`` stage (train an RM on human
preference pairs, ``[train_rm]``) and the ``humans`` stage (the run's IRMs against the same humans).

With ``[train_rm] enabled = true`` and ``use_as_reward = true`` the trained RM is the run's explicit RM: the
``reward`` stage leaves building it to ``train_rm`` (or, when a run leaves ``train_rm`` out, trains or reuses it
itself), and tuning, the IRM and the explanations all use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from irm.core.log import get_logger
from irm.data.human import FETCH_COMMAND, HumanDataMissing, human_data_path
from irm.rewards.humans import (
    VaderAnalyzerRM,
    evaluate_rms,
    human_eval_rows,
    plot_human_eval,
    three_way,
    three_way_rows,
)
from irm.rewards.train import BUILTIN_BACKBONES, TrainRMConfig, TrainRMResult, train_reward_model
from irm.run.config import ConfigError, register_section
from irm.run.registry import RunContext, preflight, stage
from irm.run.report import fmt, md_table, renderer

__all__: list[str] = []

log = get_logger(__name__)

register_section("train_rm", TrainRMConfig)

HUMAN_EVAL_PNG = "human_eval.png"
IRM_HUMAN_EVAL_PNG = "irm_human_eval.png"


def _record_reward(ctx: RunContext, kind: str) -> None:
    r = ctx.rm.score(ctx.test_prompts, [""] * len(ctx.test_prompts))
    info: dict[str, Any] = {"name": ctx.rm.name, "kind": kind,
                            "held_out_prompt_reward": {"mean": float(np.mean(r)), "std": float(np.std(r))}}
    if hasattr(ctx.rm, "table"):
        info["table_size"] = len(ctx.rm.table)
    ctx.run.update_results("reward", info)


def _learned_rm(ctx: RunContext) -> TrainRMResult:
    """Train the RM of ``[train_rm]``, or reuse it from the cache; curves go to the tracker as a table."""
    from irm.models import cache_dir
    from irm.models.loading import resolve_checkpoint

    cfg: TrainRMConfig = ctx.cfg.section("train_rm")
    backbone_dir = None
    if cfg.backbone not in BUILTIN_BACKBONES:
        kind, ckpt = resolve_checkpoint(cfg.backbone)
        if kind == "hub":
            raise ConfigError(f"[train_rm] backbone {cfg.backbone!r} is a hub name; download it (save_pretrained) "
                              "and name the directory, or use 'minilm' or 'smollm2-135m-instruct'.")
        backbone_dir = ckpt
    res = train_reward_model(cfg, cache_root=cache_dir(), backbone_dir=backbone_dir, force=ctx.force,
                             device=ctx.cfg.models.device)
    curves = res.meta.get("curves") or []
    if curves and ctx.tracker is not None:
        cols = sorted({k for row in curves for k in row} - {"step"})
        # A table, not scalars: tune logs its curves from step 0, and wandb drops steps that go back.
        ctx.tracker.log_table("train_rm/curves", ["step", *cols], [[row["step"], *(row.get(c) for c in cols)]
                                                                     for row in curves])
    return res


@preflight("train_rm")
def _check_train_rm(cfg) -> None:
    tcfg: TrainRMConfig = cfg.section("train_rm")
    if not tcfg.enabled:
        return
    if not human_data_path().is_file():
        raise ConfigError(f"[train_rm] is enabled but the human-rated data is not fetched ({human_data_path()} is "
                          f"missing). Fetch it once with: {FETCH_COMMAND}")
    if tcfg.backbone not in BUILTIN_BACKBONES:
        p = Path(tcfg.backbone).expanduser()
        if (tcfg.backbone.startswith((".", "/", "~")) or p.suffix == ".gguf") and not p.exists():
            raise ConfigError(f"[train_rm] backbone {tcfg.backbone!r}: {p.resolve()} does not exist; name 'minilm', "
                              "a model spec ('smollm2-135m-instruct') or an existing directory.")


@stage("reward", order=10)
def _stage_reward(ctx: RunContext) -> None:
    """Build the explicit RM and record what it says of the prompts themselves."""
    tcfg: TrainRMConfig = ctx.cfg.section("train_rm")
    if tcfg.enabled and tcfg.use_as_reward:
        if "train_rm" in ctx.state.get("stages", ("train_rm",)):
            log.info("reward: the explicit RM is the one the train_rm stage trains ([train_rm] use_as_reward)")
            return
        ctx.rm = _learned_rm(ctx).load()  # train_rm left out of this run: train or reuse it here
        _record_reward(ctx, "classifier")
        return
    ctx.rm = ctx.cfg.reward.build()
    _record_reward(ctx, ctx.cfg.reward.kind)


@stage("train_rm", order=15)
def _stage_train_rm(ctx: RunContext) -> None:
    """Train (or reuse) the RM of ``[train_rm]`` on human preference pairs and measure it against the humans."""
    tcfg: TrainRMConfig = ctx.cfg.section("train_rm")
    if not tcfg.enabled:
        return
    try:
        res = _learned_rm(ctx)
    except HumanDataMissing as e:
        raise ConfigError(str(e)) from e
    learned = res.load()
    info = res.to_dict()
    if tcfg.use_as_reward:
        ctx.rm = learned
        _record_reward(ctx, "classifier")
    if tcfg.evaluate:
        from irm.rewards import load_rm

        rms = {"vader_analyzer": VaderAnalyzerRM(), "lexicon": load_rm("vader"), "learned_rm": learned}
        ev = evaluate_rms(rms, tcfg.eval_corpora, margin=tcfg.eval_margin, n_boot=tcfg.n_boot, seed=ctx.cfg.seed,
                          use_instruction={"learned_rm": tcfg.with_prompt})
        info["human_eval"] = ev
        plot_human_eval(ev, ctx.run_path / "plots" / HUMAN_EVAL_PNG)
        if ctx.tracker is not None:
            ctx.tracker.log({f"train_rm/{name}_{corpus}_pairwise_accuracy": m["pairwise_accuracy"]["value"]
                             for name, per in ev["rms"].items() for corpus, m in per.items()},
                            step=ctx.tracker.current_step)
    ctx.run.update_results("train_rm", info)


@stage("humans", order=75)
def _stage_humans(ctx: RunContext) -> None:
    """The run's IRMs (the saved linear probe and the log-ratio) against the human means, as the RMs were."""
    tcfg: TrainRMConfig = ctx.cfg.section("train_rm")
    irms = ctx.state.get("irms") or {}
    if not (tcfg.enabled and tcfg.evaluate and tcfg.eval_irms) or not irms:
        return
    rms = dict(irms)
    if ctx.rm is not None:
        rms = {"explicit_rm": ctx.rm, **rms}
    # The IRMs read a prompt: each text is the response to its corpus's instruction.
    uses = {k: k != "explicit_rm" or tcfg.with_prompt for k in rms}
    scores: dict[str, dict[str, Any]] = {}
    corpora: dict[str, Any] = {}
    from irm.models.memo import sharing_logprobs

    # The probe IRM's capture leaves the texts' log-probabilities for the log-ratio IRM (irm.models.memo).
    with sharing_logprobs(*((ctx.pair.base, ctx.pair.tuned) if ctx.pair is not None else ())):
        ev = evaluate_rms(rms, tcfg.irm_eval_corpora, margin=tcfg.eval_margin, n_boot=tcfg.n_boot,
                          seed=ctx.cfg.seed, use_instruction=uses, scores_out=scores, corpora_out=corpora,
                          max_texts=tcfg.irm_eval_max_texts)
    plot_human_eval(ev, ctx.run_path / "plots" / IRM_HUMAN_EVAL_PNG)
    if "explicit_rm" in scores:
        # Three sides on the same texts: where the RM orders a pair against the humans, whom does the IRM follow?
        ev["three_way"] = {name: {c: three_way(corpora[c], scores["explicit_rm"][c], per[c], margin=tcfg.eval_margin,
                                               n_boot=tcfg.n_boot, seed=ctx.cfg.seed) for c in per}
                           for name, per in scores.items() if name != "explicit_rm"}
        for name, per in ev["three_way"].items():
            for c, m in per.items():
                log.info("humans: %s on %s: follows the RM on %.3f of the %d pairs the RM orders against the humans",
                         name, c, m["irm_follows_rm_where_rm_is_against_humans"]["value"],
                         m["n_pairs_rm_against_humans"])
    ctx.run.update_results("humans", ev)


def _human_table(ev: dict[str, Any]) -> str:
    header, rows = human_eval_rows(ev)
    return md_table(header, rows)


@renderer("train_rm", order=13)
def _render_train_rm(sec: dict, run: Path) -> str:
    keys = ("checkpoint", "reused", "backbone", "wall_time_s", "steps")
    out = [md_table(["key", "value"], [[k, sec[k]] for k in keys if k in sec])]
    data = sec.get("data") or {}
    val = sec.get("validation") or {}
    out.append(f"\nTrained on {data.get('n_train_pairs')} human preference pairs (mean ratings differ by >= "
               f"{(sec.get('config') or {}).get('margin')}); validation accuracy {fmt(val.get('eval_accuracy'))} "
               f"on {data.get('n_val_pairs')} pairs.\n")
    ev = sec.get("human_eval")
    if ev:
        out.append(f"\nAgainst the human means on each corpus's {ev['split']} split (pairs whose means differ by >= "
                   f"{ev['margin']:g}; 95% bootstrap CIs over texts). VADER's analyzer is the anchor (r = 0.881 "
                   "with the tweets' means in the paper):\n\n")
        out.append(_human_table(ev))
        if (run / "plots" / HUMAN_EVAL_PNG).is_file():
            out.append(f"\n![RMs against humans](plots/{HUMAN_EVAL_PNG})\n")
    return "".join(out)


def _cell(text: str, n: int = 120) -> str:
    """A corpus text as one markdown table cell: one line, pipes escaped, cut at ``n`` characters."""
    t = " ".join(str(text).split())
    t = t if len(t) <= n else t[: n - 1] + "…"
    return t.replace("|", "\\|")


@renderer("humans", order=75)
def _render_humans(sec: dict, run: Path) -> str:
    out = [f"The IRMs against the human means ({sec['split']} split, margin {sec['margin']:g}, 95% CIs), each text "
           "the response to its corpus's instruction:\n\n", _human_table(sec)]
    if (run / "plots" / IRM_HUMAN_EVAL_PNG).is_file():
        out.append(f"\n![IRMs against humans](plots/{IRM_HUMAN_EVAL_PNG})\n")
    tw = sec.get("three_way")
    if tw:
        out.append("\n**Humans, the RM and the IRM on the same texts.** Where the explicit RM orders a pair of texts "
                   "against the humans, does the IRM (what the tuned policy learned) follow the RM or the humans? "
                   "1.0: it learned the RM, errors included; 0.0: it sides with the humans (95% CIs over texts).\n\n")
        header, rows = three_way_rows(tw)
        out.append(md_table(header, rows))
        for name, per in tw.items():
            for corpus, m in per.items():
                ex = m.get("examples") or []
                if not ex:
                    continue
                out.append(f"\n\nWhere the RM is most clearly against the humans ({name}, {corpus}):\n\n")
                out.append(md_table(["humans prefer", "over", "human means", "RM scores", "IRM scores",
                                     "IRM follows"],
                                    [[_cell(e["human_preferred"]), _cell(e["other"]),
                                      " vs ".join(f"{v:.2f}" for v in e["human_means"]),
                                      " vs ".join(f"{v:.3g}" for v in e["rm_scores"]),
                                      " vs ".join(f"{v:.3g}" for v in e["irm_scores"]), e["irm_follows"]]
                                     for e in ex]))
        out.append("\n")
    return "".join(out)
