"""LLM rewrites (the paper's two-step rewrite, ``generators = ["llm_rewrite"]``) with the embedded model:
how many replies parse, how many rewrites are valid and fluent, and seconds per comparison, for each
way of running the two steps (step 1 ``generate``/``scored``, step 2 ``words`` (grammar) / ``free``).

Each side explains the same comparisons of the packaged ``sample`` with a fresh, uncached
:class:`~irm.llm.LocalChatLLM` (SmolLM2-135M-Instruct) over every attribute, both directions, chosen
and rejected: the workload of ``irm explain ... --generators programmatic llm_rewrite``. Printed per
side: replies that parsed per kind (step 1 and step 2), valid perturbations, wall seconds per
comparison, and a few failed replies.

    python benchmarks/bench_llm_rewrite.py                      # 3 comparisons, two sides (~4 min)
    python benchmarks/bench_llm_rewrite.py -n 5 --sides generate:words scored:words
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_side(step1: str, step2: str, comps, model, attributes) -> dict:
    from irm.contrastive import explain
    from irm.contrastive.fluency import LMFluency
    from irm.contrastive.perturb import LLMRewriteGenerator
    from irm.llm import LocalChatLLM
    from irm.rewards import load_rm

    gen = LLMRewriteGenerator(LocalChatLLM(model), step1=step1, step2=step2)
    made = []
    perturb = gen.perturb

    def recording(*a, **k):
        out = perturb(*a, **k)
        made.extend(out)
        return out

    gen.perturb = recording
    t0 = time.perf_counter()
    res = explain(comps, [load_rm("vader")], attributes=attributes, generators=[gen],
                  limits={"llm_rewrite": len(comps)}, embedder=None, n_bootstrap=50, random_baseline=False,
                  fluency=LMFluency(model, cache=False))
    wall = time.perf_counter() - t0
    rewrites = list(dict.fromkeys((p.original.strip(), p.text.strip(), f"{p.attribute}{'+' if p.direction > 0 else '-'}")
                                  for p in made if p.ok))
    s = res.summary()
    valid = [v for k, v in s["validity"].items() if k.startswith("llm_rewrite/")]
    return {"wall": wall, "per_comparison": wall / len(comps), "counts": gen.parse_log.counts,
            "n_ok": gen.parse_log.n_ok, "n_failed": gen.parse_log.n_failed,
            "perturbations": sum(v["n"] for v in valid), "valid": sum(v["ok"] for v in valid),
            "failures": gen.parse_log.failures, "rewrites": rewrites, "fluency": s.get("fluency", {}),
            "scored": sum(v["scored"] for v in valid), "moved": sum(v["moved"] for v in valid)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--comparisons", type=int, default=3)
    ap.add_argument("--sides", nargs="+", default=["generate:words", "generate:free"],
                    help="step1:step2 per side; step1 in generate|scored, step2 in words (grammar) | free")
    ap.add_argument("--attributes", nargs="*", default=None, help="default: every registered attribute")
    ap.add_argument("--show-failures", type=int, default=6, help="failed replies printed per side")
    args = ap.parse_args()

    from irm.contrastive.comparisons import load_comparisons
    from irm.models import load_model

    comps = load_comparisons("sample", limit=args.comparisons)
    model = load_model("smollm2-135m-instruct")
    for side in args.sides:
        step1, _, step2 = side.partition(":")
        r = run_side(step1, step2 or "words", comps, model, args.attributes)
        n = r["n_ok"] + r["n_failed"]
        print(f"\n== step1 = {side}: {len(comps)} comparisons, {r['wall']:.0f} s "
              f"({r['per_comparison']:.1f} s per comparison)")
        print(f"   replies parsed: {r['n_ok']}/{n} = {r['n_ok'] / max(n, 1):.1%}   by kind: {r['counts']}")
        print(f"   perturbations: {r['perturbations']}, changed the text: {r['valid']}, moved their attribute's "
              f"scorer the intended way: {r['moved']}/{r['scored']} (attributes with a scorer)")
        fl = r["fluency"]
        if fl:
            print(f"   fluency of the valid ones: {fl['n_checked'] - fl['n_dropped']}/{fl['n_checked']} within "
                  f"{fl['max_perplexity_ratio']}x the original's perplexity, ratio quantiles "
                  f"{({k: round(v, 2) for k, v in fl['ratio_quantiles'].items()})}")
        for a, b, how in r["rewrites"][: args.show_failures]:
            print(f"   rewrite ({how}): {a[:60]!r} -> {b[:60]!r}")
        for f in r["failures"][: args.show_failures]:
            print(f"   failed {f.get('kind')}: {f.get('error')} | {str(f.get('excerpt'))[:80]!r} {f.get('word', '')!r}")


if __name__ == "__main__":
    main()
