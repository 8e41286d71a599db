from __future__ import annotations

import json

import pytest
import torch

from irm.models import (
    ModelPair,
    ModelPairMismatch,
    TinyRecipe,
    build_tiny_llama,
    load_model,
    make_bridge,
    resolve_checkpoint,
)


def test_tiny_spec_parsing():
    assert TinyRecipe.parse("tiny-llama") == TinyRecipe()
    r = TinyRecipe.parse("tiny-llama:seed=3,d_model=32")
    assert (r.seed, r.d_model, r.n_layers) == (3, 32, 4)
    with pytest.raises(ValueError, match="unknown key 'width'"):
        TinyRecipe.parse("tiny-llama:width=3")


def test_tiny_model_is_deterministic_and_word_level(tmp_path):
    # A fresh load: the shared fixture may already be wrapped in a bridge, which renames its modules.
    cached = load_model("tiny-llama")
    model, tok = build_tiny_llama(tmp_path / "again")
    a = dict(cached.hf_model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, a[name]), name
    ids = tok("The movie was wonderful")["input_ids"]
    assert len(ids) == 4  # one token per word
    assert tok.decode(ids) == "the movie was wonderful"
    assert tok.padding_side == "left"


def test_local_directory_roundtrip(tmp_path):
    # save_pretrained fails once a model is bridged, so save a fresh (unbridged) load.
    src = load_model("tiny-llama")
    src.hf_model.save_pretrained(tmp_path / "ckpt")
    src.tokenizer.save_pretrained(tmp_path / "ckpt")
    m = load_model(str(tmp_path / "ckpt"))
    assert m.identity.kind == "local"
    assert m.identity.fingerprint and len(m.identity.fingerprint) == 64
    # The identity without loading the weights is the same (caches are looked up with it).
    from irm.models import model_identity

    assert model_identity(str(tmp_path / "ckpt")) == m.identity
    assert model_identity("tiny-llama") == src.identity
    assert model_identity("tiny-llama", dtype="bfloat16") == load_model("tiny-llama", dtype="bfloat16").identity
    x = torch.tensor([[5, 6, 7]])
    assert torch.allclose(m.hf_model(x).logits, src.hf_model(x).logits)


def test_bad_specs_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="empty"):
        resolve_checkpoint("")
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        resolve_checkpoint(str(tmp_path / "missing.gguf"))


def test_unknown_hub_model_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Could not load 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")


def test_pair_checks_vocab_architecture_and_width(tiny_base, tiny_tuned):
    pair = ModelPair(tiny_base, tiny_tuned)
    assert pair.identities()["base"]["spec"] == "tiny-llama"
    wide = load_model("tiny-llama:d_model=32,n_heads=2,n_kv_heads=1")
    with pytest.raises(ModelPairMismatch, match="d_model: base has 64, tuned has 32"):
        ModelPair(tiny_base, wide)


def test_pair_rejects_mismatched_tokenizers(tiny_base, tmp_path):
    from irm.models import build_tiny_tokenizer, load_tokenizer

    other = load_model("tiny-llama:seed=2")
    vocab = list(tiny_base.tokenizer.get_vocab())
    vocab = sorted(vocab, key=lambda w: tiny_base.tokenizer.get_vocab()[w])
    vocab[10], vocab[11] = vocab[11], vocab[10]  # same size, two ids swapped
    build_tiny_tokenizer(vocab).save_pretrained(tmp_path / "tok")
    other.tokenizer = load_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(ModelPairMismatch, match="2 tokens map to different ids"):
        ModelPair(tiny_base, other)


def test_bridge_matches_hf_and_is_made_once(tiny_base):
    bridge = tiny_base.bridge
    assert tiny_base.bridge is bridge
    ids = tiny_base.tokenizer(["a great movie"], return_tensors="pt")
    logits = bridge(ids.input_ids, attention_mask=ids.attention_mask)
    ref = tiny_base.hf_model(**ids).logits
    assert torch.allclose(logits, ref, atol=1e-5)
    with pytest.raises(RuntimeError, match="already wrapped"):
        make_bridge(tiny_base.hf_model, tiny_base.tokenizer, "x")


def _tree(hf):
    return [(name, id(mod)) for name, mod in hf.named_modules()]


def test_unwrapped_runs_the_hf_modules_and_puts_the_bridge_back():
    """Inside ``unwrapped`` no bridge wrapper is in the module tree and the model computes as the plain HF
    model; on exit (also after an error) every wrapper is back in its place and the hooks fire again."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    from irm.models import unwrapped

    m, plain = load_model("tiny-llama"), load_model("tiny-llama")  # fresh copies: a bridge changes the model
    ids = m.tokenizer(["a great movie", "a dull and boring film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = plain.hf_model(**ids).logits
        with unwrapped(m.hf_model):  # no bridge yet: nothing to swap
            assert torch.equal(m.hf_model(**ids).logits, ref)
    bridge = m.bridge
    before = _tree(m.hf_model)
    n_params = len(list(m.hf_model.parameters()))
    assert any(isinstance(x, GeneralizedComponent) for x in m.hf_model.modules())
    with torch.no_grad(), unwrapped(m.hf_model) as hf:
        assert hf is m.hf_model
        assert not any(isinstance(x, GeneralizedComponent) for x in hf.modules())
        assert [type(x) for x in hf.modules()] == [type(x) for x in plain.hf_model.modules()]
        assert len(list(hf.parameters())) == n_params  # the same parameter objects, none copied
        with unwrapped(hf):  # re-entrant: the inner exit leaves it unwrapped
            pass
        assert not any(isinstance(x, GeneralizedComponent) for x in hf.modules())
        out = hf(**ids).logits
    mask = ids.attention_mask.bool()
    assert torch.equal(out[mask], ref[mask])
    assert _tree(m.hf_model) == before
    with pytest.raises(KeyError), unwrapped(m.hf_model):
        raise KeyError("boom")
    assert _tree(m.hf_model) == before
    _, cache = bridge.run_with_cache(ids.input_ids[:1], names_filter="blocks.1.hook_resid_post")
    assert "blocks.1.hook_resid_post" in cache  # the bridge works and its hooks fire again


def test_unwrapped_keeps_mixed_precision_and_float32_compute():
    from irm.models import float32_compute, set_compute_dtype, unwrapped

    m, plain = load_model("tiny-llama"), load_model("tiny-llama")
    assert m.bridge is not None  # booted: its wrappers are in the module tree
    ids = m.tokenizer(["a great movie"], return_tensors="pt")
    with torch.no_grad():
        ref = plain.hf_model(**ids).logits
        set_compute_dtype(m, "bfloat16")
        set_compute_dtype(plain, "bfloat16")
        want = plain.hf_model(**ids).logits
        with unwrapped(m.hf_model):
            got = m.hf_model(**ids).logits
            with float32_compute(m.hf_model):
                exact = m.hf_model(**ids).logits
    assert not torch.equal(want, ref) and torch.equal(got, want)
    assert torch.equal(exact, ref)


@pytest.mark.slow
def test_embedded_smollm2_loads_and_caches_plain_checkpoint(smollm2):
    assert smollm2.identity.kind == "embedded"
    assert smollm2.n_layers == 30 and smollm2.d_model == 576
    ckpt = smollm2.identity.checkpoint
    cfg = json.loads(open(f"{ckpt}/config.json").read())
    assert "quantization_config" not in cfg  # saving and fine-tuning work
    import irm.models.loading as loading

    def no_conversion(*a, **k):
        raise AssertionError("the GGUF was dequantised again instead of loading the cached checkpoint")

    real = loading._convert_gguf
    loading._convert_gguf = no_conversion
    try:
        again = load_model("smollm2-135m-instruct")  # the cached checkpoint, not a second dequantisation
    finally:
        loading._convert_gguf = real
    assert again.identity.fingerprint == smollm2.identity.fingerprint
    from irm.models import model_identity

    assert model_identity("smollm2-135m-instruct") == smollm2.identity
    enc = smollm2.tokenizer(["The movie was"], return_tensors="pt")
    nxt = smollm2.hf_model(**enc).logits[0, -1].softmax(-1)
    # A real LM: after "The movie was" the top tokens carry real probability mass.
    assert nxt.max() > 0.05


def test_compute_dtype_runs_the_blocks_in_mixed_precision_and_is_undone(tmp_path):
    """bfloat16 autocast inside the blocks only: fp32 weights, residual stream and unembedding; the
    setting is part of the identity (stores are not mixed) and can be switched off again exactly."""
    from irm.activations.capture import capture_activations, records_from_texts
    from irm.models import compute_dtype, set_compute_dtype

    m = load_model("tiny-llama")  # a fresh copy: the setting changes the model object
    records = records_from_texts(["a great movie", "a dull and boring film", "the plot was fine"])
    store_kw = dict(hooks=["blocks.{layer}.hook_resid_post"], layers=[0, 1], positions="all", batch_size=2)
    fp32 = capture_activations({"base": m}, records, tmp_path / "fp32", **store_kw)  # makes the bridge
    ids = m.tokenizer(["a great movie", "a dull and boring film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = m.hf_model(**ids).logits
    out_dtypes = []
    m.hf_model.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, i, o: out_dtypes.append(o.dtype))

    set_compute_dtype(m, "bfloat16")
    with torch.no_grad():
        mixed = m.hf_model(**ids).logits
    assert out_dtypes[-1] == torch.bfloat16  # a block's matrix product ran in bfloat16
    assert mixed.dtype == torch.float32 and m.hf_model.dtype == torch.float32
    err = float((mixed - ref).abs().max())
    assert 0 < err <= 0.05 * float(ref.abs().max())  # bfloat16 keeps 8 bits of mantissa
    assert compute_dtype(m.hf_model) == torch.bfloat16
    assert m.identity.compute_dtype == "bfloat16" and m.identity.to_dict()["compute_dtype"] == "bfloat16"
    # Through the bridge too; a float32 store is not resumed with mixed-precision activations.
    with pytest.raises(Exception, match="(?i)fingerprint|different|settings"):
        capture_activations({"base": m}, records, tmp_path / "fp32", **store_kw)
    bf16 = capture_activations({"base": m}, records, tmp_path / "bf16", **store_kw)
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        a, b = fp32.load("base", hook), bf16.load("base", hook)
        assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)
        assert float((a - b).abs().max()) <= 0.05 * float(a.abs().max())

    # Set at load time, before the bridge exists (the pipeline's order): the same activations.
    early = load_model("tiny-llama", compute_dtype="bfloat16")
    from irm.llm import LocalChatLLM

    assert LocalChatLLM(early).cache_id.endswith(":bfloat16")  # its replies are cached apart
    again = capture_activations({"base": early}, records, tmp_path / "bf16_early", **store_kw)
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        torch.testing.assert_close(again.load("base", hook), bf16.load("base", hook), atol=1e-5, rtol=0)

    set_compute_dtype(m, None)
    out_dtypes.clear()
    with torch.no_grad():
        assert torch.equal(m.hf_model(**ids).logits, ref)
    assert out_dtypes == [torch.float32] and compute_dtype(m.hf_model) == torch.float32
    assert "compute_dtype" not in m.identity.to_dict()


def test_compute_dtype_needs_float32_weights():
    from irm.run.config import ConfigError, ModelsConfig

    with pytest.raises(ValueError, match="float32 weights"):
        load_model("tiny-llama", dtype="bfloat16", compute_dtype="bfloat16")
    with pytest.raises(ConfigError, match="compute_dtype"):
        ModelsConfig(compute_dtype="int8")
    with pytest.raises(ConfigError, match="needs dtype = 'float32'"):
        ModelsConfig(dtype="bfloat16", compute_dtype="bfloat16")
    assert load_model("tiny-llama", compute_dtype="float32").identity.compute_dtype is None


def test_token_logprobs_equal_logit_minus_logsumexp():
    """``token_logprobs`` (log_softmax, then gather) is ``logits[t] - logsumexp(logits)`` to float rounding,
    for large logits too (no overflow), and a log-probability: exp of it over every target sums to 1."""
    from irm.models import token_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 300, generator=g) * 8
    logits[3] += 1e4  # shifted row: the stable form must not overflow
    targets = torch.randint(0, 300, (7,), generator=g)
    got = token_logprobs(logits, targets)
    ref = logits.double()
    want = (ref[torch.arange(7), targets] - torch.logsumexp(ref, -1)).float()  # float64 reference
    assert got.shape == (7,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    every = token_logprobs(logits.repeat_interleave(300, 0), torch.arange(300).repeat(7)).view(7, 300)
    torch.testing.assert_close(every.exp().sum(-1), torch.ones(7))
    assert token_logprobs(logits[:0], targets[:0]).shape == (0,)


# ----------------------------------------------------------------------------------------------
# float32 CPU inference through oneDNN
needs_onednn = pytest.mark.skipif(
    not __import__("irm.models", fromlist=["x"]).onednn_linear_available(),
    reason="oneDNN's linear is available only in x86-64 torch builds with MKLDNN")


@needs_onednn
def test_onednn_linear_equals_torch_linear_and_falls_back_where_it_must():
    """The oneDNN product equals ``F.linear`` to float rounding for every input layout; with autograd,
    under autocast, for other dtypes and for empty inputs the module is plain ``F.linear``."""
    from irm.models import OneDNNLinear, use_onednn_linear

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Linear(40, 24, bias=False))
    ref = [torch.nn.Linear(48, 40), torch.nn.Linear(40, 24, bias=False)]
    for r, m in zip(ref, seq, strict=True):
        r.load_state_dict(m.state_dict())
    keys = list(seq.state_dict())
    assert use_onednn_linear(seq) == 2 and all(type(m) is OneDNNLinear for m in seq)
    assert list(seq.state_dict()) == keys and all(isinstance(m, torch.nn.Linear) for m in seq)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:  # counts the fast path's calls
        def __call__(self, *a):
            calls.append(1)
            return real(*a)

    import irm.models.compute as M

    x3 = torch.randn(3, 7, 48)
    inputs = {"2d": x3[0], "3d": x3, "non-contiguous": x3.transpose(0, 1), "one row": x3[:1, :1]}
    with torch.no_grad():
        for name, x in inputs.items():
            want = ref[1](ref[0](x))
            mkl = torch.ops.mkldnn
            try:
                M.torch.ops.mkldnn = type("ops", (), {"_linear_pointwise": Spy()})()
                got = seq(x)
            finally:
                M.torch.ops.mkldnn = mkl
            assert got.shape == want.shape, name
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
        assert len(calls) == 2 * len(inputs)  # every product above took the oneDNN path
        empty = seq(torch.randn(0, 48))
        assert empty.shape == (0, 24)
        one = seq(x3[0, 0])  # a 1-d input: plain F.linear
        torch.testing.assert_close(one, ref[1](ref[0](x3[0, 0])))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision keeps autocast's dispatch
            assert seq(x3).dtype == torch.bfloat16
        assert seq(x3.double().float()).dtype == torch.float32
    x = x3.clone().requires_grad_(True)  # training: autograd through F.linear
    seq(x).sum().backward()
    x_ref = x3.clone().requires_grad_(True)
    ref[1](ref[0](x_ref)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(seq[0].weight.grad, (r0 := ref[0]).weight.grad)
    assert r0.weight.grad is not None
    assert use_onednn_linear(seq, enabled=False) == 2 and all(type(m) is torch.nn.Linear for m in seq)


@needs_onednn
def test_load_model_uses_onednn_on_cpu_and_the_switch_turns_it_off(monkeypatch):
    """A CPU model's Linear modules are OneDNNLinear after load_model; results agree with the default
    BLAS to float rounding; a bridge's hooks still fire; IRM_ONEDNN_LINEAR=0 keeps torch's Linear."""
    import copy
    import pickle

    from irm.models import OneDNNLinear, use_onednn_linear

    m = load_model("tiny-llama")
    lin = [x for x in m.hf_model.modules() if isinstance(x, torch.nn.Linear)]
    assert lin and all(type(x) is OneDNNLinear for x in lin)
    ids = m.tokenizer(["a great movie", "a dull and boring film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        fast = m.hf_model(**ids).logits
        use_onednn_linear(m.hf_model, enabled=False)
        plain = m.hf_model(**ids).logits
        use_onednn_linear(m.hf_model)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    clone = copy.deepcopy(m.hf_model)
    assert all(type(x) is OneDNNLinear for x in clone.modules() if isinstance(x, torch.nn.Linear))
    assert pickle.loads(pickle.dumps(clone)).config.vocab_size == clone.config.vocab_size
    _, cache = m.bridge.run_with_cache(ids.input_ids[:1], names_filter="blocks.1.mlp.hook_out")
    assert "blocks.1.mlp.hook_out" in cache
    monkeypatch.setenv("IRM_ONEDNN_LINEAR", "0")
    off = load_model("tiny-llama")
    assert all(type(x) is torch.nn.Linear for x in off.hf_model.modules() if isinstance(x, torch.nn.Linear))
