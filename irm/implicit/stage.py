"""The ``irm`` stage of ``irm run``: word data from the pair -> IRM sources -> comparison -> plots.

Writes the ``irm`` section of results.json (documented in docs/results.md) and leaves the fitted IRMs
in ``ctx.state["irms"]`` as reward models for later stages (contrastive explanations).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irm.activations.capture import StoreExistsError, capture_activations
from irm.core.log import get_logger
from irm.implicit.logratio import BaseLogprobRM, LogRatioRM
from irm.implicit.probe_rm import ProbeComponent, ProbeMeta, ProbeRM
from irm.implicit.reconstruct import (
    PROBE_KINDS,
    UNSUPERVISED,
    WordData,
    best,
    cv_tau_interval,
    divergence_table,
    reconstruct,
    recovered,
    summarise,
)
from irm.implicit.sequence import collect_sequence_data, compare_sequences
from irm.implicit.words import NEUTRAL_WORDS, TEMPLATES, WordSplit, build_triples, word_records
from irm.models.memo import sharing_logprobs
from irm.rewards import TokenUtilityRM
from irm.rewards.utilities import resolve_templates, word_utilities
from irm.run.config import ConfigError, register_section
from irm.run.registry import RunContext, preflight, stage
from irm.run.report import fmt

__all__ = ["IRMConfig", "collect_word_data", "sequence_agreement"]

log = get_logger(__name__)


@dataclass
class IRMConfig:
    max_words: int = field(default=1000, metadata={"help": "Lexicon words used (deterministic subsample)."})
    test_fraction: float = field(default=0.2, metadata={"help": "Share of words held out from every fit."})
    layers: list[int] | str = field(default="top_k", metadata={
        "help": "'top_k' (the most divergent layers, plus the last), 'all', or a list of layer indices."})
    top_k: int = field(default=5, metadata={"help": "How many divergent layers when layers = 'top_k'."})
    hook: str = field(default="blocks.{layer}.hook_resid_post", metadata={"help": "Hook template of the probes."})
    beta: float | None = field(default=None, metadata={
        "help": "KL coefficient for the log-ratio reward; None: the tune's beta, else 0.04."})
    feature_sets: list[str] = field(default_factory=lambda: ["tuned", "base", "diff"], metadata={
        "help": "Activations the probes read: tuned, base, diff (= tuned - base)."})
    batch_size: int = field(default=64, metadata={"help": "Texts per forward pass."})
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples for confidence intervals."})
    sequence_eval: bool = field(default=True, metadata={
        "help": "Also compare IRM and explicit rewards on held-out (prompt, response) pairs."})
    sequence_probes: bool = field(default=True, metadata={
        "help": "Also fit probes on whole responses (held-out generations; targets from the pair) and compare "
                "them with the explicit RM on held-out prompts."})
    templates: list[str] | str = field(default="reviews", metadata={
        "help": "Sentence templates that put each word in context, each ending with its '{w}' slot: a set "
                "('reviews', 'everyday', 'assistant'), 'prompts' (the run's own prompts + ' {w}'), a file with "
                "one template per line (relative to the config file), or a list."})
    words: str = field(default="rm", metadata={
        "help": "The words compared: 'rm' (a lexicon RM's own words; VADER's for any other RM), 'vader', or a "
                "lexicon TSV whose words are used (its utilities are not)."})

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) and self.layers not in ("top_k", "all"):
            raise ConfigError(f"[irm] layers must be 'top_k', 'all' or a list of ints, got {self.layers!r}.")
        bad = [f for f in self.feature_sets if f not in ("tuned", "base", "diff")]
        if bad or not self.feature_sets:
            raise ConfigError(f"[irm] feature_sets {self.feature_sets} must be a non-empty subset of tuned, base, diff.")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"[irm] test_fraction must be in (0, 1), got {self.test_fraction}.")
        if self.max_words < 50:
            raise ConfigError(f"[irm] max_words must be >= 50, got {self.max_words}.")
        if isinstance(self.templates, str) and self.templates in ("reviews", "everyday", "assistant", "prompts"):
            pass
        else:
            try:  # a list or a file: checked now; a relative file is checked again against the config's folder
                if not isinstance(self.templates, str) or "{w}" in self.templates:
                    resolve_templates(self.templates)
            except ValueError as e:
                raise ConfigError(f"[irm] templates: {e}") from e


register_section("irm", IRMConfig)


def collect_word_data(pair, split: WordSplit, table: dict[str, float], hooks: list[str], store_dir: Path, *,
                      batch_size: int = 64, overwrite: bool = False,
                      templates: tuple[str, ...] = TEMPLATES) -> WordData:
    """Log-probabilities and slot activations of the split's words (and the neutral words) in both models."""
    words = list(split.all_words)
    all_words = words + [w for w in NEUTRAL_WORDS if w not in words]
    n, T = len(words), len(templates)
    # One forward pass per model gives both the slot activations and the words' log-probabilities.
    kw = dict(hooks=hooks, positions="target", batch_size=batch_size, shard_size=1024, max_length=32,
              dataset={"source": "irm word templates"}, logprobs=True, share_prefix=True)
    models = {"base": pair.base, "tuned": pair.tuned}
    try:  # the same words, models and hooks as last time: the store is reused (or resumed)
        store = capture_activations(models, word_records(all_words, templates), store_dir, overwrite=overwrite, **kw)
    except StoreExistsError:  # a store of other settings from an earlier run of this stage: replace it
        store = capture_activations(models, word_records(all_words, templates), store_dir, overwrite=True, **kw)
    lp_b = store.logprobs("base").reshape(len(all_words), T)
    lp_t = store.logprobs("tuned").reshape(len(all_words), T)
    feats: dict[str, dict[str, np.ndarray]] = {}
    neutral_feats: dict[str, dict[str, np.ndarray]] = {}
    dist: dict[str, np.ndarray] = {}
    for h in hooks:
        acts = {r: store.load(r, h).double().reshape(len(all_words), T, -1) for r in ("base", "tuned")}
        feats[h] = {"tuned": acts["tuned"][:n].mean(1).numpy(), "base": acts["base"][:n].mean(1).numpy()}
        feats[h]["diff"] = feats[h]["tuned"] - feats[h]["base"]
        # The neutral words' slot activations: the zero point of the probe IRM's sequence scores.
        nb, nt = acts["base"][n:].mean(1).numpy(), acts["tuned"][n:].mean(1).numpy()
        neutral_feats[h] = {"tuned": nt, "base": nb, "diff": nt - nb}
        neutral = acts["tuned"][n:].mean(0)  # [T, d]: the neutral variant of every template
        d = torch.linalg.vector_norm(acts["tuned"][:n] - neutral, dim=-1) / torch.linalg.vector_norm(neutral, dim=-1)
        dist[h] = d.mean(1).numpy()
    lr = (lp_t - lp_b).mean(1)
    return WordData(words=words, n_fit=len(split.fit_words), utilities=np.array([table[w] for w in words]),
                    lp_base=lp_b[:n], lp_tuned=lp_t[:n], feats=feats, triple_dist=dist,
                    neutral_logratio=float(lr[n:].mean()),
                    extra={"store": str(store.path), "neutral_feats": neutral_feats,
                           "neutral_words": all_words[n:]})


def sequence_agreement(explicit, irms: dict[str, Any], samples: list[dict[str, str]], *,
                       controls: dict[str, Any] | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """IRM vs explicit reward on held-out (prompt, response) pairs, beside the untuned base's controls.

    Two comparisons per scorer (IRMs and ``controls`` alike):

    - **base vs tuned**: each held-out prompt's (base response, tuned response) pair, ordered as the explicit
      RM orders it (``pairwise_agreement``; ``pairwise_agreement_ci`` counts scorer ties as one half, with a
      bootstrap CI over prompts), and Kendall/Spearman over all responses. When the tuning worked, the RM
      prefers the tuned response almost always, so anything that tells the two models' responses apart
      scores high here, the base's own preference included: the controls show how much that explains.
    - **within one model** (``within_model``): every pair of the tuned model's responses (and of the base's)
      to different prompts, ordered as the explicit RM orders it (RM ties left out, scorer ties count one
      half), with a bootstrap CI over responses. No model identity to lean on: the scorer has to track the
      reward itself.

    ``controls``: scorers of the untuned base (its own log-probability of the response; the word-level
    control probe on base activations), never called the IRM (``"control": true``). ``summary`` sets each
    IRM against the strongest control on both comparisons: the paired bootstrap difference (the same
    resamples for every scorer) and ``above_control`` when its CI lies above 0.
    """
    from irm.implicit.sequence import pair_scores
    from irm.rewards.humans import pair_stats
    from probes import bootstrap_ci, kendall_tau, spearman

    prompts = [s["prompt"] for s in samples]
    resp_b, resp_t = [s["base"] for s in samples], [s["tuned"] for s in samples]
    n = len(samples)
    controls = dict(controls or {})
    scorers = {**irms, **controls}
    rng = np.random.default_rng(seed)
    # One set of resamples for every scorer (paired differences): prompts for the base-vs-tuned pairs,
    # responses for the within-model pairs (a multiset of indices, as multiplicities).
    mult = np.zeros((n_boot, n), dtype=np.float32)
    np.add.at(mult, (np.repeat(np.arange(n_boot), n), rng.integers(0, n, size=n_boot * n)), 1.0)

    def score(rm) -> tuple[np.ndarray, np.ndarray]:
        # One call for both responses of every prompt: an RM that runs a shared beginning once (the
        # log-ratio IRM) runs each prompt once for its two responses.
        r = np.asarray(rm.score(prompts + prompts, resp_b + resp_t), dtype=np.float64)
        return r[:n], r[n:]

    def ci(point: float, boots: np.ndarray) -> dict[str, float]:
        b = boots[np.isfinite(boots)]
        lo, hi = np.quantile(b, [0.025, 0.975]) if len(b) else (np.nan, np.nan)
        return {"value": float(point), "low": float(lo), "high": float(hi)}

    e_b, e_t = score(explicit)
    out: dict[str, Any] = {"n_prompts": n}
    boots: dict[str, dict[str, np.ndarray]] = {}
    group = np.concatenate([np.arange(n), np.arange(n)])  # each sample row is one (base, tuned) pair
    for name, rm in scorers.items():
        i_b, i_t = score(rm)
        bad = int((~np.isfinite(i_b)).sum() + (~np.isfinite(i_t)).sum())
        if bad:
            # Recorded and skipped: the other scorers' results (and the stage's) are kept.
            log.warning("sequence agreement: %s gave %d non-finite scores of %d; left out", name, bad, 2 * n)
            out[name] = {"control": name in controls, "skipped": f"{bad} of {2 * n} scores are not finite"}
            boots[name] = {}
            continue
        e_all, i_all = np.concatenate([e_b, e_t]), np.concatenate([i_b, i_t])
        # Pairs the explicit RM decides; an IRM tie (e.g. a lexicon IRM that knows none of the words) is
        # neither agreement nor disagreement: counted apart, and as half in the ties-included rate.
        se, si = np.sign(e_t - e_b), np.sign(i_t - i_b)
        keep = se != 0
        decided = keep & (si != 0)
        n_agree = int((se == si)[decided].sum())
        res: dict[str, Any] = {
            "control": name in controls,
            "pairwise_agreement": n_agree / int(decided.sum()) if decided.any() else None,
            "n_pairs": int(decided.sum()),
            "n_irm_ties": int((keep & (si == 0)).sum()),
            "pairwise_agreement_ties_half": ((n_agree + 0.5 * int((keep & (si == 0)).sum())) / int(keep.sum())
                                             if keep.any() else None),
        }
        b: dict[str, np.ndarray] = {}
        if keep.any():
            _, counted, sc = pair_scores(e_all, i_all, group)
            with np.errstate(invalid="ignore", divide="ignore"):
                b["base_vs_tuned"] = (mult @ (counted * sc)) / (mult @ counted)
            res["pairwise_agreement_ci"] = ci(res["pairwise_agreement_ties_half"], b["base_vs_tuned"])
        if np.ptp(i_all) > 0 and np.ptp(e_all) > 0:
            res["kendall_tau"] = bootstrap_ci(kendall_tau, e_all, i_all, n_boot=500).to_dict()
            res["spearman"] = bootstrap_ci(spearman, e_all, i_all, n_boot=500).to_dict()
        within = {}
        for role, e, i in (("tuned", e_t, i_t), ("base", e_b, i_b)):
            if n >= 3 and np.ptp(e) > 0:
                point = pair_stats(e, i, np.ones((1, n), dtype=np.float32), 0.0)
                st = pair_stats(e, i, mult, 0.0)
                b[f"within_{role}"] = st["pairwise_accuracy"]
                within[role] = {"pairwise_accuracy": ci(point["pairwise_accuracy"][0], st["pairwise_accuracy"]),
                                "kendall_tau": ci(point["kendall_tau"][0], st["kendall_tau"]),
                                "n_pairs": int(round(point["n_pairs"][0] / 2))}
        res["within_model"] = within
        out[name] = res
        boots[name] = b
    out["summary"] = _sequence_summary(out, boots, list(irms), list(controls))
    return out


def _sequence_summary(out: dict[str, Any], boots: dict[str, dict[str, np.ndarray]], irm_names: list[str],
                      control_names: list[str]) -> dict[str, Any]:
    """Each IRM against the strongest control (highest point value) on the base-vs-tuned pairs and on the
    pairs of tuned responses: both rates with CIs, the paired bootstrap difference and ``above_control``
    (the difference's CI lies above 0)."""

    def point(name: str, which: str) -> float | None:
        r = out[name]
        m = (r.get("pairwise_agreement_ci") if which == "base_vs_tuned"
             else (r.get("within_model") or {}).get("tuned", {}).get("pairwise_accuracy"))
        return None if m is None else m["value"]

    summary: dict[str, Any] = {}
    for which, key in (("base_vs_tuned", "base_vs_tuned"), ("within_tuned", "within_tuned")):
        ctl = [(c, point(c, which)) for c in control_names if point(c, which) is not None]
        c_name, c_val = max(ctl, key=lambda x: x[1], default=(None, None))
        rows = {}
        for name in irm_names:
            v = point(name, which)
            if v is None or key not in boots[name]:
                continue
            b = boots[name][key]
            m = {"value": v, "low": float(np.nanquantile(b, 0.025)), "high": float(np.nanquantile(b, 0.975)),
                 "control": c_name, "control_value": c_val}
            if c_name is not None and key in boots[c_name]:
                d = b - boots[c_name][key]
                d = d[np.isfinite(d)]
                lo, hi = np.quantile(d, [0.025, 0.975])
                m["difference"] = {"value": v - c_val, "low": float(lo), "high": float(hi)}
                m["above_control"] = bool(lo > 0)
            rows[name] = m
        summary[which] = rows
    return summary


def _log_sequence(seq: dict[str, Any]) -> None:
    for which, label in (("base_vs_tuned", "base-vs-tuned pairs"), ("within_tuned", "pairs of tuned responses")):
        for name, m in (seq.get("summary") or {}).get(which, {}).items():
            d = m.get("difference")
            log.info("IRM %s vs the explicit RM on %s: %.3f [%.3f, %.3f]; strongest control %s %s%s", name, label,
                     m["value"], m["low"], m["high"], m.get("control"), fmt(m.get("control_value")),
                     f", difference {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "")


def save_probe(ctx: RunContext, data: WordData, results, rm, *, hooks: list[str], n_boot: int = 1000,
               name: str = "irm_linear", templates: tuple[str, ...] = TEMPLATES):
    """The best unsupervised *probe* source (highest cross-validated tau on the fit words) as a
    :class:`~irm.implicit.probe_rm.ProbeRM`, saved to ``RUN_DIR/irm_probe``; returns (rm, info)."""
    src = best(results, PROBE_KINDS)
    cv_tau_interval(src, data.utilities[data.fit], n_boot=n_boot, seed=ctx.cfg.seed)
    probe = _probe_rm(ctx, data, src, rm, hooks=hooks, name=name, templates=templates)
    path = probe.save(ctx.run_path / "irm_probe")
    info = {"path": str(path), "source": src.name, "components": [r.name for r, _ in src.linear_parts()],
            "cv_tau_fit": src.cv_tau_fit, "cv_tau_ci": src.cv_tau_ci, "recovered": recovered(src),
            "neutral_utility": probe.meta.neutral_utility, "kendall_tau_held_out": src.metrics["kendall_tau"]}
    if not recovered(src):
        log.warning("The linear IRM %s is not recovered: its cross-validated tau interval %s includes 0. It is "
                    "saved, but read its scores as noise.", src.name, src.cv_tau_ci)
    return probe, info


def control_probe(ctx: RunContext, data: WordData, results, rm, *, hooks: list[str],
                  templates: tuple[str, ...] = TEMPLATES):
    """The word-level control as a sequence scorer: the probe on *base* activations fitted to the base's own
    preference with the highest cross-validated tau on that target, scoring texts as the linear IRM does.
    None when no control probe was fitted."""
    cands = [r for r in results if r.kind == "control" and r.coef is not None and np.isfinite(r.cv_tau_fit)]
    if not cands:
        return None
    src = max(cands, key=lambda r: r.cv_tau_fit)
    return _probe_rm(ctx, data, src, rm, hooks=hooks, name="control_probe", templates=templates)


def _probe_rm(ctx: RunContext, data: WordData, src, rm, *, hooks: list[str], name: str,
              templates: tuple[str, ...]) -> ProbeRM:
    parts = src.linear_parts()
    neutral_u = float(np.mean(sum(w * (data.extra["neutral_feats"][r.hook][r.features] @ r.coef + r.intercept)
                                  for r, w in parts)))
    meta = ProbeMeta(
        components=[ProbeComponent(hook=r.hook, features=r.features, intercept=float(r.intercept), factor=float(w),
                                   source=r.name) for r, w in parts],
        neutral_utility=neutral_u, scale=float(getattr(rm, "scale", 1.0) or 1.0), clip=getattr(rm, "clip", None),
        templates=list(templates), neutral_words=list(data.extra["neutral_words"]), pair=ctx.pair.identities(),
        source=src.name,
        fit={"kind": src.kind, "n_fit_words": data.n_fit, "cv_tau_fit": src.cv_tau_fit, "cv_tau_ci": src.cv_tau_ci,
             "held_out": src.metrics, "recovered": recovered(src) if src.cv_tau_ci else None,
             "explicit_rm": getattr(rm, "name", None), "hooks_probed": hooks})
    return ProbeRM(ctx.pair, meta, np.stack([r.coef for r, _ in parts]), name=name)


def _config_dir(ctx_cfg) -> Path | None:
    return Path(ctx_cfg.source).resolve().parent if getattr(ctx_cfg, "source", None) else None


def run_templates(ctx: RunContext, cfg: IRMConfig) -> tuple[str, ...]:
    return resolve_templates(cfg.templates, prompts=ctx.train_prompts, base_dir=_config_dir(ctx.cfg))


def word_vocabulary(cfg: IRMConfig, rm: Any, base_dir: Path | None = None) -> list[str]:
    """The candidate words of the word-level comparison (``[irm] words``)."""
    if cfg.words == "rm" and callable(getattr(rm, "alphabetic_words", None)):
        return rm.alphabetic_words()
    if cfg.words in ("rm", "vader"):
        return TokenUtilityRM.from_vader().alphabetic_words()
    p = Path(cfg.words)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if not p.is_file():
        raise ConfigError(f"[irm] words = {cfg.words!r}: {p.resolve()} does not exist; use 'rm', 'vader' or a "
                          "lexicon TSV.")
    return TokenUtilityRM.from_tsv(p).alphabetic_words()


def word_split(cfg: IRMConfig, words: list[str], seed: int) -> WordSplit:
    try:
        return WordSplit.from_words(words, test_fraction=cfg.test_fraction, max_words=cfg.max_words, seed=seed)
    except ValueError as e:
        raise ConfigError(f"[irm] {e}") from e


def explicit_word_utilities(ctx: RunContext, cfg: IRMConfig, rm: Any, templates: tuple[str, ...]):
    """(split, word -> explicit utility, info): the explicit RM's own utility of each word, from its table
    (a lexicon) or from its scores of the templates with the word against neutral words (any other RM)."""
    words = word_vocabulary(cfg, rm, _config_dir(ctx.cfg))
    if hasattr(rm, "table"):
        words = [w for w in words if rm.word_utility(w) is not None]
    split = word_split(cfg, words, ctx.cfg.seed)
    wu = word_utilities(rm, list(split.all_words), templates=templates)
    keep = np.isfinite(wu.values)
    table = {w: float(v) for w, v, k in zip(wu.words, wu.values, keep, strict=True) if k}
    info: dict[str, Any] = {"method": wu.method, "n_words": len(table), "n_distinct_values": len(set(table.values()))}
    if wu.method == "templates":
        info["spread_across_templates"] = {"mean": float(np.mean(wu.spread)), "median": float(np.median(wu.spread))}
        info["utility_std"] = float(np.std(wu.values))
        log.info("Explicit utilities of %d words from %s's scores of %d templates (utility std %.3f, spread across "
                 "templates %.3f)", len(table), getattr(rm, "name", rm), len(templates), info["utility_std"],
                 info["spread_across_templates"]["mean"])
    if len(table) < len(split.all_words):
        split = word_split(cfg, list(table), ctx.cfg.seed)
    vals = np.array(list(table.values()))
    if np.ptp(vals) == 0:
        raise ValueError(f"The explicit RM {getattr(rm, 'name', rm)!r} gives every word the same utility "
                         f"({vals[0]:.3g}) in these templates; nothing to compare. Try other [irm] templates.")
    return split, table, info


def _triples_example(split: WordSplit, table: dict[str, float], templates, seed: int) -> list:
    words = [w for w in split.fit_words[:40] if table.get(w)][:20]
    try:
        return [t.sentences() for t in build_triples(words, [table[w] for w in words], templates, seed=seed)[:6]]
    except ValueError:  # no words of both signs among the first ones
        return []


@preflight("irm")
def _preflight_irm(cfg) -> None:
    """Before any stage runs (tuning takes minutes): the word list, its split and the templates."""
    icfg: IRMConfig = cfg.section("irm")
    base_dir = _config_dir(cfg)
    if cfg.reward.kind == "lexicon":
        rm = cfg.reward.build()  # reads the table: milliseconds
        words = [w for w in word_vocabulary(icfg, rm, base_dir) if rm.word_utility(w) is not None]
    else:
        words = word_vocabulary(icfg, None, base_dir)
    word_split(icfg, words, cfg.seed)
    if icfg.templates != "prompts":
        try:
            resolve_templates(icfg.templates, base_dir=base_dir)
        except ValueError as e:
            raise ConfigError(f"[irm] templates: {e}") from e


def _layers(ctx: RunContext, cfg: IRMConfig, n_layers: int) -> list[int]:
    if cfg.layers == "all":
        return list(range(n_layers))
    if isinstance(cfg.layers, list):
        return sorted({int(li) % n_layers for li in cfg.layers})
    top = list(ctx.state.get("top_layers") or [])[: cfg.top_k]
    if not top:  # no divergence stage ran: spread the probes over the depth
        top = sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, cfg.top_k)})
    return sorted(set(top) | {n_layers - 1})


@stage("irm", order=70)
def _stage_irm(ctx: RunContext) -> None:
    cfg: IRMConfig = ctx.cfg.section("irm")
    if ctx.pair is None:
        ctx.run.update_results("irm", {"skipped": "no tuned model: name [models] tuned or enable [tune]"})
        log.warning("irm stage skipped: it needs a tuned model")
        return
    t0 = time.perf_counter()
    rm = ctx.rm
    templates = run_templates(ctx, cfg)
    split, table, utilities_info = explicit_word_utilities(ctx, cfg, rm, templates)
    layers = _layers(ctx, cfg, ctx.pair.base.n_layers)
    hooks = [cfg.hook.format(layer=li) for li in layers]
    data = collect_word_data(ctx.pair, split, table, hooks, ctx.run_path / "irm_store", batch_size=cfg.batch_size,
                             templates=templates)
    results = reconstruct(data, n_boot=cfg.n_boot, seed=ctx.cfg.seed, feature_sets=cfg.feature_sets)
    summary = summarise(results, data.utilities[data.fit], n_boot=cfg.n_boot, seed=ctx.cfg.seed)
    top = best(results, UNSUPERVISED)
    section: dict[str, Any] = {
        "summary": summary,
        "split": split.to_dict(),
        "layers": layers,
        "hooks": hooks,
        "templates": list(templates),
        "explicit_utilities": utilities_info,
        "sources": [r.to_dict() for r in results],
        "divergence": divergence_table(data, top),
        "definitions": {"recovered": "same sign and |reconstructed - true| <= 1.0",
                        "badly_wrong": "opposite sign with |true| >= 1.0 and |reconstructed| >= 1.0",
                        "best_unsupervised": "highest 5-fold CV Kendall tau on fit words among "
                                             + ", ".join(UNSUPERVISED)},
        "triples_example": _triples_example(split, table, templates, ctx.cfg.seed),
    }
    beta = cfg.beta or float(ctx.state.get("tune_beta") or 0.04)
    probe_rm, probe_info = save_probe(ctx, data, results, rm, hooks=hooks, n_boot=cfg.n_boot, templates=templates)
    section["probe"] = probe_info
    # The probe first: where later stages share log-probabilities (irm.models.memo), its capture computes
    # them in the same pass as its activations, and the log-ratio IRM then runs no model.
    irms = {"irm_linear": probe_rm, "irm_logratio": LogRatioRM(ctx.pair, beta=beta)}
    ctx.state["irms"] = irms
    ctx.state["irm_data"] = data
    ctx.state["irm_results"] = results
    samples = ctx.state.get("samples")
    if cfg.sequence_eval and samples:
        # The untuned base's controls: its own log-probability of each response, and the word-level control
        # probe (base activations fitted to the base's own preference) scoring texts as the linear IRM does.
        controls: dict[str, Any] = {"control_logprob": BaseLogprobRM(ctx.pair.base, batch_size=cfg.batch_size)}
        cprobe = control_probe(ctx, data, results, rm, hooks=hooks, templates=templates)
        if cprobe is not None:
            controls["control_probe"] = cprobe
        with sharing_logprobs(ctx.pair.base, ctx.pair.tuned):
            section["sequence"] = sequence_agreement(rm, irms, samples, controls=controls, n_boot=cfg.n_boot,
                                                     seed=ctx.cfg.seed)
        _log_sequence(section["sequence"])
    if cfg.sequence_probes and samples:
        try:
            sdata = collect_sequence_data(ctx.pair, rm, samples, hooks, beta=beta, seed=ctx.cfg.seed,
                                          batch_size=cfg.batch_size)
            section["sequence_probes"] = compare_sequences(sdata, feature_sets=cfg.feature_sets, n_boot=cfg.n_boot,
                                                           seed=ctx.cfg.seed)
            sp = section["sequence_probes"]
            ctx.tracker.log_table("irm/sequence_probes", ["source", "kind", "supervised", "cv_tau_fit",
                                                          "pairwise_accuracy", "acc_low", "acc_high", "kendall_tau"],
                                  [[r["name"], r["kind"], r["supervised"], r["cv_tau_fit"],
                                    r["pairwise_accuracy"]["value"], r["pairwise_accuracy"]["low"],
                                    r["pairwise_accuracy"]["high"], r["kendall_tau"]["value"]] for r in sp["sources"]])
        except ValueError as e:
            log.warning("sequence-level probes skipped: %s", e)
            section["sequence_probes"] = {"skipped": str(e)}
    section["seconds"] = time.perf_counter() - t0
    ctx.run.update_results("irm", section)
    _plots(ctx, data, results, top)
    tau = summary["best_unsupervised"]["kendall_tau"]
    ctl, ceil = summary["control"]["kendall_tau"], summary["ceiling"]["kendall_tau"]
    log.info("IRM: best unsupervised %s, held-out Kendall tau %.3f [%.3f, %.3f]; base-model control %.3f, "
             "decodability ceiling %.3f (%.0f s)", summary["best_unsupervised"]["source"],
             tau["value"], tau["low"], tau["high"], ctl["value"], ceil["value"], section["seconds"])
    ctx.tracker.log({"irm/best_tau": tau["value"], "irm/best_tau_low": tau["low"],
                     "irm/ceiling_tau": summary["ceiling"]["kendall_tau"]["value"],
                     "irm/control_tau": summary["control"]["kendall_tau"]["value"]}, step=ctx.tracker.current_step)
    ctx.tracker.log_table("irm/sources", ["source", "kind", "cv_tau_fit", "tau", "tau_low", "tau_high", "recovered",
                                          "badly_wrong"],
                          [[r.name, r.kind, r.cv_tau_fit, r.metrics["kendall_tau"]["value"],
                            r.metrics["kendall_tau"]["low"], r.metrics["kendall_tau"]["high"],
                            r.counts["recovered"], r.counts["badly_wrong"]] for r in results])
    ctx.tracker.log_table("irm/divergence", ["direction", "word", "explicit", "implicit", "gap"],
                          [[k, r["word"], r["explicit"], r["implicit"], r["gap"]]
                           for k, rows in section["divergence"].items() for r in rows])


def _plots(ctx: RunContext, data: WordData, results, top) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = ctx.run.sub("plots")
    test = np.arange(len(data.words))[data.test]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(data.utilities[test], top.pred_all[test], s=10, alpha=0.6)
    lim = max(np.abs(data.utilities).max(), np.abs(top.pred_all[test]).max()) * 1.05
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("explicit utility (lexicon)")
    ax.set_ylabel("reconstructed utility (IRM, rescaled)")
    tau = top.metrics["kendall_tau"]
    ax.set_title(f"{top.name}\nheld-out tau {tau['value']:.2f} [{tau['low']:.2f}, {tau['high']:.2f}]", fontsize=9)
    fig.tight_layout()
    fig.savefig(plots / "irm_scatter.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    hooks = sorted({r.hook for r in results if r.hook}, key=lambda h: int(h.split(".")[1]))
    layer_ids = [int(h.split(".")[1]) for h in hooks]
    for kind in ("probe:logratio", "probe:triple", "probe:triple_lexsign", "ceiling"):
        for feats, style in (("tuned", "-"), ("diff", ":"), ("base", "--")):
            ys = [next((r.metrics["kendall_tau"]["value"] for r in results
                        if r.kind == kind and r.features == feats and r.hook == h), np.nan) for h in hooks]
            if not np.all(np.isnan(ys)):
                ax.plot(layer_ids, ys, style, marker="o", ms=3, label=f"{kind} ({feats})")
    for name, color in (("logratio", "k"), ("control:logprob", "grey")):
        r = next(r for r in results if r.name == name)
        ax.axhline(r.metrics["kendall_tau"]["value"], color=color, lw=1, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out Kendall tau vs explicit table")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(plots / "irm_tau_per_layer.png", dpi=120)
    plt.close(fig)
