"""Device paths: what must change off a CPU (no oneDNN, no side-by-side threads) and, on a CUDA machine,
that every model path gives the CPU's numbers.

The first tests run anywhere: they use the ``meta`` device, or objects that report a CUDA device, to
check the decisions made from a model's device without a GPU. The ``cuda`` tests run only where torch
sees a GPU (``benchmarks/gpu_check.sh`` runs them there); each compares a tiny pair on the GPU with
the same pair on the CPU.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Runs where torch sees a GPU; elsewhere tests/conftest.py deselects these (and says so in the header).
cuda = pytest.mark.cuda

TEXTS = [
    "The movie was",
    "I rented this film because my friend said it was a great story",
    "Honestly",
    "After the first twenty minutes I wanted to leave the theater",
    "A wonderful and moving performance",
]


class _FakeLoaded:
    """A LoadedModel-like that says it lives on ``device`` (nothing is allocated there)."""

    def __init__(self, device: str) -> None:
        self.hf_model = torch.nn.Linear(2, 2)
        self.device = torch.device(device)


def _mkldnn_spy(monkeypatch) -> list[int]:
    """Counts the calls of oneDNN's linear that irm.models.compute makes."""
    import irm.models.compute as M

    calls: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(M.torch.ops, "mkldnn", type("ops", (), {"_linear_pointwise": staticmethod(spy)})())
    return calls


# ----------------------------------------------------------------------------------------------
# Anywhere: the decisions made from the device
def test_onednn_linear_off_the_cpu_is_plain_f_linear(monkeypatch):
    """An OneDNNLinear whose weights are not on a CPU (here 'meta': a model moved after load_model)
    computes with F.linear: oneDNN's kernel is never called with a non-CPU tensor."""
    from irm.models import OneDNNLinear, onednn_linear_available, use_onednn_linear

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4, bias=False))
    if onednn_linear_available():
        assert use_onednn_linear(seq) == 2
    else:  # the class alone decides the path; install it by hand
        for mod in seq:
            mod.__class__ = OneDNNLinear
    calls = _mkldnn_spy(monkeypatch)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        want = seq(x)
        on_cpu = len(calls)
        seq.to("meta")
        assert all(type(mod) is OneDNNLinear for mod in seq)  # the class stays across .to()
        got = seq(x.to("meta"))
    assert got.device.type == "meta" and got.shape == want.shape
    assert len(calls) == on_cpu  # nothing more went to oneDNN after the move
    if onednn_linear_available():
        assert on_cpu == 2  # ...while on the CPU both products did


def test_load_model_installs_onednn_only_on_a_cpu():
    """load_model puts oneDNN linears in a CPU model only; on any other device the modules stay
    torch.nn.Linear (the 'meta' device stands in for a GPU here)."""
    from irm.models import OneDNNLinear, load_model, onednn_linear_available

    meta = load_model("tiny-llama", device="meta")
    assert meta.device.type == "meta"
    linears = [m for m in meta.hf_model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    cpu = load_model("tiny-llama", device="cpu")
    if onednn_linear_available():
        assert any(type(m) is OneDNNLinear for m in cpu.hf_model.modules())


@pytest.mark.parametrize("devices", [("cuda", "cuda"), ("cpu", "cuda"), ("cuda:0", "cuda:1"), ("meta", "meta")])
def test_models_off_the_cpu_run_one_after_the_other(devices, monkeypatch):
    """Side-by-side threads are a CPU measure: with any model on a GPU (or elsewhere) the calls run in
    the caller's thread, in order, and torch's CPU thread count is left alone."""
    import threading

    from irm.core.threads import ModelThreads, side_by_side_enabled

    monkeypatch.delenv("IRM_MODEL_THREADS", raising=False)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        models = [_FakeLoaded(d) for d in devices]
        assert not side_by_side_enabled(models)
        assert not side_by_side_enabled([models[-1], models[-1]], distinct=False)  # the local LLM's two batches
        with ModelThreads(models) as mt:
            assert not mt.active
            assert mt.map([threading.get_ident, threading.get_ident]) == [threading.get_ident()] * 2
        assert torch.get_num_threads() == 2
        # The same two models on a CPU do run side by side (the control).
        assert side_by_side_enabled([_FakeLoaded("cpu"), _FakeLoaded("cpu")])
    finally:
        torch.set_num_threads(old)


def test_each_rank_gets_its_own_gpu():
    from irm.activations.distributed import DistInfo
    from irm.run.distributed import _device_for_rank

    two = DistInfo(rank=1, world_size=2, local_rank=1, backend="nccl")
    one = DistInfo(rank=0, world_size=1, local_rank=0, backend=None)
    assert _device_for_rank("cuda", two) == "cuda:1" and _device_for_rank("cuda:0", two) == "cuda:1"
    assert _device_for_rank("cpu", two) == "cpu"
    assert _device_for_rank("cuda", one) == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_the_benchmarks_say_when_there_is_no_cuda():
    """bench_capture.py --device cuda and gpu_check.sh stop at once, with a message, where torch sees no GPU."""
    env = dict(os.environ, IRM_PROGRESS="0")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_capture.py"), "--device", "cuda"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0 and "sees no CUDA device" in p.stderr
    env["IRM_GPU_PYTHON"] = sys.executable
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=120, env=env, cwd=REPO)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA" in p.stdout + p.stderr


# ----------------------------------------------------------------------------------------------
# On a GPU: the same numbers as on the CPU
@pytest.fixture(scope="module")
def pairs():
    """The tiny pair on the CPU and on the GPU."""
    from irm.models import load_model

    return ({"base": load_model("tiny-llama"), "tuned": load_model("tiny-llama:seed=1")},
            {"base": load_model("tiny-llama", device="cuda"), "tuned": load_model("tiny-llama:seed=1", device="cuda")})


@cuda
def test_a_gpu_model_has_plain_linears_and_the_cpu_forward(pairs):
    from irm.models import OneDNNLinear

    cpu, gpu = pairs
    m = gpu["base"]
    assert m.device.type == "cuda" and all(p.device.type == "cuda" for p in m.hf_model.parameters())
    assert not any(type(x) is OneDNNLinear for x in m.hf_model.modules())
    enc = m.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = cpu["base"].hf_model(**enc).logits
        got = m.hf_model(**{k: v.cuda() for k, v in enc.items()}).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("native", [True, False], ids=["native-hooks", "bridge-hooks"])
def test_capture_on_the_gpu_equals_the_cpu(pairs, native, tmp_path, monkeypatch, caplog):
    """Every layer, every position, both models: the GPU store holds the CPU store's activations, with
    no fallback (native hooks agree with the bridge on the GPU too)."""
    from irm.activations.capture import capture_activations, records_from_texts

    if not native:
        monkeypatch.setenv("IRM_NATIVE_HOOKS", "0")
    cpu, gpu = pairs
    kw = dict(positions="all", batch_size=3, shard_size=4)
    with caplog.at_level(logging.WARNING):
        got = capture_activations(gpu, records_from_texts(TEXTS), tmp_path / "gpu", **kw)
    want = capture_activations(cpu, records_from_texts(TEXTS), tmp_path / "cpu", **kw)
    assert not [r for r in caplog.records if "capturing" in r.getMessage()], caplog.text
    assert got.hooks == want.hooks and len(got.hooks) == cpu["base"].n_layers
    for role in cpu:
        for h in want.hooks:
            torch.testing.assert_close(got.load(role, h), want.load(role, h), rtol=1e-4, atol=1e-4)
    for name, col in want.index().items():
        np.testing.assert_array_equal(got.index()[name], col)


@cuda
def test_shared_prefix_capture_with_logprobs_on_the_gpu(pairs, tmp_path, monkeypatch, caplog):
    """The IRM's capture: word templates with log-probabilities, prompts run once on a key/value cache.
    On the GPU the per-shard check passes (sharing stays on) and the numbers are the CPU's."""
    import irm.activations.capture as cap
    from irm.implicit.words import word_records

    monkeypatch.setattr(cap, "_MIN_PREFIX_SAVING", 1)
    cpu, gpu = pairs
    recs = word_records(["good", "bad", "movie", "great", "film", "story"])
    kw = dict(hooks=["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"], positions="target", batch_size=4,
              shard_size=13, logprobs=True, share_prefix=True)
    with caplog.at_level(logging.WARNING):
        got = cap.capture_activations(gpu, recs, tmp_path / "gpu", **kw)
    want = cap.capture_activations(cpu, recs, tmp_path / "cpu", **kw)
    assert not [r for r in caplog.records if "full forward passes" in r.getMessage()], caplog.text
    for role in cpu:
        np.testing.assert_allclose(got.logprobs(role), want.logprobs(role), rtol=1e-5, atol=1e-4)
        for h in want.hooks:
            torch.testing.assert_close(got.load(role, h), want.load(role, h), rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("how", ["bfloat16 weights", "bfloat16 compute"])
def test_half_precision_capture_on_the_gpu(how, pairs, tmp_path):
    """bfloat16 on the GPU (weights, or float32 weights under autocast): finite, near float32."""
    from irm.activations.capture import capture_activations, records_from_texts
    from irm.models import load_model, set_compute_dtype

    cpu, _ = pairs
    if how == "bfloat16 weights":
        m = load_model("tiny-llama", device="cuda", dtype="bfloat16")
    else:
        m = load_model("tiny-llama", device="cuda")
        set_compute_dtype(m, "bfloat16")
    got = capture_activations({"base": m}, records_from_texts(TEXTS), tmp_path / "h", positions="all")
    want = capture_activations({"base": cpu["base"]}, records_from_texts(TEXTS), tmp_path / "f", positions="all")
    for h in want.hooks:
        x, y = got.load("base", h), want.load("base", h)
        assert torch.isfinite(x).all()
        # bfloat16 keeps 8 bits of mantissa: a few hundredths of each row's largest value.
        bound = 5e-2 * y.abs().amax(-1, keepdim=True).clamp(min=1.0)
        assert ((x - y).abs() <= bound).all(), (h, (x - y).abs().max().item())


@cuda
def test_log_ratio_scoring_on_the_gpu_equals_the_cpu(pairs):
    """response_logprobs with its prefix tree: on the GPU the shared-cache check passes and the
    log-probabilities are the CPU's."""
    from irm.implicit import response_logprobs

    cpu, gpu = pairs
    base = " the acting was wonderful and the story moved me more than I expected from a film like this"
    responses = [base, base.replace("wonderful", "terrible"), base + " really", " no", base.replace("moved", "bored")]
    prompts = ["The movie was"] * len(responses)
    want = response_logprobs(cpu["tuned"], prompts, responses, batch_size=2)
    got = response_logprobs(gpu["tuned"], prompts, responses, batch_size=2)
    checked = gpu["tuned"].hf_model.__dict__.get("_irm_shared_prefix_ok", {})
    assert checked and all(checked.values()), checked  # sharing was checked on the GPU and kept
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and len(g)
        np.testing.assert_allclose(g, w, atol=1e-4)


@cuda
def test_generation_and_kl_on_the_gpu(pairs):
    """Sampling on the GPU draws from per-row CUDA generators: a prompt's completion does not depend on
    its batch, and repeats exactly; the KL of the evaluation is the CPU's on the same completions."""
    from irm.models.generation import generate
    from irm.pair.evaluate import completion_kl

    cpu, gpu = pairs
    b, t = gpu["base"], gpu["tuned"]
    prompts = TEXTS[:4]
    one = generate(t.hf_model, t.tokenizer, prompts, max_new_tokens=6, n_samples_per_prompt=2, batch_size=1, seed=3)
    many = generate(t.hf_model, t.tokenizer, prompts, max_new_tokens=6, n_samples_per_prompt=2, batch_size=8, seed=3)
    assert one.completion_ids == many.completion_ids and all(len(c) for c in one.completion_ids)
    greedy = generate(t.hf_model, t.tokenizer, prompts, max_new_tokens=6, temperature=0, batch_size=4)
    assert len(greedy.completion_ids) == len(prompts)
    pad = t.tokenizer.pad_token_id
    want = completion_kl(cpu["base"].hf_model, cpu["tuned"].hf_model, one, pad_token_id=pad, batch_size=3)
    got = completion_kl(b.hf_model, t.hf_model, one, pad_token_id=pad, batch_size=3)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@cuda
def test_gpu_models_are_not_run_side_by_side(pairs):
    from irm.core.threads import ModelThreads, side_by_side_enabled

    _, gpu = pairs
    assert not side_by_side_enabled(list(gpu.values()))
    with ModelThreads(list(gpu.values())) as mt:
        assert not mt.active
