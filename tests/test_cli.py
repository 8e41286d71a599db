from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from irm.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "tiny.toml")


def test_irm_capture_tiny_writes_a_store_with_its_manifest(tmp_path, capsys):
    rc = main(["-q", "capture", TINY, "--set", f"run_dir='{tmp_path}/run'", "--set", "data.limit=20"])
    assert rc == 0
    manifest = json.loads((tmp_path / "run" / "store" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dataset"]["n_texts"] == 20
    assert manifest["hooks"] == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    assert manifest["models"]["base"]["kind"] == "tiny"
    assert {"irm_version", "dtype", "positions", "fingerprint"} <= set(manifest)
    assert "Store:" in capsys.readouterr().out
    # Same command again: resumes (nothing to do) instead of failing or recomputing.
    assert main(["-q", "capture", TINY, "--set", f"run_dir='{tmp_path}/run'", "--set", "data.limit=20"]) == 0
    # Different settings into the same store: refused, with the fix in the message.
    rc = main(["-q", "capture", TINY, "--set", f"run_dir='{tmp_path}/run'", "--set", "data.limit=20",
               "--set", "capture.positions='all'"])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["capture", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[capture]\nhooks = ["blocks.{layer}.hook_resid_pots"]\n[models]\nbase = "tiny-llama"\n')
    assert main(["-q", "capture", str(bad), "--set", f"run_dir='{tmp_path}/r'", "--set", "data.limit=4"]) == 2
    assert "did you mean 'blocks.0.hook_resid_post'" in capsys.readouterr().err


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "irm.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("run", "capture", "tune", "explain", "store", "hooks", "config", "report"):
        assert cmd in out


def test_config_command_prints_help_of_every_key(capsys):
    assert main(["config", "capture"]) == 0
    out = capsys.readouterr().out
    assert "positions = 'last'" in out and "Position rule" in out
    with pytest.raises(SystemExit):
        main(["config", "nosuchsection"])
