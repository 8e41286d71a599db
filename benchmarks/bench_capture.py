"""Capture throughput against a bare Hugging Face forward and TransformerLens run_with_cache; peak RSS.

Three ways to run the same texts through the same model, timed side by side in one process, with
repetitions interleaved (A B C A B C ...) so that load from other jobs hits every side alike; the
medians are compared:

- ``capture``: :func:`irm.activations.capture.capture_activations` with every layer's ``hook_resid_post`` at
  ``positions="all"``, written to a store on disk (tokenising, hooks, row gathering, safetensors
  and sha256 included);
- ``capture_bridge``: the same through the TransformerBridge's hook points (``IRM_NATIVE_HOOKS=0``),
  where ``capture`` runs the HF modules with plain forward hooks;
- ``hf``: the limit, ``hf_model(input_ids, attention_mask, position_ids)`` with no hooks on the
  same left-padded, length-sorted batches, on a separate copy of the model that no bridge wraps,
  with torch's default ``Linear`` (the default BLAS on a CPU, cuBLAS on a GPU);
- ``hf_body``: the same without the unembedding (``hf_model.model(...)``), the tighter limit for a
  capture of every layer;
- ``hf_same`` / ``hf_body_same``: ``hf`` and ``hf_body`` with the capture's own matrix-product kernels.
  :func:`irm.models.load_model` makes every ``Linear`` of a float32 CPU model an
  :class:`irm.models.OneDNNLinear` (oneDNN instead of the default BLAS), so ``capture / hf`` mixes that
  kernel choice with the capture's own cost; ``capture / hf_same`` is the capture's cost alone. Run
  only where the kernels differ (float32 on a CPU with oneDNN); elsewhere they are ``hf`` itself;
- ``tl_cache``: ``bridge.run_with_cache(input_ids, attention_mask=...)`` with no ``names_filter``
  (every hook of every layer cached; what users often do), same batches.

Capture stops the forward as soon as every hook has fired, so with every layer hooked it still
skips the final norm and the unembedding; ``hf`` and ``tl_cache`` compute logits.

Peak RSS: capture alone in a fresh subprocess (after a one-batch warm-up) for 1x and 4x the texts
(the 1x texts repeated, so the shards are alike); a memory-bounded capture has the same peak for
both, although the store grows 4x. On a GPU (``--device cuda``) every side also reports its peak GPU
memory above what was allocated before it (the weights of both copies), and the timings wait for the
GPU (``torch.cuda.synchronize``) before the clock stops.

    python benchmarks/bench_capture.py                       # SmolLM2-135M, 64 texts of ~4 prompts
    python benchmarks/bench_capture.py --model tiny-llama --reps 9
    python benchmarks/bench_capture.py --join 1 --n-texts 256  # the main job's short prompts
    python benchmarks/bench_capture.py --profile             # + cProfile of one capture
    python benchmarks/bench_capture.py --device cuda --dtype bfloat16 --no-rss --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
os.environ.setdefault("IRM_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_VS_HF = 0.9


def make_texts(n: int, join: int) -> list[str]:
    """``n`` texts, each ``join`` consecutive default prompts (the capture tests' recipe)."""
    from irm.data import default_prompts

    base = default_prompts()
    return [" ".join(base[(i + k) % len(base)] for k in range(join)) for i in range(n)]


def _proc_status(field: str) -> float:
    """A /proc/self/status memory field in MB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS so the peak covers only the capture (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _batches(tokenizer, texts: list[str], batch_size: int, shard_size: int, max_length: int):
    """The batches capture runs: per shard, texts sorted by length, left-padded, with positions."""
    import torch

    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id
    out = []
    for lo in range(0, len(ids), shard_size):
        order = sorted(range(lo, min(lo + shard_size, len(ids))), key=lambda j: len(ids[j]))
        for b0 in range(0, len(order), batch_size):
            rows = [ids[j] for j in order[b0:b0 + batch_size]]
            width = max(map(len, rows))
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, t in enumerate(rows):
                x[r, width - len(t):] = torch.tensor(t)
                mask[r, width - len(t):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out.append((x, mask, pos))
    return out, sum(map(len, ids))


def _capture_kwargs(args) -> dict:
    return dict(layers="all", positions="all", batch_size=args.batch_size, shard_size=args.shard_size,
                max_length=args.max_length)


# ----------------------------------------------------------------------------------------------
def throughput(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from irm.activations.capture import capture_activations, records_from_texts
    from irm.models import OneDNNLinear, load_model, onednn_linear_available, torch_dtype, use_onednn_linear

    dev = torch.device(args.device)
    wdtype = torch_dtype(args.dtype)
    m = load_model(args.model, device=dev, dtype=wdtype)
    bare = AutoModelForCausalLM.from_pretrained(m.identity.checkpoint, dtype=wdtype).eval().to(dev)
    bridge = m.bridge
    # The capture's kernels: load_model gives a float32 CPU model oneDNN linears, which take their fast
    # path only for float32 on a CPU (OneDNNLinear.forward); anywhere else both copies run F.linear.
    n_onednn = sum(type(mod) is OneDNNLinear for mod in m.hf_model.modules())
    same_differs = (n_onednn > 0 and dev.type == "cpu" and wdtype == torch.float32 and onednn_linear_available())
    texts = make_texts(args.n_texts, args.join)
    records = records_from_texts(texts)
    batches, n_tokens = _batches(m.tokenizer, texts, args.batch_size, args.shard_size, args.max_length)
    work = Path(tempfile.mkdtemp(prefix="bench_capture_"))

    def run_capture(k: int) -> None:
        capture_activations({"base": m}, records, work / f"s{k}", **_capture_kwargs(args))

    def run_capture_bridge(k: int) -> None:
        os.environ["IRM_NATIVE_HOOKS"] = "0"
        try:
            capture_activations({"base": m}, records, work / f"b{k}", **_capture_kwargs(args))
        finally:
            os.environ.pop("IRM_NATIVE_HOOKS")

    @torch.no_grad()
    def run_bare(body: bool, same_kernels: bool) -> None:
        """The bare copy over the batches (inputs moved to the device inside, as the capture does);
        ``same_kernels``: with the capture's oneDNN linears for the duration of the pass."""
        fwd = bare.model if body else bare
        if same_kernels:
            use_onednn_linear(bare, True)
        try:
            for x, mask, pos in batches:
                fwd(input_ids=x.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev))
        finally:
            if same_kernels:
                use_onednn_linear(bare, False)

    @torch.no_grad()
    def run_tl(k: int) -> None:
        for x, mask, _ in batches:
            _, cache = bridge.run_with_cache(x.to(dev), attention_mask=mask.to(dev))
            del cache

    sides = {"capture": run_capture, "capture_bridge": run_capture_bridge,
             "hf": lambda k: run_bare(False, False), "hf_body": lambda k: run_bare(True, False)}
    if same_differs:
        sides["hf_same"] = lambda k: run_bare(False, True)
        sides["hf_body_same"] = lambda k: run_bare(True, True)
    if not args.no_tl:
        sides["tl_cache"] = run_tl
    cuda = dev.type == "cuda"
    times: dict[str, list[float]] = {s: [] for s in sides}
    gpu_peak: dict[str, float] = {s: 0.0 for s in sides}  # MB above what was allocated before the side
    profile = None
    try:
        for rep in range(args.reps + 1):  # rep 0 warms up (allocator, kernels, page cache)
            for side, fn in sides.items():
                if cuda:
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    before = torch.cuda.memory_allocated(dev)
                t0 = time.perf_counter()
                fn(rep)
                if cuda:
                    torch.cuda.synchronize(dev)  # the GPU's work, not only its launch
                dt = time.perf_counter() - t0
                if rep:
                    times[side].append(dt)
                    if cuda:
                        peak = (torch.cuda.max_memory_allocated(dev) - before) / 2**20
                        gpu_peak[side] = max(gpu_peak[side], peak)
                shutil.rmtree(work / f"s{rep}", ignore_errors=True)
                shutil.rmtree(work / f"b{rep}", ignore_errors=True)
        if args.profile:
            profile = _profile(lambda: run_capture(-1), args.profile_top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"n_tokens": n_tokens, "n_batches": len(batches), "n_layers": m.n_layers, "d_model": m.d_model,
           "times": times, "profile": profile, "same_kernels_differ": same_differs, "onednn_linears": n_onednn}
    if cuda:
        out["gpu_peak_mb"] = gpu_peak
        out["gpu_weights_mb"] = torch.cuda.memory_allocated(dev) / 2**20
        out["gpu_name"] = torch.cuda.get_device_name(dev)
    return out


def _profile(fn, top: int) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return f"cProfile of one capture (top {top} by own time):\n{buf.getvalue()}"


# ----------------------------------------------------------------------------------------------
def rss_side(args) -> None:
    """In a fresh process: load, reset the peak, capture ``--n-texts`` texts, report peak RSS."""
    import torch

    from irm.activations.capture import capture_activations, records_from_texts
    from irm.models import load_model

    torch.set_num_threads(args.threads)
    m = load_model(args.model, device=args.device, dtype=args.dtype)
    # 4x is the 1x texts 4 times over: identical shards, so a peak that grows is memory that
    # accumulates with the data, not a longer text landing in some shard.
    records = records_from_texts(make_texts(args.n_texts, args.join) * args.repeat)
    out = Path(args.out)
    # Warm up on one batch: the weights are mmapped and become resident only when a forward first
    # touches them, which is model memory, not capture memory.
    capture_activations({"base": m}, records[:args.batch_size], out.with_name("warmup"), **_capture_kwargs(args))
    shutil.rmtree(out.with_name("warmup"))
    reset_ok = _reset_peak_rss()
    rss_warm = _proc_status("VmRSS")
    t0 = time.perf_counter()
    capture_activations({"base": m}, records, out, **_capture_kwargs(args))
    dt = time.perf_counter() - t0
    store_mb = sum(p.stat().st_size for p in (out / "shards").glob("*.safetensors")) / 2**20
    print(json.dumps({"peak_rss_mb": _proc_status("VmHWM"), "rss_warm_mb": rss_warm, "store_mb": store_mb,
                      "seconds": dt, "peak_reset": reset_ok}))


def rss(args, factor: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_capture_rss_") as tmp:
        cmd = [sys.executable, __file__, "--side", "rss", "--out", str(Path(tmp) / "store"),
               "--model", args.model, "--n-texts", str(args.rss_texts), "--repeat", str(factor),
               "--join", str(args.join),
               "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
               "--max-length", str(args.max_length), "--threads", str(args.threads),
               "--device", args.device, "--dtype", args.dtype]
        p = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model spec, e.g. tiny-llama")
    parser.add_argument("--n-texts", type=int, default=64, help="texts per timed pass")
    parser.add_argument("--join", type=int, default=4, help="default prompts per text (1: the main job's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32,
                        help="texts per shard (the unit of memory: keep it below --rss-texts)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per side (after 1 warm-up)")
    parser.add_argument("--device", default="cpu", help="torch device of both copies, e.g. cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype of both copies (and of what the hooks see)")
    parser.add_argument("--json", help="also write the medians, rates and ratios to this JSON file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: small models on a shared 2-core box run fastest)")
    parser.add_argument("--rss-texts", type=int, default=64, help="texts of the 1x peak-RSS run (4x: 4 times)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--no-tl", action="store_true", help="skip TransformerLens run_with_cache")
    parser.add_argument("--profile", action="store_true", help="also cProfile one capture")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--side", choices=["rss"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "rss":
        rss_side(args)
        return

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device.")
    torch.set_num_threads(args.threads)
    res = throughput(args)
    med = {s: statistics.median(t) for s, t in res["times"].items()}
    tps = {s: res["n_tokens"] / t for s, t in med.items()}
    if not res["same_kernels_differ"]:  # the capture's linears are the default ones here
        tps["hf_same"], tps["hf_body_same"] = tps["hf"], tps["hf_body"]
    print(f"model={args.model} layers={res['n_layers']} d_model={res['d_model']} texts={args.n_texts} "
          f"join={args.join} tokens={res['n_tokens']} batches={res['n_batches']} batch_size={args.batch_size} "
          f"threads={args.threads} reps={args.reps} cpus={os.cpu_count()} device={args.device} "
          f"dtype={args.dtype} torch={torch.__version__}" + (f" gpu={res['gpu_name']}" if "gpu_name" in res else ""))
    kernels = ("the capture model's Linear modules are oneDNN (irm.models.OneDNNLinear): hf_same/hf_body_same "
               "run the bare copy with them too" if res["same_kernels_differ"] else
               f"the capture runs torch's default Linear kernels here ({res['onednn_linears']} OneDNNLinear "
               "modules, which fall back to F.linear off a float32 CPU): same-kernel ratios = default ones")
    print(f"kernels: {kernels}")
    names = {"capture": "irm capture (all resid_post)", "capture_bridge": "irm capture, bridge hooks",
             "hf": "bare HF forward", "hf_body": "bare HF body (no unembedding)",
             "hf_same": "bare HF forward, capture kernels", "hf_body_same": "bare HF body, capture kernels",
             "tl_cache": "TL run_with_cache (no filter)"}
    gpu = res.get("gpu_peak_mb")
    print(f"{'':34s}{'median s':>10s}{'min s':>9s}{'max s':>9s}{'tokens/s':>11s}"
          + (f"{'GPU peak MB':>13s}" if gpu else ""))
    for s, t in res["times"].items():
        print(f"{names[s]:34s}{med[s]:10.3f}{min(t):9.3f}{max(t):9.3f}{tps[s]:11.0f}"
              + (f"{gpu[s]:13.0f}" if gpu else ""))
    if gpu:
        print(f"(GPU peak MB: the side's peak above the {res['gpu_weights_mb']:.0f} MB held before it)")
    ratios = {
        "capture/hf": tps["capture"] / tps["hf"],
        "capture/hf_same": tps["capture"] / tps["hf_same"],
        "capture/hf_body": tps["capture"] / tps["hf_body"],
        "capture/hf_body_same": tps["capture"] / tps["hf_body_same"],
        "native/bridge": tps["capture"] / tps["capture_bridge"],
    }
    if "tl_cache" in tps:
        ratios["capture/tl_cache"] = tps["capture"] / tps["tl_cache"]
    verdict = "OK" if ratios["capture/hf"] >= TARGET_VS_HF else "BELOW TARGET"
    print(f"capture / bare HF forward, default kernels: {ratios['capture/hf']:.2f}x  "
          f"(target >= {TARGET_VS_HF}x: {verdict})")
    print(f"capture / bare HF forward, capture kernels: {ratios['capture/hf_same']:.2f}x  "
          "(the same products: the capture's own cost, and what it skips)")
    print(f"capture / bare HF body, default kernels:    {ratios['capture/hf_body']:.2f}x")
    print(f"capture / bare HF body, capture kernels:    {ratios['capture/hf_body_same']:.2f}x  "
          "(the pure cost of hooks, gathering and writing the store)")
    print(f"native hooks / bridge hooks:                {ratios['native/bridge']:.2f}x  "
          "(capture with HF forward hooks vs the bridge's hook points)")
    if "capture/tl_cache" in ratios:
        print(f"capture / TL run_with_cache:                {ratios['capture/tl_cache']:.2f}x")
    summary = {"args": vars(args), "torch": torch.__version__, "tokens": res["n_tokens"],
               "same_kernels_differ": res["same_kernels_differ"], "median_s": med, "tokens_per_s": tps,
               "ratios": ratios, "gpu_peak_mb": gpu, "gpu_name": res.get("gpu_name")}

    if not args.no_rss:
        one, four = rss(args, 1), rss(args, 4)
        print(f"\npeak RSS, capture alone in a fresh process ({args.rss_texts} and {4 * args.rss_texts} texts):")
        print(f"{'':24s}{'store MB':>10s}{'warm RSS MB':>13s}{'peak MB':>10s}{'peak - warm MB':>16s}")
        for name, r in (("1x", one), ("4x", four)):
            print(f"{name:24s}{r['store_mb']:10.0f}{r['rss_warm_mb']:13.0f}{r['peak_rss_mb']:10.0f}"
                  f"{r['peak_rss_mb'] - r['rss_warm_mb']:16.0f}")
        growth = four["peak_rss_mb"] - one["peak_rss_mb"]
        more = four["store_mb"] - one["store_mb"]
        print(f"peak grew {growth:+.0f} MB for {more:.0f} MB more stored data "
              f"({100 * growth / more:+.1f}% of it; flat if ~0)")
        if not (one["peak_reset"] and four["peak_reset"]):
            print("note: could not reset peak RSS; peaks include model loading and the warm-up")
        summary["peak_rss"] = {"1x": one, "4x": four}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    if res["profile"]:
        print("\n" + res["profile"])


if __name__ == "__main__":
    main()
