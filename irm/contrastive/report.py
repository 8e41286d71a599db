"""Reports of contrastive explanations: plots, ``contrastive.md`` and the standalone output directory.

Used by the pipeline stage (:mod:`irm.contrastive.stage`) and by the standalone explanation of RMs
(:func:`irm.contrastive.explain_rms`, ``irm explain --rm ...``); nothing here knows about runs.

- :func:`plot_pfr`, :func:`plot_coverage`: the PFR and coverage figures;
- :func:`render_markdown`: ``contrastive.md``;
- :func:`write_report`: plots + markdown (+ ``results.json`` for a standalone output directory);
- :func:`headline`: the short per-RM summary lines printed by ``irm explain``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from irm.core.io import write_json_atomic

__all__ = ["plot_pfr", "plot_coverage", "render_markdown", "write_report", "headline"]


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
            L.append(f"- **{rm}**: headline attribute: {s['top'] or 'none (no PFR CI lies above the random baseline CI)'}; "
                     f"ranking {' > '.join(s['ranking'])}; sensitive beyond the random baseline to: "
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
    f = summary.get("fluency")
    if f:
        L += ["", f"Fluency ({f['model']}): {f['n_dropped']} of {f['n_checked']} perturbations dropped, their "
              f"perplexity above {f['max_perplexity_ratio']} x the original's (median ratio "
              f"{_fmt((f.get('ratio_quantiles') or {}).get('0.5'))}, 90th percentile "
              f"{_fmt((f.get('ratio_quantiles') or {}).get('0.9'))}; {f['exempt']} exempt)."]
        for e in f.get("dropped_examples", [])[:3]:
            L.append(f"- dropped ({e['key']}, ratio {_fmt(e['ratio'])}): {e['text']!r}")
    if summary.get("llm_parsing"):
        for g, p in summary["llm_parsing"].items():
            L.append(f"\nLLM replies of {g}: {p['n_ok']} parsed, {p['n_failed']} failed ({p['counts']}).")
            if p.get("failures"):
                L += ["", f"Every {g} reply that did not parse:", "",
                      "| step | attribute | direction | error | reply (start) |", "|---|---|---|---|---|"]
                for fl in p["failures"]:
                    excerpt = str(fl.get("excerpt", "")).replace("|", "\\|").replace("\n", " ")[:160]
                    L.append(f"| {fl.get('step', fl.get('kind'))} | {fl.get('attribute', '')} | "
                             f"{fl.get('direction', '')} | {fl.get('error', '')} | {excerpt!r} |")
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


def write_report(result: Any, out_dir: str | Path, *, extra: dict[str, Any] | None = None,
                 results_json: bool = False) -> dict[str, Any]:
    """Write ``plots/contrastive_*.png`` and ``contrastive.md`` under ``out_dir`` (and, with
    ``results_json``, ``results.json`` holding the whole section); return the section."""
    from irm.core.io import to_jsonable

    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    plots = {}
    for g in result.generators:
        suffix = "" if g == "programmatic" else f"_{g}"
        plots[f"pfr{suffix}"] = str(plot_pfr(summary, g, plots_dir / f"contrastive_pfr{suffix}.png"))
    plots["coverage"] = str(plot_coverage(summary, plots_dir / "contrastive_coverage.png"))
    md = out_dir / "contrastive.md"
    md.write_text(render_markdown(summary, extra or {}, {k: Path(v).relative_to(out_dir).as_posix()
                                                          for k, v in plots.items()}), encoding="utf-8")
    section = {**summary, **(extra or {}), "plots": plots, "report": str(md)}
    if results_json:
        path = out_dir / "results.json"
        section["results"] = str(path)
        write_json_atomic(path, to_jsonable({"contrastive": section}))
    return section


def headline(summary: dict[str, Any]) -> list[str]:
    """Short lines for a terminal: per RM and generator, CF coverage vs the random baseline and the top
    attribute (named only when its PFR's CI clears the baseline's)."""
    lines = [f"{summary['n_comparisons']} comparisons; RMs: {', '.join(summary['rms'])}"]
    for rm in summary["rms"]:
        for g in summary["generators"]:
            c = summary["coverage"][rm][g]
            s = summary["sensitivity"][rm][g]
            base = "random" if g == "programmatic" else f"random_{g}"
            rc = summary["coverage"][rm].get(base)
            cov = (f"CF coverage {_fmt(c['cf_coverage'])} [{_fmt(c['cf_coverage_ci'][0])}, "
                   f"{_fmt(c['cf_coverage_ci'][1])}]")
            if rc is not None:
                cov += (f" vs random {_fmt(rc['cf_coverage'])} [{_fmt(rc['cf_coverage_ci'][0])}, "
                        f"{_fmt(rc['cf_coverage_ci'][1])}]")
            top = s["top"]
            if top:
                e = s["pfr"][top]
                top_s = f"top: {top} (PFR {_ci(e)}" + (f", random {_fmt(e.get('random_pfr'))}" if
                                                        e.get("random_pfr") is not None else "") + ")"
            else:
                top_s = "top: none (no attribute's PFR CI lies above the random baseline's)"
            lines.append(f"  {rm} / {g}: {cov}; {top_s}; ranking {' > '.join(s['ranking'][:4])}")
    f = summary.get("fluency")
    if f:
        lines.append(f"  fluency ({f['model']}): {f['n_dropped']} of {f['n_checked']} perturbations dropped "
                     f"(perplexity > {f['max_perplexity_ratio']} x the original's)")
    for g, p in (summary.get("llm_parsing") or {}).items():
        lines.append(f"  {g}: {p['n_ok']} LLM replies parsed, {p['n_failed']} failed")
    return lines
