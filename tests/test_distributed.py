"""Data-parallel capture and probe fitting: 2 torchrun processes (gloo, loopback) == 1 process."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from irm.activations.store import ActivationStore

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "tiny.toml")
N_TEXTS, SHARD = 40, 8  # 5 shards: rank 0 computes 0, 2, 4 and rank 1 computes 1, 3

# Runs under torchrun (2 ranks) and alone (1 process): the entry point twice (a store, then another
# over it with --overwrite), then three probe fits.
_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from irm.activations.distributed import destroy, fit_ridge_from_store, get_rank, get_world_size, init_distributed
    from irm.run.distributed import main

    args = json.loads(sys.argv[1])
    init_distributed()
    sets = sum((["--set", s] for s in args["sets"]), [])
    # A store with other settings first, then --overwrite: rank 0 removes it while rank 1 waits.
    assert main(["capture", args["config"], *sets, "--set", "capture.positions='last'"]) == 0
    assert main(["capture", args["config"], *sets, "--overwrite"]) == 0
    store = args["store"]
    per_text = np.random.default_rng(0).normal(size=args["n_texts"])
    fits = {
        # one target per text, broadcast to the text's rows; a fixed alpha
        "per_text": fit_ridge_from_store(store, "tuned", "blocks.3.hook_resid_post", per_text, alpha=1.0),
        # per-row 2-D targets from a function of the index; GCV; every other text
        "per_row_gcv": fit_ridge_from_store(
            store, "base", "blocks.1.hook_resid_post",
            lambda x, idx: np.stack([idx["pos"].numpy(), idx["token"].numpy() % 7], 1).astype(float),
            alpha="auto", texts=range(0, args["n_texts"], 2)),
        # rows of shard 0 only: rank 1 contributes empty statistics
        "one_shard": fit_ridge_from_store(store, "base", "blocks.3.hook_resid_post", per_text, alpha=0.5,
                                          texts=range(args["shard"])),
    }
    if get_rank() == 0:
        out = {f"{k}/coef": p.coef_ for k, p in fits.items()}
        out.update({f"{k}/intercept": np.asarray(p.intercept_) for k, p in fits.items()})
        out["per_row_gcv/alpha"] = np.asarray(fits["per_row_gcv"].alpha_)
        out["world_size"] = np.asarray(get_world_size())
        np.savez(args["out"], **out)
    destroy()
    """
)


def _args(tmp_path: Path, name: str) -> dict:
    run_dir = tmp_path / name
    return {
        "config": TINY,
        "sets": [f"run_dir='{run_dir}'", f"data.limit={N_TEXTS}", "models.tuned='tiny-llama:seed=1'",
                 "capture.positions='all'", f"capture.shard_size={SHARD}", "capture.batch_size=4",
                 "tracking.mode='disabled'"],
        "store": str(run_dir / "store"),
        "n_texts": N_TEXTS,
        "shard": SHARD,
        "out": str(tmp_path / f"{name}.npz"),
    }


def _launch(tmp_path: Path, args: dict, nproc: int) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    # --standalone: a local rendezvous on a free port; gloo on the loopback interface only.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, IRM_PROGRESS="0", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with (tmp_path / "torchrun.log").open("w") as log:  # a file, not a pipe nobody reads meanwhile
        return subprocess.Popen([*launcher, str(script), json.dumps(args)], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(p: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(p)
        pytest.fail(f"timed out after {timeout} s:\n{log.read_text()[-4000:]}")
    out = log.read_text()
    assert p.returncode == 0, out[-4000:]
    return out


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers: a session of their own
        p.wait()


def test_two_ranks_give_the_store_and_probes_of_one_process(tmp_path, monkeypatch):
    one, two = _args(tmp_path, "one"), _args(tmp_path, "two")
    proc = _launch(tmp_path, two, nproc=2)
    # Meanwhile the same script as one plain process, here (no WORLD_SIZE: nothing distributed).
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "argv", ["child.py", json.dumps(one)])
    try:
        runpy.run_path(str(tmp_path / "child.py"), run_name="__main__")
    except BaseException:
        _kill(proc)
        raise
    out_two = _wait(proc, tmp_path / "torchrun.log", timeout=150)

    s1, s2 = ActivationStore(Path(one["store"])), ActivationStore(Path(two["store"]))
    assert s2.n_shards == 5 and s2.manifest["complete"]
    # Same settings, same shards (rows and sha256), so bitwise-equal files and an equal manifest.
    assert s1.manifest == s2.manifest
    for role in ("base", "tuned"):
        for hook in s1.hooks:
            assert torch.equal(s1.load(role, hook), s2.load(role, hook)), (role, hook)
    for key, col in s1.index().items():
        assert np.array_equal(col, s2.index()[key]), key
    results = json.loads((Path(two["store"]).parent / "results.json").read_text())
    assert results["capture"]["world_size"] == 2 and results["capture"]["rows"] == s1.n_rows
    assert "Store:" in out_two and "2 rank(s)" in out_two

    with np.load(one["out"]) as a, np.load(two["out"]) as b:
        assert int(a["world_size"]) == 1 and int(b["world_size"]) == 2
        assert set(a.files) == set(b.files)
        assert np.array_equal(a["per_row_gcv/alpha"], b["per_row_gcv/alpha"])  # GCV chose the same alphas
        for key in sorted(set(a.files) - {"world_size"}):
            ref = a[key]
            rel = np.max(np.abs(b[key] - ref)) / max(np.max(np.abs(ref)), 1e-300)
            assert rel < 1e-8, (key, rel)
        assert a["per_row_gcv/coef"].shape == (2, 64)  # 2-D targets: [k, d_model]


def test_outside_torchrun_everything_is_one_process(monkeypatch):
    from irm.activations.distributed import (
        all_reduce_stats,
        barrier,
        get_rank,
        get_world_size,
        init_distributed,
    )
    from probes import RidgeSufficientStats

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    assert (get_rank(), get_world_size()) == (0, 1)
    barrier()  # a no-op, not a hang
    stats = RidgeSufficientStats().update(np.eye(3), np.arange(3.0))
    assert all_reduce_stats(stats) is stats


def test_world_size_without_a_launcher_says_how_to_launch(monkeypatch):
    from irm.activations.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        init_distributed()
