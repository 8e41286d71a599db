"""Read a finished run for analysis (notebooks): results, plots, stores and the offline wandb run.

Nothing here trains or recomputes: it turns ``results.json`` into pandas tables.

>>> run = load_run("runs/default")
>>> run.irm_sources().head()          # one row per IRM source, held-out tau with CI
>>> run.divergence_layers()           # per-layer parameter and activation divergence
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from irm.core.constants import RUN_RESULTS

__all__ = ["Run", "load_run"]


def _pd():
    import pandas as pd

    return pd


@dataclass
class Run:
    path: Path
    results: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.results.get("config", {})

    def section(self, name: str) -> dict[str, Any]:
        if name not in self.results:
            raise KeyError(f"Run {self.path} has no {name!r} section; it has {sorted(self.results)}. "
                           "Was that stage run (see `irm run --only`)?")
        return self.results[name]

    def plots(self) -> list[Path]:
        return sorted((self.path / "plots").glob("*.png"))

    # -------------------------------------------------------------------------------------------
    def tune_curves(self):
        return _pd().DataFrame(self.section("tune").get("curves", []))

    def eval_samples(self):
        p = self.path / "evaluation" / "eval_samples.jsonl"
        rows = [json.loads(x) for x in p.read_text().splitlines() if x] if p.is_file() else \
            self.section("evaluation").get("samples", [])
        return _pd().DataFrame(rows)

    def divergence_layers(self):
        return _pd().DataFrame(self.section("divergence")["layers"]).set_index("layer")

    def irm_sources(self):
        rows = []
        for s in self.section("irm").get("sources", []):
            tau = s["metrics"]["kendall_tau"]
            rows.append({"source": s["name"], "kind": s["kind"], "features": s["features"], "hook": s["hook"],
                         "supervised": s["supervised"], "cv_tau_fit": s["cv_tau_fit"], "tau": tau["value"],
                         "tau_low": tau["low"], "tau_high": tau["high"],
                         "sign_agreement": s["metrics"]["sign_agreement"]["value"], **s["counts"]})
        return _pd().DataFrame(rows).sort_values("tau", ascending=False, na_position="last")

    def irm_divergence(self):
        d = self.section("irm").get("divergence", {})
        frames = [_pd().DataFrame(v).assign(direction=k) for k, v in d.items()]
        return _pd().concat(frames, ignore_index=True) if frames else _pd().DataFrame()

    def contrastive_sensitivity(self):
        """Preference flip rate per (RM, generator, attribute) with its CI, long format."""
        rows = []
        for rm, by_gen in self.section("contrastive").get("sensitivity", {}).items():
            for gen, sec in by_gen.items():
                for attr, v in (sec.get("pfr") or {}).items():
                    ci = v.get("ci") or [None, None]
                    rows.append({"rm": rm, "generator": gen, "attribute": attr, "pfr": v.get("pfr"),
                                 "pfr_low": ci[0], "pfr_high": ci[1], "n": v.get("n"),
                                 "random_pfr": v.get("random_pfr")})
        return _pd().DataFrame(rows)

    def wandb_run(self) -> dict[str, Any]:
        """The offline wandb run of this run (config, history, summary, artifacts)."""
        from irm.run.wandb_offline import find_offline_run, read_offline_run

        p = find_offline_run(self.path)
        if p is None:
            raise FileNotFoundError(f"No offline wandb run under {self.path}/wandb (was tracking disabled?).")
        return read_offline_run(p)


def load_run(path: str | Path) -> Run:
    p = Path(path)
    f = p / RUN_RESULTS
    if not f.is_file():
        raise FileNotFoundError(f"{p.resolve()} has no {RUN_RESULTS}: not a run directory. "
                                "Make one with `irm run experiments/tiny.toml`.")
    return Run(p, json.loads(f.read_text()))
