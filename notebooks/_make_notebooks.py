"""Writes the analysis notebooks (outputs stripped). Edit here, then run: python notebooks/_make_notebooks.py"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent
SETUP = """import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Image, Markdown, display

from irm.analysis import load_run

# The run to analyse: set IRM_RUN_DIR, or edit this line (e.g. "../runs/default").
RUN_DIR = Path(os.environ.get("IRM_RUN_DIR", "../runs/default"))
run = load_run(RUN_DIR)
print(run.path, "|", run.config.get("name"), "| sections:", sorted(run.results))"""

NOTEBOOKS = {
    "01_pair_and_divergence.ipynb": [
        ("md", "# The model pair: tuning, evaluation and layer divergence\n\nLoads a run directory written by "
               "`irm run`; nothing here trains."),
        ("code", SETUP),
        ("md", "## Tuning curves (reward of samples during RLHF)"),
        ("code", """curves = run.tune_curves()
display(curves.tail())
if "reward_mean" in curves:
    ax = curves.dropna(subset=["reward_mean"]).plot(x="step", y="reward_mean", marker="o", figsize=(6, 3.5))
    if "held_out_reward_mean" in curves:
        curves.dropna(subset=["held_out_reward_mean"]).plot(x="step", y="held_out_reward_mean", marker="s", ax=ax)
    ax.set_ylabel("explicit reward"); plt.show()"""),
        ("md", "## Held-out evaluation: base vs tuned generations"),
        ("code", """ev = run.section("evaluation")
r = ev["reward"]
display(Markdown(f"Reward base {r['base']['mean']:.3f} ± {r['base']['std']:.3f}, tuned {r['tuned']['mean']:.3f} ± "
                 f"{r['tuned']['std']:.3f}; effect size {r['effect_size']:.2f} base std (95% CI {r['effect_size_ci']}); "
                 f"KL/token {ev['kl_per_token']['mean']:.4f}; over-optimised: {ev['repetition']['flag_over_optimised']}"))
samples = run.eval_samples()
display(samples.head(10))"""),
        ("md", "## Layer divergence"),
        ("code", """layers = run.divergence_layers()
display(layers)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
layers["param_rel"].plot.bar(ax=axes[0], title="relative parameter change")
if "act_rel_l2" in layers:
    layers["act_rel_l2"].plot.bar(ax=axes[1], title="activation divergence (rel. L2)")
plt.tight_layout(); plt.show()
print("top layers:", run.section("divergence")["top_k"])"""),
    ],
    "02_irm_vs_explicit.ipynb": [
        ("md", "# The implicit reward model against the explicit RM\n\nHeld-out words only: the IRM never saw them."),
        ("code", SETUP),
        ("code", """irm = run.section("irm")
summary = irm["summary"]
rows = []
for label in ("best_unsupervised", "logratio_direct", "ceiling", "control"):
    s = summary[label]
    t = s["kendall_tau"]
    rows.append({"": label, "source": s["source"], "tau": t["value"], "low": t["low"], "high": t["high"],
                 "sign agreement": s["sign_agreement"]["value"], **s["counts"]})
display(pd.DataFrame(rows).set_index(""))
print("gain over control:", summary["gain_over_control"], "| CI above control:", summary["best_above_control"])"""),
        ("md", "## Every source, ranked by held-out tau"),
        ("code", """src = run.irm_sources()
display(src.head(20))
probe = src[src.kind.str.startswith("probe") | (src.kind == "ceiling")].copy()
probe["layer"] = probe.hook.str.split(".").str[1].astype(int)
fig, ax = plt.subplots(figsize=(7, 4))
for (kind, feats), g in probe.groupby(["kind", "features"]):
    g = g.sort_values("layer")
    ax.plot(g.layer, g.tau, marker="o", label=f"{kind} ({feats})")
ax.axhline(0, color="grey", lw=0.5); ax.set_xlabel("layer"); ax.set_ylabel("held-out Kendall tau")
ax.legend(fontsize=7); plt.show()"""),
        ("md", "## Where the IRM diverges from the explicit RM"),
        ("code", """display(run.irm_divergence())
for p in run.plots():
    if p.name.startswith("irm_"):
        display(Image(filename=str(p)))"""),
        ("md", "## Sequence level"),
        ("md", "Each scorer against the explicit RM on the base-vs-tuned pair of every held-out prompt and on pairs "
               "of two tuned responses; the controls are the untuned base's own preference."),
        ("code", """seq = irm.get("sequence", {})
rows = {k: {"control": v.get("control"), "base vs tuned": (v.get("pairwise_agreement_ci") or {}).get("value"),
            "tuned vs tuned": ((v.get("within_model") or {}).get("tuned", {}).get("pairwise_accuracy") or {}).get("value"),
            "base vs base": ((v.get("within_model") or {}).get("base", {}).get("pairwise_accuracy") or {}).get("value")}
        for k, v in seq.items() if isinstance(v, dict) and k != "summary"}
display(pd.DataFrame(rows).T)
for which, per in seq.get("summary", {}).items():
    display(pd.DataFrame(per).T.assign(comparison=which))"""),
    ],
    "03_features.ipynb": [
        ("md", "# Features: SAEs of base and tuned, LLM labels, and the IRM checked against them"),
        ("code", SETUP),
        ("code", """feat = run.section("features")
print("skipped:", feat.get("skipped"))
display(pd.DataFrame(feat.get("saes", [])))"""),
        ("md", "## MMCS between dictionaries"),
        ("code", """display(pd.json_normalize(feat.get("mmcs", {}), sep="."))"""),
        ("md", "## LLM labels against the lexicon ground truth, and the IRM checks"),
        ("code", """for key in ("ground_truth", "alignment", "activation_rate"):
    display(Markdown(f"**{key}**"))
    display(pd.json_normalize(feat.get(key, {}), sep="."))
display(pd.DataFrame(feat.get("features", [])).head(20))
for p in run.plots():
    if p.name.startswith(("features", "sae", "mmcs")):
        display(Image(filename=str(p)))"""),
    ],
    "04_contrastive.ipynb": [
        ("md", "# Contrastive explanations: which attributes flip each RM's preferences"),
        ("code", SETUP),
        ("code", """con = run.section("contrastive")
print(con["n_comparisons"], "comparisons from", con["source"], "| RMs:", list(con["sensitivity"]))
sens = run.contrastive_sensitivity()
display(sens.pivot_table(index="attribute", columns="rm", values="pfr"))"""),
        ("code", """prog = sens[sens.generator == "programmatic"]
pivot = prog.pivot_table(index="attribute", columns="rm", values="pfr")
pivot.plot.barh(figsize=(7, 4)); plt.xlabel("preference flip rate"); plt.show()"""),
        ("md", "## Coverage of counterfactuals and semifactuals, against the random baseline"),
        ("code", """cov = con["coverage"]
display(pd.DataFrame({(rm, g): {k: v for k, v in d.items() if isinstance(v, (int, float)) or v is None}
                      for rm, by in cov.items() for g, d in by.items()}).T)"""),
        ("md", "## The offline wandb run of this run"),
        ("code", """try:
    wb = run.wandb_run()
    print("wandb config keys:", sorted(wb["config"])[:10], "| history rows:", len(wb["history"]),
          "| artifacts:", wb["artifacts"][:5])
except FileNotFoundError as e:
    print(e)"""),
    ],
}

for name, cells in NOTEBOOKS.items():
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    nbf.write(nb, HERE / name)
    print("wrote", HERE / name)
