"""The run report: ``report.md`` in the run directory, built from ``results.json`` and the PNG plots.

Each results section has a renderer (``@renderer("irm")``); stages in other modules register their
own. A section without a renderer is shown as a compact table of its numbers, so nothing computed is
hidden. The report never recomputes anything: rebuild it any time with ``irm report RUN_DIR``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from irm.core.constants import RUN_REPORT, RUN_RESULTS
from irm.run.registry import RunContext, import_stages, stage

__all__ = ["renderer", "write_report", "RENDERERS", "fmt", "md_table", "ci"]

Renderer = Callable[[dict[str, Any], Path], str]
RENDERERS: dict[str, tuple[int, Renderer]] = {}
_SKIP = {"config", "environment", "timings"}


def renderer(section: str, order: int = 50) -> Callable[[Renderer], Renderer]:
    def deco(fn: Renderer) -> Renderer:
        RENDERERS[section] = (order, fn)
        return fn

    return deco


def fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def ci(m: dict[str, Any] | None, nd: int = 3) -> str:
    """``0.412 [0.371, 0.450]`` from a metric dict with value/low/high."""
    if not m:
        return "n/a"
    return f"{fmt(m.get('value'), nd)} [{fmt(m.get('low'), nd)}, {fmt(m.get('high'), nd)}]"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _img(run: Path, name: str, alt: str) -> str:
    p = run / "plots" / name
    return f"![{alt}](plots/{name})\n" if p.is_file() else ""


# ----------------------------------------------------------------------------------------------
@renderer("pair", order=10)
def _pair(sec: dict[str, Any], run: Path) -> str:
    rows = [[role, (v or {}).get("spec"), (v or {}).get("kind"), ((v or {}).get("fingerprint") or "")[:12]]
            for role, v in sec.items() if isinstance(v, dict) or v is None]
    return md_table(["role", "model", "kind", "fingerprint"], rows)


@renderer("reward", order=12)
def _reward(sec: dict[str, Any], run: Path) -> str:
    return (f"Explicit reward model: **{sec.get('name')}** ({sec.get('kind')}"
            + (f", {sec['table_size']} words" if "table_size" in sec else "") + ").\n")


@renderer("capture", order=60)
def _capture(sec: dict[str, Any], run: Path) -> str:
    return (f"Store `{sec.get('store')}`: {sec.get('rows')} rows x {sec.get('hooks')} hooks for "
            f"{', '.join(sec.get('roles', []))} at positions `{sec.get('positions')}` in {fmt(sec.get('seconds'), 1)} s.\n")


@renderer("irm", order=70)
def _irm(sec: dict[str, Any], run: Path) -> str:
    if "skipped" in sec:
        return f"Skipped: {sec['skipped']}\n"
    s = sec["summary"]
    eu = sec.get("explicit_utilities") or {}
    how = ("read from the lexicon's table" if eu.get("method", "table") == "table" else
           f"from the explicit RM's scores of {len(sec.get('templates', []))} templates with each word against "
           "neutral words")
    out = []
    if s.get("irm_recovered") is False:
        b = s["best_unsupervised"]
        out.append(f"**No IRM recovered**: the best unsupervised source ({b['source']}) has a cross-validated tau "
                   f"interval {ci(b.get('cv_tau_ci'))} that includes 0 on the fit words; its numbers below are no "
                   "evidence of an implicit reward.\n\n")
    out += [
        "Reconstructed word -> utility tables on **held-out words** "
        f"({sec['split']['n_test']} held out, {sec['split']['n_fit']} used for fitting), compared with the explicit "
        f"RM's utilities ({how}; {eu.get('n_distinct_values', 'n/a')} distinct values).\n",
        md_table(["", "source", "Kendall tau [95% CI]", "Spearman", "sign agreement", "AUC (sign)", "recovered",
                  "badly wrong"], [
            [label, s[k]["source"], ci(s[k]["kendall_tau"]), ci(s[k]["spearman"]), ci(s[k]["sign_agreement"]),
             ci(s[k].get("auc")), f"{s[k]['counts']['recovered']}/{s[k]['counts']['n']}", s[k]["counts"]["badly_wrong"]]
            for label, k in (("best IRM (unsupervised)", "best_unsupervised"), ("log-ratio (no probe)", "logratio_direct"),
                             ("decodability ceiling", "ceiling"), ("control (untuned base)", "control"))]),
        f"\nGain of the best IRM over the control: tau {fmt(s['gain_over_control'])}; "
        f"CI above the control's: **{s['best_above_control']}**. Definitions: "
        + "; ".join(f"*{k}*: {v}" for k, v in sec.get("definitions", {}).items()) + ".\n",
        _img(run, "irm_scatter.png", "reconstructed vs true utility"),
        _img(run, "irm_tau_per_layer.png", "tau per layer and source"),
    ]
    pr = sec.get("probe")
    if pr:
        out.append(f"\nThe linear IRM handed to later stages and saved as a reward model (`{pr['path']}`, load it with "
                   f"`load_rm(\"probe:...\")` or `irm score --rm probe:...`): {pr['source']}, cross-validated tau "
                   f"{ci(pr.get('cv_tau_ci'))}" + ("" if pr.get("recovered") else " (**not recovered**: interval includes 0)")
                   + ".\n")
    top = sorted(sec["sources"], key=lambda r: -(r["metrics"]["kendall_tau"]["value"] or -9))[:12]
    out.append("\nAll sources, best 12 by held-out tau (cv tau = 5-fold CV on fit words, used for selection):\n\n")
    out.append(md_table(["source", "supervised", "cv tau (fit)", "held-out tau [CI]"],
                        [[r["name"], r["supervised"], r["cv_tau_fit"], ci(r["metrics"]["kendall_tau"])] for r in top]))
    div = sec.get("divergence", {})
    for k in ("overvalued", "undervalued"):
        rows = div.get(k, [])[:10]
        if rows:
            out.append(f"\nWords the IRM **{k}** most relative to the explicit RM:\n\n")
            out.append(md_table(["word", "explicit", "implicit", "gap"],
                                [[r["word"], r["explicit"], r["implicit"], r["gap"]] for r in rows]))
    seq = sec.get("sequence")
    if seq:
        out.append(f"\nSequence level ({seq['n_prompts']} held-out prompts): each scorer against the explicit RM on "
                   "the (base response, tuned response) pair of every prompt, and on every pair of two tuned (or "
                   "two base) responses to different prompts, where telling the models apart does not help. "
                   "Controls are the untuned base's own preference (never called the IRM). 95% CIs:\n\n")

        def within(v, role):
            w = (v.get("within_model") or {}).get(role) or {}
            return ci(w.get("pairwise_accuracy"))

        out.append(md_table(["scorer", "base vs tuned (ties 1/2) [CI]", "pairs", "scorer ties", "tuned vs tuned [CI]",
                             "base vs base [CI]", "Kendall tau, all responses [CI]"],
                            [[k + (" (control)" if v.get("control") else "")
                              + (f" (left out: {v['skipped']})" if v.get("skipped") else ""),
                              ci(v.get("pairwise_agreement_ci")) if v.get("pairwise_agreement_ci")
                              else v.get("pairwise_agreement"),
                              v.get("n_pairs"), v.get("n_irm_ties"), within(v, "tuned"), within(v, "base"),
                              ci(v.get("kendall_tau"))]
                             for k, v in sorted(((k, v) for k, v in seq.items() if isinstance(v, dict) and k != "summary"),
                                                key=lambda kv: bool(kv[1].get("control")))]))
        summ = seq.get("summary") or {}
        lines = []
        for which, label in (("base_vs_tuned", "base-vs-tuned pairs"), ("within_tuned", "pairs of tuned responses")):
            for name, m in summ.get(which, {}).items():
                d = m.get("difference")
                if d:
                    lines.append(f"- {name}, {label}: {fmt(m['value'])} against {m['control']} {fmt(m['control_value'])}; "
                                 f"paired difference {ci(d)}: **{'above' if m['above_control'] else 'not above'} "
                                 "the control**")
        if lines:
            out.append("\n" + "\n".join(lines) + "\n")
    sp = sec.get("sequence_probes")
    if sp and "summary" in sp:
        out.append(f"\nProbes on whole responses ({sp['n_test_texts']} test texts of {sp['n_test_prompts']} held-out "
                   "prompts; targets from the pair, compared with the explicit RM):\n\n")
        rows = []
        for label, k in (("linear IRM (unsupervised)", "linear_irm"), ("log-ratio (no probe)", "logratio_direct"),
                         ("ceiling (fitted to the explicit RM)", "ceiling"), ("control (untuned base)", "control")):
            r = sp["summary"].get(k)
            if r:
                rows.append([label, r["name"], ci(r["pairwise_accuracy"]), r["n_pairs"], r["n_ties"],
                             ci(r["kendall_tau"])])
        out.append(md_table(["", "source", "pairwise accuracy [CI]", "pairs", "ties", "Kendall tau [CI]"], rows))
    elif sp and "skipped" in sp:
        out.append(f"\nProbes on whole responses: skipped ({sp['skipped']}).\n")
    return "".join(out)


def _generic(sec: Any, run: Path) -> str:
    if not isinstance(sec, dict):
        return f"{fmt(sec)}\n"
    rows = [[k, v] for k, v in sec.items() if isinstance(v, (int, float, str, bool)) or v is None]
    return md_table(["key", "value"], rows) if rows else "(see results.json)\n"


def write_report(run_dir: str | Path) -> Path:
    """Render ``report.md`` from ``results.json`` (and ``plots/*.png``) in ``run_dir``."""
    run = Path(run_dir)
    res = json.loads((run / RUN_RESULTS).read_text())
    _import_renderers()
    cfg = res.get("config", {})
    env = res.get("environment", {})
    parts = [f"# irm run: {cfg.get('name', run.name)}\n\n",
             f"Config `{cfg.get('source')}`, seed {cfg.get('seed')}, started {env.get('started')}, "
             f"irm {env.get('versions', {}).get('irm')}, torch {env.get('versions', {}).get('torch')}, "
             f"transformers {env.get('versions', {}).get('transformers')}.\n\n"]
    sections = [k for k in res if k not in _SKIP]
    sections.sort(key=lambda k: RENDERERS.get(k, (999, None))[0])
    for k in sections:
        fn = RENDERERS.get(k, (0, _generic))[1]
        parts.append(f"## {k}\n\n")
        try:
            parts.append(fn(res[k], run))
        except (KeyError, TypeError, ValueError) as e:  # a malformed section must not lose the rest
            parts.append(f"(could not render: {type(e).__name__}: {e}; see results.json)\n")
        parts.append("\n")
    if "timings" in res:
        parts.append("## timings (s)\n\n" + md_table(["stage", "seconds"], [[k, v] for k, v in res["timings"].items()]))
    out = run / RUN_REPORT
    out.write_text("".join(parts))
    return out


def _import_renderers() -> None:
    import_stages()


@stage("report", order=100)
def _stage_report(ctx: RunContext) -> None:
    path = write_report(ctx.run_path)
    ctx.tracker.log_artifact(path, name=f"report-{ctx.cfg.name}", type="report")
