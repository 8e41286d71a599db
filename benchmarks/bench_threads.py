"""Both models of a pair side by side (irm.core.threads) against one after the other, on a CPU.

Two copies of the model (the same shapes as a base/tuned pair) run the same work both ways in one
process, repetitions interleaved (A B A B ...) so that load from other jobs hits both alike; medians
are compared. Workloads:

- ``forward BxT``: three plain forward passes per model (``hf_model.model``), batch B of T tokens: the
  shapes of the main job (32 x 24: scoring whole texts; 32 x 17: texts on a shared prefix; 64 x 3:
  word tails in the IRM capture; 32 x 1: a generation step);
- ``log-ratio scoring``: :func:`irm.implicit.logratio.token_log_ratios` on perturbed movie-review
  texts (the contrastive stage's work), ``IRM_MODEL_THREADS`` 1 vs 0;
- ``generate``: both models sample 20 tokens for 32 prompts (the evaluation's work).

Printed per workload: seconds one after the other, side by side, the ratio (throughput gain) and the
largest difference of the results.

    python benchmarks/bench_threads.py                 # SmolLM2-135M, 2 threads
    python benchmarks/bench_threads.py --model tiny-llama --reps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
os.environ.setdefault("IRM_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _max_diff(a, b) -> float:
    import numpy as np
    import torch

    if isinstance(a, (list, tuple)):
        return max((_max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, str):
        return 0.0 if a == b else float("inf")
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)), initial=0.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()

    import torch

    from irm.core.threads import ModelThreads, side_by_side_enabled
    from irm.implicit.logratio import token_log_ratios
    from irm.models import ModelPair, load_model
    from irm.models.generation import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    base, tuned = load_model(args.model), load_model(args.model)
    pair = ModelPair(base, tuned)
    print(f"model={args.model} torch threads={torch.get_num_threads()} reps={args.reps} "
          f"side by side possible: {side_by_side_enabled([base, tuned])}")
    if not side_by_side_enabled([base, tuned]):
        print("nothing to compare: side by side needs a CPU with >= 2 torch threads")
        return 1

    from irm.data import default_prompts

    prompts = default_prompts()
    vocab = int(base.config.vocab_size)
    work: dict[str, tuple] = {}
    for b, t in ((32, 24), (32, 17), (64, 3), (32, 1)):
        ids = torch.randint(100, min(vocab, 40000), (b, t), generator=torch.Generator().manual_seed(b * 100 + t))

        def fwd(m, ids=ids):
            with torch.no_grad():
                for _ in range(2):
                    m.hf_model.model(input_ids=ids)
                return m.hf_model.model(input_ids=ids).last_hidden_state

        work[f"forward {b}x{t} (3 passes)"] = ("forward", fwd)
    resp = [" was a wonderful film with a terrible ending and great music", " bored me to tears, sadly",
            " is the best thing I have seen this year, honestly"]
    sc_p = [prompts[i % len(prompts)] for i in range(96)]
    sc_r = [resp[i % 3].replace("a ", "one " if i % 2 else "a ", 1) + f" ({i % 7})" for i in range(96)]
    work["log-ratio scoring (96 texts)"] = ("env", lambda: token_log_ratios(pair, sc_p, sc_r))
    work["generate (32 prompts x 20 tokens)"] = (
        "run", lambda m: generate(m.hf_model, m.tokenizer, prompts[:32], max_new_tokens=20, seed=0).completions)

    print(f"\n{'workload':36s} {'one after other':>16s} {'side by side':>13s} {'ratio':>7s} {'max diff':>9s}")
    for name, (kind, fn) in work.items():
        seq_t, par_t = [], []
        seq_out = par_out = None
        for _ in range(args.reps):
            if kind == "env":
                os.environ["IRM_MODEL_THREADS"] = "0"
                t, seq_out = _timed(fn)
                seq_t.append(t)
                os.environ["IRM_MODEL_THREADS"] = "1"
                t, par_out = _timed(fn)
                par_t.append(t)
            else:
                t, seq_out = _timed(lambda fn=fn: [fn(base), fn(tuned)])
                seq_t.append(t)
                with ModelThreads([base, tuned]) as mt:
                    t, par_out = _timed(lambda fn=fn, mt=mt: mt.map([lambda: fn(base), lambda: fn(tuned)]))
                par_t.append(t)
        s, p = statistics.median(seq_t), statistics.median(par_t)
        print(f"{name:36s} {s:14.2f} s {p:11.2f} s {s / p:6.2f}x {_max_diff(seq_out, par_out):9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
