"""LLM rewrites (the paper's two-step rewrite, ``generators = ["llm_rewrite"]``) with the embedded model:
how many replies parse, and seconds per comparison, step 1 constrained (``scored``) against generated.

Each side explains the same comparisons of the packaged ``sample`` with a fresh, uncached
:class:`~irm.llm.LocalChatLLM` (SmolLM2-135M-Instruct) over every attribute, both directions, chosen
and rejected: the workload of ``irm explain ... --generators programmatic llm_rewrite``. Printed per
side: replies that parsed per kind (step 1 and step 2), valid perturbations, wall seconds per
comparison, and a few failed replies.

    python benchmarks/bench_llm_rewrite.py                      # 3 comparisons, both sides (~10 min)
    python benchmarks/bench_llm_rewrite.py -n 5 --sides scored
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_side(step1: str, comps, model, attributes) -> dict:
    from irm.contrastive import explain
    from irm.contrastive.perturb import LLMRewriteGenerator
    from irm.llm import LocalChatLLM
    from irm.rewards import load_rm

    gen = LLMRewriteGenerator(LocalChatLLM(model), step1=step1)
    t0 = time.perf_counter()
    res = explain(comps, [load_rm("vader")], attributes=attributes, generators=[gen],
                  limits={"llm_rewrite": len(comps)}, embedder=None, n_bootstrap=50, random_baseline=False)
    wall = time.perf_counter() - t0
    s = res.summary()
    valid = [v for k, v in s["validity"].items() if k.startswith("llm_rewrite/")]
    return {"wall": wall, "per_comparison": wall / len(comps), "counts": gen.parse_log.counts,
            "n_ok": gen.parse_log.n_ok, "n_failed": gen.parse_log.n_failed,
            "perturbations": sum(v["n"] for v in valid), "valid": sum(v["ok"] for v in valid),
            "failures": gen.parse_log.failures[:6]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--comparisons", type=int, default=3)
    ap.add_argument("--sides", nargs="+", default=["scored", "generate"], choices=["scored", "generate"])
    ap.add_argument("--attributes", nargs="*", default=None, help="default: every registered attribute")
    args = ap.parse_args()

    from irm.contrastive.comparisons import load_comparisons
    from irm.models import load_model

    comps = load_comparisons("sample", limit=args.comparisons)
    model = load_model("smollm2-135m-instruct")
    for side in args.sides:
        r = run_side(side, comps, model, args.attributes)
        n = r["n_ok"] + r["n_failed"]
        print(f"\n== step1 = {side}: {len(comps)} comparisons, {r['wall']:.0f} s "
              f"({r['per_comparison']:.1f} s per comparison)")
        print(f"   replies parsed: {r['n_ok']}/{n} = {r['n_ok'] / max(n, 1):.1%}   by kind: {r['counts']}")
        print(f"   perturbations: {r['perturbations']}, valid (changed the text): {r['valid']}")
        for f in r["failures"]:
            print(f"   failed {f.get('kind')}: {f.get('error')} | {str(f.get('excerpt'))[:80]!r}")


if __name__ == "__main__":
    main()
