"""`irm run experiments/tiny.toml` end to end: results, report, offline wandb run, notebooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-irmtestsecret0123456789abcdef"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    # A key in the environment must never reach a config, log or artifact.
    env = dict(os.environ, OPENAI_API_KEY=FAKE_KEY, IRM_PROGRESS="0", WANDB_MODE="offline")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "irm.cli", "run", str(REPO / "experiments" / "tiny.toml"),
                        "--set", f"run_dir='{run_dir}'"], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    print(f"tiny pipeline wall time: {time.perf_counter() - t0:.1f} s")
    return run_dir


def test_tiny_pipeline_writes_every_section(tiny_run):
    res = json.loads((tiny_run / "results.json").read_text())
    for key in ("config", "environment", "data", "reward", "tune", "pair", "evaluation", "divergence", "capture",
                "irm", "features", "contrastive", "timings"):
        assert key in res, key
    assert not [k for k in res if k.startswith("error_")]
    assert res["evaluation"]["reward"]
    if not res["tune"]["reused"]:  # a model tuned by this run: its evaluation is the evaluate stage's alone
        assert res["tune"]["evaluation"] is None
    assert res["pair"]["tuned"]["kind"] == "local"
    # RUN_DIR/tuned points at the cached tuned checkpoint, so load_model("runs/NAME/tuned") works.
    assert (tiny_run / "tuned" / "config.json").is_file()
    assert (tiny_run / "tuned").resolve() == Path(res["pair"]["tuned"]["checkpoint"]).resolve()
    # The tuned tiny model raised the explicit reward on held-out prompts.
    assert res["evaluation"]["reward"]["tuned"]["mean"] > res["evaluation"]["reward"]["base"]["mean"]
    irm = res["irm"]
    for k in ("best_unsupervised", "ceiling", "control", "logratio_direct"):
        assert set(irm["summary"][k]["kendall_tau"]) >= {"value", "low", "high"}
    assert {s["kind"] for s in irm["sources"]} >= {"logratio", "probe:logratio", "probe:triple", "ceiling", "control"}
    assert "sequence" in irm
    report = (tiny_run / "report.md").read_text()
    assert "## irm" in report and "plots/irm_scatter.png" in report
    for png in ("irm_scatter.png", "irm_tau_per_layer.png", "layer_divergence.png"):
        assert (tiny_run / "plots" / png).stat().st_size > 1000, png


def test_no_secret_in_any_file(tiny_run):
    for f in tiny_run.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert FAKE_KEY.encode() not in f.read_bytes(), f


def test_offline_wandb_run_holds_config_metrics_tables_artifacts(tiny_run):
    from irm.run.wandb_offline import find_offline_run, read_offline_run

    wb = read_offline_run(find_offline_run(tiny_run))
    assert wb["config"]["models"]["base"] == "tiny-llama"
    assert wb["config"]["capture"]["positions"] == "last"
    keys = {k for row in wb["history"] for k in row}
    assert {"irm/best_tau", "eval/effect_size", "capture/rows"} <= keys
    res = json.loads((tiny_run / "results.json").read_text())
    if not res["tune"]["reused"]:  # a cached tuned model was trained in an earlier run, not logged here
        assert any(k.startswith("tune/") for k in keys)
    tables = {f.split("/")[2] + "/" + f.split("/")[3].rsplit("_", 2)[0] for f in wb["files"] if f.startswith("media/table/")}
    assert {"irm/sources", "irm/divergence", "eval/samples", "contrastive/pfr", "features/autointerp"} <= tables
    assert "report-tiny" in wb["artifacts"]
    assert any(a.startswith("sae-") for a in wb["artifacts"])
    assert wb["summary"]["timings/irm"] > 0


@pytest.mark.parametrize("notebook", sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb")))
def test_notebooks_execute_against_the_run(tiny_run, notebook):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs must be stripped in git"
    os.environ["IRM_RUN_DIR"] = str(tiny_run)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
