from __future__ import annotations

import json
import time

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


@pytest.mark.slow
def test_embedded_smollm2_loads_and_caches_plain_checkpoint(smollm2):
    assert smollm2.identity.kind == "embedded"
    assert smollm2.n_layers == 30 and smollm2.d_model == 576
    ckpt = smollm2.identity.checkpoint
    cfg = json.loads(open(f"{ckpt}/config.json").read())
    assert "quantization_config" not in cfg  # saving and fine-tuning work
    t0 = time.perf_counter()
    again = load_model("smollm2-135m-instruct")
    assert time.perf_counter() - t0 < 15  # the cached checkpoint, not a second dequantisation
    assert again.identity.fingerprint == smollm2.identity.fingerprint
    enc = smollm2.tokenizer(["The movie was"], return_tensors="pt")
    nxt = smollm2.hf_model(**enc).logits[0, -1].softmax(-1)
    # A real LM: after "The movie was" the top tokens carry real probability mass.
    assert nxt.max() > 0.05
