"""Tests for irm.run.tracking: redaction, modes, and what an offline wandb run really contains."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from irm.core.io import REDACTED, redact
from irm.run.tracking import Tracker, resolve_mode
from irm.run.wandb_offline import find_offline_run, read_offline_run

# Planted fake secrets: they must never reach any file of a run.
FAKE_OPENAI = "sk-irmTESTfake0123456789abcdefXYZ"
FAKE_HF = "hf_irmTESTfakeABCDEFGHIJKLMNOPQRS"
FAKE_WANDB_HEX = "0123456789abcdef0123456789abcdef01234567"
GIT_SHA = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline wandb with no key, no network and no files outside tmp_path."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(home / variable.lower()))
    for variable in ("WANDB_API_KEY", "IRM_WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


def _config() -> dict:
    return {
        "name": "offline-test",
        "lr": 0.001,
        "models": {"base": "gpt2", "max_new_tokens": 16, "pad_token": "<pad>"},
        "judge": {"openai_api_key": FAKE_OPENAI, "note": f"Bearer {FAKE_HF}"},
        "wandb_key": FAKE_WANDB_HEX,
    }


# --------------------------------------------------------------------------- redact


def test_redact_nested_keys_and_value_patterns_without_mutating_input():
    config = {
        "api_key": "plain-secret",
        "OPENAI_API_KEY": "abc",
        "hfToken": "whatever",
        "db": {"Password": "hunter2", "host": "localhost", "port": 5432},
        "headers": [{"Authorization": "Basic xyz"}, {"accept": "json"}],
        "credentials": {"user": "u", "pass": "p"},
        "client_secret": 1234,
        "free_text": f"use {FAKE_OPENAI} here",
        "list_of_values": ["fine", FAKE_HF, "wandb_v1_abcdefghijklmnopqrstuvwxyz"],
        "wandb_key": FAKE_WANDB_HEX,
        "git_commit": GIT_SHA,
        "max_new_tokens": 32,
        "pad_token": "<pad>",
        "pad_token_id": 0,
        "tokenizer": "gpt2",
        "use_auth_token": True,
        "hub_token": None,
        "backend": "hf_transfer",
        "model": "my_hf_dataset_preprocessing_v2",
        "shape": (1, 2),
    }
    original = copy.deepcopy(config)
    out = redact(config)

    assert config == original, "redact must not mutate its input"
    for key in (
        "api_key",
        "OPENAI_API_KEY",
        "hfToken",
        "credentials",
        "client_secret",
        "free_text",
        "wandb_key",
    ):
        assert out[key] == REDACTED, key
    assert out["db"] == {"Password": REDACTED, "host": "localhost", "port": 5432}
    assert out["headers"] == [{"Authorization": REDACTED}, {"accept": "json"}]
    assert out["list_of_values"] == ["fine", REDACTED, REDACTED]
    # look-alikes that are not secrets survive
    assert out["git_commit"] == GIT_SHA
    for key in ("max_new_tokens", "pad_token", "pad_token_id", "tokenizer", "use_auth_token", "hub_token"):
        assert out[key] == config[key], key
    assert out["backend"] == "hf_transfer" and out["model"] == "my_hf_dataset_preprocessing_v2"
    assert out["shape"] == (1, 2) and isinstance(out["shape"], tuple)
    # a deep copy: editing the output leaves the input alone
    out["db"]["host"] = "changed"
    assert config["db"]["host"] == "localhost"


def test_resolve_mode_precedence_and_errors(monkeypatch):
    monkeypatch.delenv("IRM_WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled"
    monkeypatch.setenv("IRM_WANDB_MODE", "online")
    assert resolve_mode(None) == "online"  # IRM_WANDB_MODE wins over WANDB_MODE
    assert resolve_mode("off") == "disabled"  # an explicit mode wins over both
    with pytest.raises(ValueError, match=r"'sometimes'.*valid modes"):
        resolve_mode("sometimes")
    monkeypatch.setenv("IRM_WANDB_MODE", "bogus")
    with pytest.raises(ValueError, match="environment variable IRM_WANDB_MODE"):
        resolve_mode(None)


# --------------------------------------------------------------------------- offline run


def test_offline_run_holds_redacted_config_metrics_table_and_artifact(wandb_env):
    run_dir = wandb_env / "run"
    artifact_file = wandb_env / "inputs" / "probe.json"
    artifact_file.parent.mkdir()
    artifact_file.write_text('{"weights": [1, 2, 3]}', encoding="utf-8")
    (wandb_env / "inputs" / "sub").mkdir()
    (wandb_env / "inputs" / "sub" / "notes.txt").write_text("n", encoding="utf-8")

    with Tracker.open(
        _config(), run_dir=run_dir, name="t1", group="g", tags=["unit"], job_type="test"
    ) as tracker:
        assert tracker.mode == "offline"  # from WANDB_MODE
        tracker.log({"train/loss": 1.5, "train/acc": 0.25}, step=0)
        with pytest.warns(RuntimeWarning, match="non-finite.*train/loss=nan"):
            tracker.log({"train/loss": float("nan"), "train/grad": float("inf")}, step=1)
        table_path = tracker.log_table(
            "eval/samples", ["prompt", "reward"], [["The plot", 0.5], ["The cast", -1.0]]
        )
        tracker.log({"train/loss": 0.5}, step=2)
        tracker.log_artifact(
            artifact_file, name="probe-layer3", type="probe", metadata={"layer": 3, "api_key": FAKE_OPENAI}
        )
        tracker.log_artifact(artifact_file.parent, name="inputs-dir", type="dataset")
        tracker.summary({"final/accuracy": 0.75})

    assert tracker.nonfinite == [
        {"key": "train/loss", "step": 1, "value": "nan"},
        {"key": "train/grad", "step": 1, "value": "inf"},
    ]
    assert tracker.wandb_dir == tracker.run_path == find_offline_run(run_dir)
    assert tracker.wandb_dir.name.startswith("offline-run-") and tracker.wandb_dir.parent == run_dir / "wandb"

    parsed = read_offline_run(run_dir)
    assert parsed["run_id"] == tracker.run_id and parsed["project"] == "irm"
    assert parsed["exit_code"] == 0
    config = parsed["config"]
    assert config["lr"] == 0.001 and config["models"]["max_new_tokens"] == 16
    assert config["judge"] == {"openai_api_key": REDACTED, "note": REDACTED}
    assert config["wandb_key"] == REDACTED

    by_step = {row["_step"]: row for row in parsed["history"]}
    assert sorted(by_step) == [0, 1, 2]
    assert by_step[0]["train/loss"] == 1.5 and by_step[0]["train/acc"] == 0.25
    assert math.isnan(by_step[1]["train/loss"]) and by_step[1]["train/grad"] == math.inf
    assert by_step[2]["train/loss"] == 0.5
    table = by_step[1]["eval/samples"]  # logged at the last step, 1
    assert table["_type"] == "table-file" and (table["nrows"], table["ncols"]) == (2, 2)
    media = tracker.wandb_dir / "files" / table["path"]
    assert json.loads(media.read_text())["data"] == [["The plot", 0.5], ["The cast", -1.0]]
    assert json.loads(table_path.read_text())["rows"] == [["The plot", 0.5], ["The cast", -1.0]]
    assert table_path == run_dir / "tables" / "eval__samples.json"

    assert {"probe-layer3", "inputs-dir"} <= set(parsed["artifacts"])
    records = {r["name"]: r for r in parsed["artifact_records"]}
    assert records["probe-layer3"]["type"] == "probe"
    assert records["probe-layer3"]["metadata"] == {"layer": 3, "api_key": REDACTED}
    assert records["probe-layer3"]["files"] == ["probe.json"]
    assert sorted(records["inputs-dir"]["files"]) == ["probe.json", "sub/notes.txt"]
    assert parsed["summary"]["final/accuracy"] == 0.75 and parsed["summary"]["train/loss"] == 0.5

    # metrics.jsonl is valid JSON (non-finite values as strings), one line per call
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert lines[1]["train/loss"] == "nan" and lines[1]["train/grad"] == "inf"

    # The planted secrets are in no file under run_dir, wandb's logs included.
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files) and any(path.name == "debug.log" for path in files)
    for path in files:
        content = path.read_bytes()
        for secret in (FAKE_OPENAI, FAKE_HF, FAKE_WANDB_HEX):
            assert secret.encode() not in content, f"{secret[:8]}... leaked into {path}"


def test_exception_in_context_marks_run_failed_and_propagates(wandb_env):
    run_dir = wandb_env / "failing"
    with pytest.raises(KeyError, match="boom"):
        with Tracker.open({"seed": 1}, run_dir=run_dir, mode="offline") as tracker:
            tracker.log({"train/loss": 2.0}, step=0)
            raise KeyError("boom")
    parsed = read_offline_run(tracker.wandb_dir)
    assert parsed["exit_code"] == 1
    assert [row["train/loss"] for row in parsed["history"]] == [2.0]
    with pytest.raises(RuntimeError, match="finished"):
        tracker.log({"train/loss": 1.0}, step=1)


def test_step_going_back_is_kept_locally_with_warning(wandb_env):
    run_dir = wandb_env / "steps"
    with Tracker.open({}, run_dir=run_dir, mode="offline") as tracker:
        tracker.log({"tune/loss": 1.0}, step=5)
        with pytest.warns(RuntimeWarning, match="below the last logged step 5"):
            tracker.log({"probe/acc": 0.9}, step=0)
    assert tracker.out_of_order == [{"what": "metrics ['probe/acc']", "step": 0, "last_step": 5}]
    history = read_offline_run(run_dir)["history"]
    assert [row["_step"] for row in history] == [5] and "probe/acc" not in history[0]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 0, "time": lines[1]["time"], "probe/acc": 0.9}


def test_read_offline_run_detects_corruption(wandb_env):
    run_dir = wandb_env / "corrupt"
    with Tracker.open({"k": "v"}, run_dir=run_dir, mode="offline") as tracker:
        tracker.log({"a/b": 1.0}, step=0)
    wandb_file = next(tracker.wandb_dir.glob("*.wandb"))
    damaged = bytearray(wandb_file.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    copy_path = wandb_env / "damaged.wandb"
    copy_path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="corrupt chunk"):
        read_offline_run(copy_path)
    not_wandb = wandb_env / "other.wandb"
    not_wandb.write_bytes(b"PK\x03\x04 not a wandb file")
    with pytest.raises(ValueError, match="does not start with a wandb run file header"):
        read_offline_run(not_wandb)
    with pytest.raises(FileNotFoundError, match="no offline wandb run found"):
        read_offline_run(wandb_env / "nowhere")


# --------------------------------------------------------------------------- disabled mode


@pytest.mark.parametrize("how", ["argument", "env"])
def test_disabled_mode_writes_local_files_and_no_wandb_dir(tmp_path, monkeypatch, how):
    monkeypatch.setenv("WANDB_MODE", "offline")
    if how == "env":
        monkeypatch.setenv("IRM_WANDB_MODE", "off")
        mode = None
    else:
        monkeypatch.delenv("IRM_WANDB_MODE", raising=False)
        mode = "disabled"
    run_dir = tmp_path / "run"
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\x00\x01")
    with Tracker.open({"token": FAKE_HF, "lr": 0.1}, run_dir=run_dir, mode=mode) as tracker:
        tracker.log({"train/loss": 1.0}, step=0)
        tracker.log({"train/loss": 0.5, "eval/acc": 0.8}, step=1)
        tracker.log_table("eval/table", ["a"], [[1], [2]])
        tracker.log_artifact(source, name="weights", type="model", metadata={"password": "x"})
        tracker.summary({"final/acc": 0.8})
    assert tracker.mode == "disabled" and tracker.wandb_dir is None and tracker.run_id is None
    assert not (run_dir / "wandb").exists() and find_offline_run(run_dir) is None
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["train/loss"]) for line in lines] == [(0, 1.0), (1, 0.5)]
    assert lines[1]["eval/acc"] == 0.8
    assert json.loads((run_dir / "tables" / "eval__table.json").read_text())["rows"] == [[1], [2]]
    artifact = json.loads((run_dir / "artifacts.jsonl").read_text())
    assert artifact["name"] == "weights" and artifact["metadata"] == {"password": REDACTED}
    assert json.loads((run_dir / "summary.json").read_text()) == {"final/acc": 0.8}
    assert json.loads((run_dir / "tracker_config.json").read_text()) == {"token": REDACTED, "lr": 0.1}


# --------------------------------------------------------------------------- validation


def test_unnamespaced_keys_raise_and_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker.open({}, run_dir=run_dir, mode="disabled")
    for bad in ("loss", "train/", "/loss"):
        with pytest.raises(ValueError, match=f"{bad!r} is not namespaced"):
            tracker.log({"train/ok": 1.0, bad: 2.0}, step=0)
    with pytest.raises(ValueError, match="'samples' is not namespaced"):
        tracker.log_table("samples", ["a"], [[1]])
    assert not (run_dir / "metrics.jsonl").exists(), "a rejected call must not be half-written"
    with pytest.raises(TypeError, match="'train/name' is a string"):
        tracker.log({"train/name": "gpt2"}, step=0)
    with pytest.raises(TypeError, match="step must be an int"):
        tracker.log({"train/loss": 1.0}, step=1.5)
    with pytest.raises(ValueError, match="row 1 has 1 values but there are 2 columns"):
        tracker.log_table("eval/t", ["a", "b"], [[1, 2], [3]])
    with pytest.raises(FileNotFoundError, match=str((tmp_path / "missing.pt").resolve())):
        tracker.log_artifact(tmp_path / "missing.pt", name="m", type="model")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="invalid artifact name 'bad name/with slash'"):
        tracker.log_artifact(tmp_path / "f.txt", name="bad name/with slash", type="model")
    tracker.finish()
    tracker.finish()  # idempotent


def test_online_without_credentials_fails_with_guidance(wandb_env, monkeypatch):
    # No key, no netrc, and pytest's stdin is no terminal: wandb refuses
    # before any network call instead of prompting for a key.
    monkeypatch.setenv("NETRC", str(wandb_env / "no-netrc"))
    with pytest.raises(RuntimeError, match="wandb login.*WANDB_API_KEY.*mode='offline'") as info:
        Tracker.open({}, run_dir=wandb_env / "online", mode="online")
    assert info.value.__cause__ is not None


def test_run_dir_path_type(tmp_path):
    tracker = Tracker.open({"a": 1}, run_dir=str(tmp_path / "as_str"), mode="off")
    assert isinstance(tracker.run_dir, Path) and tracker.run_dir.is_dir()
    tracker.finish()
