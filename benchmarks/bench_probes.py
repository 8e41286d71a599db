"""Streaming GCV ridge (probes) vs sklearn RidgeCV on the same data and alpha grid.

Each side runs in a fresh subprocess that generates the same data (seeded),
resets the kernel's peak-RSS counter, fits, and reports its wall time and
peak RSS; the parent compares the coefficients.

    python benchmarks/bench_probes.py                 # n=200000, d=576
    python benchmarks/bench_probes.py --n 20000 --d 128

Streaming side: shards of ``--shard`` rows -> RidgeSufficientStats.update, then
one solve_gcv over the default 40-point grid. sklearn side: RidgeCV(alphas=that
same grid) (efficient exact leave-one-out, gcv_mode="auto").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def make_data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Activation-like data: correlated features, decaying spectrum, non-zero means.

    Built in 10k-row chunks so generation needs no full-size temporaries.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    mix = q * np.logspace(0.5, -1.5, d)  # singular values from ~3 down to ~0.03
    offset = rng.normal(scale=2.0, size=d)
    w = rng.normal(size=d) / np.sqrt(d)
    X = np.empty((n, d))
    y = np.empty(n)
    for start in range(0, n, 10_000):
        stop = min(start + 10_000, n)
        X[start:stop] = rng.standard_normal((stop - start, d)) @ mix.T + offset
        y[start:stop] = (X[start:stop] - offset) @ w + 0.5 * rng.standard_normal(stop - start)
    return X, y


def _proc_status(field: str) -> float:
    """A /proc/self/status memory field in MB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS so the peak covers only the fit (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_side(args: argparse.Namespace) -> None:
    # Import before the peak reset so library loading is not counted as fit memory.
    from sklearn.linear_model import RidgeCV

    from probes import RidgeSufficientStats

    X, y = make_data(args.n, args.d, args.seed)
    out = Path(args.workdir)
    reset_ok = _reset_peak_rss()
    rss_data = _proc_status("VmRSS")
    result: dict[str, float | bool | str] = {"peak_reset": reset_ok, "rss_with_data_mb": rss_data}
    if args.side == "stream":
        t0 = time.perf_counter()
        stats = RidgeSufficientStats()
        for start in range(0, args.n, args.shard):
            stats.update(X[start:start + args.shard], y[start:start + args.shard])
        t1 = time.perf_counter()
        res = stats.solve_gcv()
        t2 = time.perf_counter()
        result.update(time_s=t2 - t0, accumulate_s=t1 - t0, gcv_solve_s=t2 - t1, alpha=res.alpha)
        np.save(out / "alphas.npy", res.alphas)
        np.save(out / "coef_stream.npy", res.coef)
        result["intercept"] = res.intercept
        stats.save(out / "stats.npz")
    else:
        alphas = np.load(out / "alphas.npy")
        t0 = time.perf_counter()
        model = RidgeCV(alphas=alphas).fit(X, y)
        result.update(time_s=time.perf_counter() - t0, alpha=float(model.alpha_))
        np.save(out / "coef_sklearn.npy", model.coef_)
        result["intercept"] = float(model.intercept_)
    result["peak_rss_mb"] = _proc_status("VmHWM")
    (out / f"{args.side}.json").write_text(json.dumps(result))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--shard", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=["stream", "sklearn"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return

    with tempfile.TemporaryDirectory() as workdir:
        results = {}
        # Stream first: it writes the alpha grid the sklearn side must use.
        for side in ("stream", "sklearn"):
            cmd = [sys.executable, __file__, "--side", side, "--workdir", workdir,
                   "--n", str(args.n), "--d", str(args.d), "--shard", str(args.shard),
                   "--seed", str(args.seed)]
            subprocess.run(cmd, check=True)
            results[side] = json.loads((Path(workdir) / f"{side}.json").read_text())
        coef_s = np.load(Path(workdir) / "coef_stream.npy")
        coef_k = np.load(Path(workdir) / "coef_sklearn.npy")
        alphas = np.load(Path(workdir) / "alphas.npy")
        from probes import RidgeSufficientStats

        stats = RidgeSufficientStats.load(Path(workdir) / "stats.npz")
        # Same-alpha comparison isolates solver accuracy from GCV-vs-LOO choice.
        coef_at_sk_alpha, icpt_at_sk_alpha = stats.solve(results["sklearn"]["alpha"])

    s, k = results["stream"], results["sklearn"]
    data_mb = args.n * args.d * 8 / 2**20
    print(f"n={args.n} d={args.d} shard={args.shard} grid={len(alphas)} alphas "
          f"[{alphas[0]:.3g}, {alphas[-1]:.3g}]  X={data_mb:.0f} MiB  cpus={os.cpu_count()}")
    print(f"{'':28s}{'streaming GCV':>16s}{'sklearn RidgeCV':>18s}")
    print(f"{'fit time (s)':28s}{s['time_s']:16.2f}{k['time_s']:18.2f}")
    print(f"{'  accumulate / solve (s)':28s}{s['accumulate_s']:8.2f} /{s['gcv_solve_s']:6.2f}")
    print(f"{'peak RSS (MB)':28s}{s['peak_rss_mb']:16.0f}{k['peak_rss_mb']:18.0f}")
    print(f"{'peak RSS above data (MB)':28s}{s['peak_rss_mb'] - s['rss_with_data_mb']:16.0f}"
          f"{k['peak_rss_mb'] - k['rss_with_data_mb']:18.0f}")
    print(f"{'chosen alpha':28s}{s['alpha']:16.4g}{k['alpha']:18.4g}")
    print(f"speedup (sklearn / streaming): {k['time_s'] / s['time_s']:.1f}x")
    same = s["alpha"] == k["alpha"]
    print(f"same alpha chosen: {same}")
    print(f"max rel coef diff, each at its chosen alpha: {_rel(coef_s, coef_k):.2e}")
    print(f"max rel coef diff, streaming solved at sklearn's alpha: {_rel(coef_at_sk_alpha, coef_k):.2e}"
          f"  (intercept diff {abs(icpt_at_sk_alpha - k['intercept']):.1e})")
    if not (s["peak_reset"] and k["peak_reset"]):
        print("note: could not reset peak RSS; peaks include data generation")


if __name__ == "__main__":
    main()
