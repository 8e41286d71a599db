"""float32 matrix products through oneDNN (irm.models.OneDNNLinear) against torch's default BLAS, on a CPU.

torch's x86 CPU wheels compute ``F.linear`` with MKL; :func:`irm.models.load_model` turns a CPU model's
``nn.Linear`` modules into :class:`irm.models.OneDNNLinear`, which sends float32 inference to oneDNN
(also part of every x86 torch build). Both sides run in one process, repetitions interleaved
(A B A B ...) so that load from other jobs hits both alike; medians are compared.

1. **Products** of SmolLM2-135M's shapes (rows x in x out): the MLP's 576 -> 1536 and 1536 -> 576, the
   attention's 576 -> 576 and 576 -> 192, the unembedding 576 -> 49,152; 4,096 rows (a batch of whole
   texts) and 32 (a generation step). Once on all torch threads, once as the pipeline runs a pair on a
   CPU: two products side by side, one thread each (``irm.core.threads``).
2. **The main job's work** on two copies of the model, side by side as in the pipeline, with every
   ``Linear`` switched between the two classes (:func:`irm.models.use_onednn_linear`): forward passes,
   log-ratio scoring of perturbed texts (the contrastive stage), generation (the evaluation and the
   features' LLM), and the activations of the IRM's template sentences (``capture_activations``).

Printed: seconds (or GFLOP/s) per side, the ratio, and the largest difference of the results.

    python benchmarks/bench_linear.py                 # SmolLM2-135M (~6 min)
    python benchmarks/bench_linear.py --reps 5 --skip-products
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
os.environ.setdefault("IRM_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = [(4096, 576, 1536), (4096, 1536, 576), (4096, 576, 576), (4096, 576, 192), (1024, 576, 49152),
          (32, 576, 1536), (32, 1536, 576), (32, 576, 49152)]


def _max_diff(a, b) -> float:
    import numpy as np
    import torch

    if isinstance(a, (list, tuple)):
        return max((_max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, dict):
        return max((_max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, str):
        return 0.0 if a == b else float("inf")
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)), initial=0.0))


def products(reps_flops: float) -> None:
    import torch

    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(2)
    print("\n1. products, float32 GFLOP/s (medians of interleaved repetitions; 'side by side': 2 products at "
          "once, 1 thread each)")
    print(f"{'rows x in x out':22s} {'BLAS':>7s} {'oneDNN':>7s} {'ratio':>6s} | {'side by side: BLAS':>19s} "
          f"{'oneDNN':>7s} {'ratio':>6s} | {'max rel diff':>12s}")
    for m, k, n in SHAPES:
        g = torch.Generator().manual_seed(m + k + n)
        xs = [torch.randn(m, k, generator=g) for _ in range(2)]
        ws = [torch.randn(n, k, generator=g) / k ** 0.5 for _ in range(2)]
        blas = [lambda x=x, w=w: torch.nn.functional.linear(x, w) for x, w in zip(xs, ws, strict=True)]
        dnn = [lambda x=x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
               for x, w in zip(xs, ws, strict=True)]
        flops = 2 * m * k * n
        reps = max(5, int(reps_flops / flops))

        def one(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        def side(fns, reps=reps):
            def worker(fn):
                torch.set_num_threads(1)
                for _ in range(reps):
                    fn()

            t0 = time.perf_counter()
            list(pool.map(worker, fns))
            return time.perf_counter() - t0

        for f in (*blas, *dnn):
            f()
        tb, td, sb, sd = [], [], [], []
        for _ in range(reps):
            tb.append(one(blas[0]))
            td.append(one(dnn[0]))
        for _ in range(3):
            sb.append(side(blas))
            sd.append(side(dnn))
        torch.set_num_threads(threads)
        want = blas[0]()
        rel = float((dnn[0]() - want).abs().max() / want.abs().max())
        a, b = flops / statistics.median(tb) / 1e9, flops / statistics.median(td) / 1e9
        c, d = 2 * reps * flops / statistics.median(sb) / 1e9, 2 * reps * flops / statistics.median(sd) / 1e9
        print(f"{f'{m} x {k} x {n}':22s} {a:7.0f} {b:7.0f} {b / a:5.2f}x | {c:19.0f} {d:7.0f} {d / c:5.2f}x | "
              f"{rel:12.1e}")


def workloads(model: str, reps: int) -> None:
    import tempfile

    import torch

    from irm.activations.capture import capture_activations
    from irm.core.threads import ModelThreads
    from irm.data import default_prompts
    from irm.implicit.logratio import token_log_ratios
    from irm.models import ModelPair, load_model, use_onednn_linear
    from irm.models.generation import generate

    base, tuned = load_model(model), load_model(model)
    pair = ModelPair(base, tuned)

    def switch(on: bool) -> None:
        for m in (base, tuned):
            use_onednn_linear(m.hf_model, on)

    switch(True)
    if not any(type(mod).__name__ == "OneDNNLinear" for mod in base.hf_model.modules()):
        print("\n2. skipped: oneDNN's linear is not available here (irm.models.onednn_linear_available)")
        return
    prompts = default_prompts()
    vocab = int(base.config.vocab_size)
    work: dict[str, object] = {}
    for b, t in ((32, 24), (32, 1)):
        ids = torch.randint(100, min(vocab, 40000), (b, t), generator=torch.Generator().manual_seed(b * 100 + t))

        def fwd(ids=ids):
            def one(m):
                with torch.no_grad():
                    return [m.hf_model(input_ids=ids).logits[:, -1] for _ in range(3)][-1]

            with ModelThreads([base, tuned]) as mt:
                return mt.map([lambda: one(base), lambda: one(tuned)])

        work[f"forward {b}x{t} with unembedding (3 passes/model)"] = fwd
    resp = [" was a wonderful film with a terrible ending and great music", " bored me to tears, sadly",
            " is the best thing I have seen this year, honestly"]
    sc_p = [prompts[i % len(prompts)] for i in range(128)]
    sc_r = [resp[i % 3].replace("a ", "one " if i % 2 else "a ", 1) + f" ({i % 7})" for i in range(128)]
    work["log-ratio scoring (128 texts)"] = lambda: token_log_ratios(pair, sc_p, sc_r)

    def gen():
        def one(m):
            return generate(m.hf_model, m.tokenizer, prompts[:32], max_new_tokens=20, seed=0).completions

        with ModelThreads([base, tuned]) as mt:
            return mt.map([lambda: one(base), lambda: one(tuned)])

    work["generate (32 prompts x 20 tokens)"] = gen
    from irm.implicit.words import NEUTRAL_WORDS, word_records

    records = word_records(list(NEUTRAL_WORDS)[:60])
    tmp = tempfile.TemporaryDirectory()
    counter = iter(range(10 ** 6))

    def cap():  # the IRM stage's capture: template sentences, every layer, log-probabilities, shared prefixes
        store = capture_activations({"base": base, "tuned": tuned}, records, Path(tmp.name) / f"s{next(counter)}",
                                    hooks=["blocks.{layer}.hook_resid_post"], positions="target", batch_size=64,
                                    shard_size=1024, max_length=32, logprobs=True, share_prefix=True)
        return [store.logprobs("base"), store.load("tuned", "blocks.20.hook_resid_post")]

    work[f"IRM capture ({len(records)} template sentences, all layers)"] = cap
    print(f"\n2. the main job's work, two copies of {model} side by side, medians of {reps} interleaved reps")
    print(f"{'workload':52s} {'BLAS':>9s} {'oneDNN':>9s} {'ratio':>7s} {'max diff':>9s}")
    for name, fn in work.items():
        tb, td = [], []
        out_b = out_d = None
        for _ in range(reps):
            switch(False)
            t0 = time.perf_counter()
            out_b = fn()
            tb.append(time.perf_counter() - t0)
            switch(True)
            t0 = time.perf_counter()
            out_d = fn()
            td.append(time.perf_counter() - t0)
        a, b = statistics.median(tb), statistics.median(td)
        try:
            diff = f"{_max_diff(out_b, out_d):9.1e}"
        except Exception as e:  # noqa: BLE001 - results of a shape this script does not compare
            diff = type(e).__name__
        print(f"{name:52s} {a:7.2f} s {b:7.2f} s {a / b:6.2f}x {diff}", flush=True)
    tmp.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each workload (part 2)")
    ap.add_argument("--skip-products", action="store_true")
    ap.add_argument("--skip-workloads", action="store_true")
    args = ap.parse_args()

    import torch

    from irm.models import onednn_linear_available

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN linear available: "
          f"{onednn_linear_available()}")
    if not onednn_linear_available():
        print("nothing to compare (not an x86 CPU build with oneDNN, or IRM_ONEDNN_LINEAR=0)")
        return 1
    if not args.skip_products:
        products(2e10)
    if not args.skip_workloads:
        workloads(args.model, args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
