"""Wall time of the main job, ``irm run CONFIG``, cold and with a cached pair, against its targets.

- **cold**: a fresh ``IRM_CACHE_DIR`` and a fresh run directory, so everything is computed: the
  GGUF dequantisation (or tiny-model build), the RLHF tuning of the pair, and every stage;
- **cached**: the same ``IRM_CACHE_DIR`` again with a fresh run directory: the converted base and the
  tuned model are reused, and so are the LLM's replies (feature explanations and labels) that the
  cold run cached; every other stage after the pair is recomputed;
- **pair** (``--pair-only``): a cache that holds only the pair (links to the cold cache's ``models``
  and ``tuned``), so the LLM's replies are recomputed too.

Each run is ``python -m irm.cli run CONFIG --set run_dir=...`` in its own subprocess; its output goes
to ``WORKDIR/{cold,cached}.log``. The per-stage seconds come from the run's ``results.json``.

    python benchmarks/bench_pipeline.py                                # experiments/default.toml
    python benchmarks/bench_pipeline.py experiments/tiny.toml --cold-target 1 --cached-target 0.5
    python benchmarks/bench_pipeline.py --set data.limit=64 --keep     # overrides go to both runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(config: str, sets: list[str], run_dir: Path, cache_dir: Path, log_path: Path, timeout: float,
            verbose: bool) -> dict:
    """``irm run`` in a subprocess; returns wall seconds, exit code and the run's stage timings."""
    cmd = [sys.executable, "-m", "irm.cli", "-q", "run", config, "--set", f"run_dir='{run_dir}'"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, IRM_CACHE_DIR=str(cache_dir), IRM_PROGRESS="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=None if verbose else log,
                                stderr=subprocess.STDOUT if not verbose else None, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - t0
    results = run_dir / "results.json"
    timings = json.loads(results.read_text()).get("timings", {}) if results.is_file() else {}
    return {"wall_s": wall, "rc": rc, "timings": timings, "cmd": cmd}


def _pipeline_order(names: list[str]) -> list[str]:
    """Stage names in the order the pipeline runs them (results.json stores them sorted by name)."""
    try:
        sys.path.insert(0, str(ROOT))
        from irm.run.registry import STAGES, import_stages

        import_stages()
        order = {name: o for name, (o, _) in STAGES.items()}
    except Exception:  # a stage module that does not import yet: fall back to names
        order = {}
    return sorted(names, key=lambda n: (order.get(n, float("inf")), n))


def _tail(path: Path, n: int = 40) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "experiments" / "default.toml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both runs, e.g. --set data.limit=64")
    parser.add_argument("--cold-target", type=float, default=15.0, help="minutes (default 15)")
    parser.add_argument("--cached-target", type=float, default=5.0, help="minutes (default 5)")
    parser.add_argument("--only", choices=["both", "cold", "cached"], default="both",
                        help="'cached' alone reuses --cache-dir (it must hold the pair already)")
    parser.add_argument("--pair-only", action="store_true",
                        help="also run with a cache that holds only the pair (no cached LLM replies)")
    parser.add_argument("--cache-dir", help="IRM_CACHE_DIR to use (default: a fresh one under the workdir)")
    parser.add_argument("--workdir", help="where run dirs, cache and logs go (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (run dirs, cache, logs)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
    parser.add_argument("--verbose", action="store_true", help="stream the runs' output instead of logging it")
    args = parser.parse_args()

    config = str(Path(args.config).resolve())
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir).resolve() if args.cache_dir else work / "cache"
    if args.only != "cached" and cache.exists() and any(cache.iterdir()):
        print(f"error: the cold run needs an empty cache dir, and {cache} is not empty", file=sys.stderr)
        return 2
    cache.mkdir(parents=True, exist_ok=True)
    # The human-rated corpora (experiments with [train_rm]) are fetched by the set-up (`make human-data`), not by
    # a run: a cold run reads the set-up's download, linked into its fresh cache.
    sys.path.insert(0, str(ROOT))
    from irm.data.human import SDIST_NAME, human_data_path

    fetched = human_data_path()
    if fetched.is_file() and not (cache / "data" / SDIST_NAME).exists():
        (cache / "data").mkdir(exist_ok=True)
        (cache / "data" / SDIST_NAME).symlink_to(fetched)
    print(f"config={args.config} overrides={args.set or 'none'} cpus={os.cpu_count()} workdir={work}")

    phases = {"cold": args.cold_target, "cached": args.cached_target}
    if args.only != "both":
        phases = {args.only: phases[args.only]}
    if args.pair_only:
        phases["pair"] = args.cached_target
    results: dict[str, dict] = {}
    failed = False
    try:
        for name, target_min in phases.items():
            run_dir = work / name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cache_of = cache
            if name == "pair":  # only the converted base and the tuned model, as links into the cache
                cache_of = work / "pair_cache"
                shutil.rmtree(cache_of, ignore_errors=True)
                cache_of.mkdir(parents=True)
                for sub in ("models", "tuned"):
                    if (cache / sub).exists():
                        (cache_of / sub).symlink_to(cache / sub, target_is_directory=True)
            res = run_job(config, args.set, run_dir, cache_of, work / f"{name}.log", args.timeout, args.verbose)
            results[name] = res
            status = "ok" if res["rc"] == 0 else ("timed out" if res["rc"] is None else f"exit code {res['rc']}")
            print(f"{name:7s} {res['wall_s']:8.1f} s  ({res['wall_s'] / 60:.2f} min, target {target_min:g} min: "
                  f"{'OK' if res['rc'] == 0 and res['wall_s'] <= 60 * target_min else 'MISSED'})  [{status}]")
            if res["rc"] != 0:
                failed = True
                print(f"  {' '.join(res['cmd'])}\n  last lines of {work / (name + '.log')}:\n{_tail(work / (name + '.log'))}")
                break
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    stages = _pipeline_order([s for s in dict.fromkeys(k for r in results.values() for k in r["timings"])
                              if s != "total"])
    if stages:
        print(f"\n{'stage seconds':16s}" + "".join(f"{n:>10s}" for n in results))
        for s in [*stages, "total"]:
            print(f"{s:16s}" + "".join(f"{r['timings'].get(s, float('nan')):10.1f}" for r in results.values()))
        print("(total: the stages, in-process; the wall time above adds interpreter start-up and imports)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
