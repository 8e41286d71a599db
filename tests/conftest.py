"""Shared fixtures: real tiny models built locally (no hub, no mocks), a persistent test cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
# Converted and built checkpoints are cached across test runs (git-ignored); a fresh clone builds
# them once. IRM_TEST_CACHE_DIR overrides where.
CACHE = Path(os.environ.get("IRM_TEST_CACHE_DIR", REPO / ".cache" / "test"))
os.environ["IRM_CACHE_DIR"] = str(CACHE)
os.environ.setdefault("IRM_PROGRESS", "0")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and several test processes may share the two cores.
torch.set_num_threads(int(os.environ.get("IRM_TEST_THREADS", "1")))
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("IRM_TEST_THREADS", "1"))
# numpy's BLAS as well: a threaded eigh on a busy CPU runs 30x slower than a single-threaded one.
threadpool_limits(int(os.environ.get("IRM_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_base():
    from irm.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_tuned():
    from irm.models import load_model

    return load_model("tiny-llama:seed=1")


@pytest.fixture(scope="session")
def smollm2():
    from irm.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture
def seeded():
    from irm.run.rundir import seed_everything

    seed_everything(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` compare results on a GPU with the CPU's; without CUDA they cannot run, so they
    are deselected (not skipped) and the header says so. ``benchmarks/gpu_check.sh`` runs them on a GPU."""
    if torch.cuda.is_available():
        return
    gpu = [i for i in items if i.get_closest_marker("cuda")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [i for i in items if not i.get_closest_marker("cuda")]
        config._irm_cuda_deselected = len(gpu)


def pytest_report_header(config):
    if not torch.cuda.is_available():
        return "no CUDA here: tests marked 'cuda' are deselected (benchmarks/gpu_check.sh runs them on a GPU)"
    return None
