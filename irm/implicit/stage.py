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
from irm.implicit.logratio import LogRatioRM
from irm.implicit.reconstruct import (
    UNSUPERVISED,
    WordData,
    as_table,
    best,
    divergence_table,
    reconstruct,
    summarise,
)
from irm.implicit.words import NEUTRAL_WORDS, TEMPLATES, WordSplit, build_triples, word_records
from irm.rewards import TokenUtilityRM
from irm.run.config import ConfigError, register_section
from irm.run.registry import RunContext, stage

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


register_section("irm", IRMConfig)


def collect_word_data(pair, split: WordSplit, table: dict[str, float], hooks: list[str], store_dir: Path, *,
                      batch_size: int = 64, overwrite: bool = False) -> WordData:
    """Log-probabilities and slot activations of the split's words (and the neutral words) in both models."""
    words = list(split.all_words)
    all_words = words + [w for w in NEUTRAL_WORDS if w not in words]
    n, T = len(words), len(TEMPLATES)
    # One forward pass per model gives both the slot activations and the words' log-probabilities.
    kw = dict(hooks=hooks, positions="target", batch_size=batch_size, shard_size=1024, max_length=32,
              dataset={"source": "irm word templates"}, logprobs=True, share_prefix=True)
    models = {"base": pair.base, "tuned": pair.tuned}
    try:  # the same words, models and hooks as last time: the store is reused (or resumed)
        store = capture_activations(models, word_records(all_words), store_dir, overwrite=overwrite, **kw)
    except StoreExistsError:  # a store of other settings from an earlier run of this stage: replace it
        store = capture_activations(models, word_records(all_words), store_dir, overwrite=True, **kw)
    lp_b = store.logprobs("base").reshape(len(all_words), T)
    lp_t = store.logprobs("tuned").reshape(len(all_words), T)
    feats: dict[str, dict[str, np.ndarray]] = {}
    dist: dict[str, np.ndarray] = {}
    for h in hooks:
        acts = {r: store.load(r, h).double().reshape(len(all_words), T, -1) for r in ("base", "tuned")}
        feats[h] = {"tuned": acts["tuned"][:n].mean(1).numpy(), "base": acts["base"][:n].mean(1).numpy()}
        feats[h]["diff"] = feats[h]["tuned"] - feats[h]["base"]
        neutral = acts["tuned"][n:].mean(0)  # [T, d]: the neutral variant of every template
        d = torch.linalg.vector_norm(acts["tuned"][:n] - neutral, dim=-1) / torch.linalg.vector_norm(neutral, dim=-1)
        dist[h] = d.mean(1).numpy()
    lr = (lp_t - lp_b).mean(1)
    return WordData(words=words, n_fit=len(split.fit_words), utilities=np.array([table[w] for w in words]),
                    lp_base=lp_b[:n], lp_tuned=lp_t[:n], feats=feats, triple_dist=dist,
                    neutral_logratio=float(lr[n:].mean()), extra={"store": str(store.path)})


def sequence_agreement(explicit, irms: dict[str, Any], samples: list[dict[str, str]]) -> dict[str, Any]:
    """IRM vs explicit reward on held-out (prompt, response) pairs: rank correlation over all responses
    and pairwise agreement on each prompt's (base response, tuned response) comparison."""
    from probes import bootstrap_ci, kendall_tau, spearman

    prompts = [s["prompt"] for s in samples]
    resp_b, resp_t = [s["base"] for s in samples], [s["tuned"] for s in samples]
    n = len(samples)

    def score(rm) -> tuple[np.ndarray, np.ndarray]:
        # One call for both responses of every prompt: an RM that runs a shared beginning once (the
        # log-ratio IRM) runs each prompt once for its two responses.
        r = np.asarray(rm.score(prompts + prompts, resp_b + resp_t), dtype=np.float64)
        return r[:n], r[n:]

    e_b, e_t = score(explicit)
    out: dict[str, Any] = {"n_prompts": n}
    for name, rm in irms.items():
        i_b, i_t = score(rm)
        e_all, i_all = np.concatenate([e_b, e_t]), np.concatenate([i_b, i_t])
        # Pairs the explicit RM decides; an IRM tie (e.g. a lexicon IRM that knows none of the words) is
        # neither agreement nor disagreement: counted apart, and as half in the ties-included rate.
        se, si = np.sign(e_t - e_b), np.sign(i_t - i_b)
        keep = se != 0
        decided = keep & (si != 0)
        n_agree = int((se == si)[decided].sum())
        res: dict[str, Any] = {
            "pairwise_agreement": n_agree / int(decided.sum()) if decided.any() else None,
            "n_pairs": int(decided.sum()),
            "n_irm_ties": int((keep & (si == 0)).sum()),
            "pairwise_agreement_ties_half": ((n_agree + 0.5 * int((keep & (si == 0)).sum())) / int(keep.sum())
                                             if keep.any() else None),
        }
        if np.ptp(i_all) > 0 and np.ptp(e_all) > 0:
            res["kendall_tau"] = bootstrap_ci(kendall_tau, e_all, i_all, n_boot=500).to_dict()
            res["spearman"] = bootstrap_ci(spearman, e_all, i_all, n_boot=500).to_dict()
        out[name] = res
    return out


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
    if not hasattr(ctx.rm, "table"):
        ctx.run.update_results("irm", {"skipped": f"explicit RM {ctx.rm.name!r} has no word -> utility table; "
                                                  "the word-level reconstruction needs a lexicon RM"})
        return
    t0 = time.perf_counter()
    rm: TokenUtilityRM = ctx.rm
    split = WordSplit.from_words(rm.alphabetic_words(), test_fraction=cfg.test_fraction, max_words=cfg.max_words,
                                 seed=ctx.cfg.seed)
    layers = _layers(ctx, cfg, ctx.pair.base.n_layers)
    hooks = [cfg.hook.format(layer=li) for li in layers]
    data = collect_word_data(ctx.pair, split, rm.table, hooks, ctx.run_path / "irm_store", batch_size=cfg.batch_size)
    results = reconstruct(data, n_boot=cfg.n_boot, seed=ctx.cfg.seed, feature_sets=cfg.feature_sets)
    summary = summarise(results)
    top = best(results, UNSUPERVISED)
    section: dict[str, Any] = {
        "summary": summary,
        "split": split.to_dict(),
        "layers": layers,
        "hooks": hooks,
        "templates": list(TEMPLATES),
        "sources": [r.to_dict() for r in results],
        "divergence": divergence_table(data, top),
        "definitions": {"recovered": "same sign and |reconstructed - true| <= 1.0",
                        "badly_wrong": "opposite sign with |true| >= 1.0 and |reconstructed| >= 1.0",
                        "best_unsupervised": "highest 5-fold CV Kendall tau on fit words among "
                                             + ", ".join(UNSUPERVISED)},
        "triples_example": [t.sentences() for t in build_triples(
            list(split.fit_words[:20]), [rm.table[w] for w in split.fit_words[:20]], seed=ctx.cfg.seed)[:6]],
    }
    beta = cfg.beta or float(ctx.state.get("tune_beta") or 0.04)
    irms = {
        "irm_logratio": LogRatioRM(ctx.pair, beta=beta),
        "irm_linear": TokenUtilityRM(as_table(data.words, top.pred_all), scale=rm.scale, clip=rm.clip,
                                     score_prompt=rm.score_prompt, name="irm_linear"),
    }
    ctx.state["irms"] = irms
    ctx.state["irm_data"] = data
    ctx.state["irm_results"] = results
    samples = ctx.state.get("samples")
    if cfg.sequence_eval and samples:
        section["sequence"] = sequence_agreement(rm, irms, samples)
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
