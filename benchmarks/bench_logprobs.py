"""Log-probabilities of target tokens: ``log_softmax`` then gather against ``logit - logsumexp``, on a CPU.

Every log-probability the main job reads (the log-ratio IRM's scoring, the IRM's template words in
``capture_activations``) is ``log softmax(logits)[target]`` over SmolLM2's 49,152-token vocabulary.
:func:`irm.models.token_logprobs` computes it with ``torch.log_softmax`` (one fused kernel) and a
gather; the form it replaced was ``logits.gather(target) - torch.logsumexp(logits)``. Both sides run in
one process, repetitions interleaved (A B A B ...), medians compared.

1. **Kernel**: ``[rows, 49152]`` float32 logits on one thread, the unembedding that makes them shown
   for scale.
2. **The main job's work** with ``token_logprobs`` switched between the two forms, two copies of the
   model side by side as in the pipeline: log-ratio scoring of perturbed texts (the contrastive stage)
   and the IRM's template sentences through ``capture_activations`` with log-probabilities.

Printed: milliseconds or seconds per side, the ratio, and the largest difference of the results.

    python benchmarks/bench_logprobs.py               # SmolLM2-135M (~4 min)
    python benchmarks/bench_logprobs.py --reps 5 --skip-kernel
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
os.environ.setdefault("IRM_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear import _max_diff  # noqa: E402 - the same comparison of results

VOCAB, D = 49152, 576


def logsumexp_form(logits, targets):
    """The form ``token_logprobs`` replaced."""
    import torch

    return logits.gather(-1, targets.to(logits.device)[:, None])[:, 0] - torch.logsumexp(logits, -1)


def _median_pair(fa, fb, reps: int) -> tuple[float, float, object, object]:
    ta, tb, out_a, out_b = [], [], None, None
    fa(), fb()  # warm-up: allocations, oneDNN kernels
    for _ in range(reps):
        t0 = time.perf_counter()
        out_a = fa()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_b = fb()
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), out_a, out_b


def kernel(reps: int) -> None:
    import torch

    from irm.models import token_logprobs

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(VOCAB, D, generator=g) * 0.05
    print(f"1. kernel: [rows, {VOCAB}] float32 logits, 1 thread, medians of {reps} interleaved reps (ms)")
    print(f"{'rows':>6s} {'unembedding':>12s} {'logsumexp':>10s} {'log_softmax':>12s} {'ratio':>7s} {'max diff':>9s}")
    for n in (32, 256, 1024):
        h = torch.randn(n, D, generator=g)
        logits = torch.nn.functional.linear(h, w) * 4
        targets = torch.randint(0, VOCAB, (n,), generator=g)
        t_un, _, _, _ = _median_pair(lambda: torch.nn.functional.linear(h, w), lambda: None, reps)  # noqa: B023
        a, b, out_a, out_b = _median_pair(lambda: logsumexp_form(logits, targets),  # noqa: B023
                                          lambda: token_logprobs(logits, targets), reps)  # noqa: B023
        print(f"{n:6d} {t_un * 1e3:12.1f} {a * 1e3:10.1f} {b * 1e3:12.1f} {a / b:6.2f}x {_max_diff(out_a, out_b):9.1e}",
              flush=True)
    torch.set_num_threads(os.cpu_count() or 1)


def workloads(model: str, reps: int) -> None:
    import irm.activations.capture as capture_mod
    import irm.models as models_mod
    from irm.activations.capture import capture_activations
    from irm.data import default_prompts
    from irm.implicit.logratio import token_log_ratios
    from irm.implicit.words import NEUTRAL_WORDS, TEMPLATES, word_records
    from irm.models import ModelPair, load_model

    new = models_mod.token_logprobs

    def switch(fn) -> None:  # scoring imports it from irm.models at each call; the capture at import
        models_mod.token_logprobs = fn
        capture_mod.token_logprobs = fn

    base, tuned = load_model(model), load_model(model)
    pair = ModelPair(base, tuned)
    prompts = default_prompts()
    # Families of perturbed responses, as the contrastive stage makes them: a response and edits of it.
    resp = [" was a wonderful film with a terrible ending and great music", " bored me to tears, sadly",
            " is the best thing I have seen this year, honestly"]
    sc_p = [prompts[i % len(prompts)] for i in range(256)]
    sc_r = [resp[i % 3].replace("a ", "one " if i % 2 else "a ", 1) + f" ({i % 7})" for i in range(256)]
    records = word_records(list(NEUTRAL_WORDS) + ["good", "bad", "fine", "awful", "great", "dull", "superb",
                                                  "boring", "lovely", "weak", "brilliant", "terrible", "charming",
                                                  "mediocre", "stunning", "clumsy", "delightful", "tedious",
                                                  "moving", "forgettable"])
    tmp = tempfile.TemporaryDirectory()
    counter = iter(range(10**6))

    def cap():
        store = capture_activations({"base": base, "tuned": tuned}, records, Path(tmp.name) / f"s{next(counter)}",
                                    hooks=["blocks.20.hook_resid_post"], positions="target", batch_size=64,
                                    shard_size=1024, max_length=32, logprobs=True, share_prefix=True)
        return [store.logprobs("base"), store.logprobs("tuned")]

    work = {f"log-ratio scoring ({len(sc_p)} texts)": lambda: token_log_ratios(pair, sc_p, sc_r),
            f"IRM capture with log-probs ({len(records)} sentences, {len(TEMPLATES)} templates)": cap}
    print(f"\n2. the main job's work, two copies of {model} side by side, medians of {reps} interleaved reps")
    print(f"{'workload':58s} {'logsumexp':>10s} {'log_softmax':>12s} {'ratio':>7s} {'max diff':>9s}")
    for name, fn in work.items():
        def side(f, fn=fn):
            def run():
                switch(f)
                return fn()
            return run

        a, b, out_a, out_b = _median_pair(side(logsumexp_form), side(new), reps)
        print(f"{name:58s} {a:8.2f} s {b:10.2f} s {a / b:6.2f}x {_max_diff(out_a, out_b):9.1e}", flush=True)
    switch(new)
    tmp.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each side")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--skip-workloads", action="store_true")
    args = ap.parse_args()
    if not args.skip_kernel:
        kernel(max(5, args.reps * 3))
    if not args.skip_workloads:
        workloads(args.model, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
