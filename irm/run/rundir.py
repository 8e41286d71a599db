"""Run directories: where a run's config, environment, results, report and plots are written.

``results.json`` is built section by section (``pair``, ``divergence``, ``capture``, ``irm`` ...): each
stage calls :meth:`RunDir.update_results` with its own section, so a crash in a later stage loses
nothing an earlier stage computed.
"""

from __future__ import annotations

import json
import platform
import random
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irm.core.constants import RUN_CONFIG, RUN_ENV, RUN_RESULTS
from irm.core.io import redact, to_jsonable, write_json_atomic

__all__ = ["RunDir", "seed_everything", "package_versions", "to_jsonable"]

_PACKAGES = ("irm", "torch", "transformers", "transformer-lens", "sae-lens", "trl", "scikit-learn",
             "numpy", "datasets", "wandb", "safetensors", "vaderSentiment")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass
class RunDir:
    path: Path

    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any], *, seed: int) -> RunDir:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        write_json_atomic(p / RUN_CONFIG, redact(to_jsonable(config)))
        env = {"versions": package_versions(), "seed": seed, "platform": platform.platform(),
               "device": "cuda" if torch.cuda.is_available() else "cpu",
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(p / RUN_ENV, env)
        rd = cls(p)
        if not (p / RUN_RESULTS).is_file():
            rd._write({"config": redact(to_jsonable(config)), "environment": env})
        else:  # a rerun: keep earlier sections, refresh config and environment
            rd.update_results("config", redact(to_jsonable(config)))
            rd.update_results("environment", env)
        return rd

    @property
    def results_path(self) -> Path:
        return self.path / RUN_RESULTS

    def results(self) -> dict[str, Any]:
        if not self.results_path.is_file():
            return {}
        return json.loads(self.results_path.read_text())

    def update_results(self, section: str, value: Any) -> None:
        res = self.results()
        res[section] = to_jsonable(value)
        self._write(res)

    def _write(self, res: dict[str, Any]) -> None:
        write_json_atomic(self.results_path, to_jsonable(res))

    def sub(self, name: str) -> Path:
        p = self.path / name
        p.mkdir(parents=True, exist_ok=True)
        return p
