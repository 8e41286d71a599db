"""Layer divergence on a pair of tiny Llamas saved locally, the tuned one edited in known layers."""

from __future__ import annotations

import json

import pytest
import torch

from irm.models import ModelPair, ModelPairMismatch, TinyRecipe, build_tiny_llama, load_model
from irm.pair.divergence import (
    DIVERGENCE_JSON,
    activation_divergence,
    block_modules,
    layer_divergence,
    parameter_divergence,
)

TEXTS = [
    "This movie was",
    "I rented this film because the cover looked great and the actors were good",
    "a",
    "The plot made no sense at all",
    "Bad acting , awful ending !",
]
NOISE = {2: 0.05, 3: 0.01}  # layer -> std of the noise added to its MLP down-projection


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """A base tiny Llama and a 'tuned' copy whose layers 2 and 3 (only) were changed."""
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting on a shared CPU
    root = tmp_path_factory.mktemp("pair")
    recipe = TinyRecipe(seed=3, n_layers=4)
    model, tok = build_tiny_llama(root / "base", recipe)
    gen = torch.Generator().manual_seed(0)
    noise = {}
    with torch.no_grad():
        for layer, std in NOISE.items():
            w = model.model.layers[layer].mlp.down_proj.weight
            noise[layer] = torch.randn(w.shape, generator=gen) * std
            w += noise[layer]
    model.save_pretrained(root / "tuned")
    tok.save_pretrained(root / "tuned")
    return root / "base", root / "tuned", noise


@pytest.fixture(scope="module")
def pair(pair_dirs):
    base, tuned, _ = pair_dirs
    return ModelPair.load(str(base), str(tuned))


def test_parameter_divergence_finds_the_edited_layers(pair, pair_dirs):
    noise = pair_dirs[2]
    rows = parameter_divergence(pair)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["param_abs"] == 0 and rows[1]["param_abs"] == 0
    for layer in NOISE:
        # Only one tensor changed, so the layer's sum of norms is that tensor's change.
        expected = float(torch.linalg.vector_norm(noise[layer].double()))
        assert rows[layer]["param_abs"] == pytest.approx(expected, rel=1e-4)
        assert rows[layer]["top_tensor"] == "mlp.down_proj.weight"
        assert rows[layer]["param_rel"] == pytest.approx(rows[layer]["param_abs"] / rows[layer]["param_base_norm"])
    assert rows[2]["param_abs"] > rows[3]["param_abs"] > 0
    n_block = sum(p.numel() for p in pair.base.hf_model.model.layers[0].parameters())
    assert rows[0]["n_params"] == n_block
    other = [r for r in parameter_divergence(pair, include_other=True) if r["layer"] is None]
    assert {r["name"] for r in other} >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(r["param_abs"] == 0 for r in other)


def test_activation_divergence_starts_at_the_first_edited_layer(pair):
    rows = activation_divergence(pair, TEXTS, batch_size=2, max_length=32)
    assert [r["hook"] for r in rows] == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    assert rows[0]["act_rel_l2"] == 0 and rows[1]["act_rel_l2"] == 0
    assert rows[1]["act_cosine"] == pytest.approx(0.0, abs=1e-12)
    assert rows[2]["act_rel_l2"] > 0 and rows[3]["act_rel_l2"] > 0 and rows[2]["act_cosine"] > 0
    n_tokens = sum(len(pair.base.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert all(r["n_tokens"] == n_tokens for r in rows)  # padding is not counted


def test_activation_divergence_does_not_depend_on_padding(pair):
    """Batched (padded) and one-at-a-time runs must agree: padding neither counts nor shifts positions."""
    batched = activation_divergence(pair, TEXTS, batch_size=5)
    single = activation_divergence(pair, TEXTS, batch_size=1)
    for a, b in zip(batched, single):
        assert a["act_rel_l2"] == pytest.approx(b["act_rel_l2"], rel=1e-4, abs=1e-9)
        assert a["act_cosine"] == pytest.approx(b["act_cosine"], rel=1e-3, abs=1e-9)


def test_activation_divergence_of_a_bridged_pair(pair_dirs, pair):
    """Once TransformerBridges wrap the models (the capture boots them), the divergence hooks the HF blocks
    inside :func:`irm.models.unwrapped` and gets the same numbers."""
    base, tuned, _ = pair_dirs
    bridged = ModelPair.load(str(base), str(tuned))  # fresh copies: a bridge changes its model
    assert bridged.base.bridge is not None and bridged.tuned.bridge is not None
    got = activation_divergence(bridged, TEXTS, batch_size=2)
    want = activation_divergence(pair, TEXTS, batch_size=2)
    for a, b in zip(got, want, strict=True):
        assert a["act_rel_l2"] == pytest.approx(b["act_rel_l2"], rel=1e-5, abs=1e-9)
        assert a["n_tokens"] == b["n_tokens"] > 0


def test_hooks_read_resid_post(pair):
    """The hooked block outputs are HF's hidden states (all but the last, which HF returns post-norm)."""
    from irm.pair.divergence import _resid_post_hooks

    m = pair.base.hf_model
    store = [None] * 4
    handles = _resid_post_hooks(m, store)
    try:
        enc = pair.base.tokenizer(["This movie was great"], return_tensors="pt")
        hs = m(**enc, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    for layer in range(3):
        torch.testing.assert_close(store[layer], hs[layer + 1])
    assert block_modules(m)[0] == "model.layers"


def test_layer_divergence_ranks_plots_and_saves(pair, tmp_path):
    div = layer_divergence(pair, TEXTS, top_k=2, run_dir=tmp_path)
    assert div["ranking"][:2] == [2, 3] and div["top_k"] == [2, 3]
    assert div["rank_by"] == "param_abs"
    assert set(div["rankings"]) == {"param_abs", "param_rel", "act_rel_l2", "act_cosine"}
    assert div["rankings"]["act_rel_l2"][:2] in ([2, 3], [3, 2])
    assert sorted(div["ranking"]) == [0, 1, 2, 3]
    png = tmp_path / "layer_divergence.png"
    assert div["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / DIVERGENCE_JSON).read_text())
    assert saved["top_k"] == [2, 3]
    json.dumps(div, allow_nan=False)  # results.json must accept it


def test_layer_divergence_without_texts_and_bad_arguments(pair):
    div = layer_divergence(pair, None, top_k=1)
    assert div["top_k"] == [2] and div["plot"] is None and "act_rel_l2" not in div["layers"][0]
    with pytest.raises(ValueError, match="rank_by"):
        layer_divergence(pair, TEXTS, rank_by="param_l2")
    with pytest.raises(ValueError, match="texts must be given"):
        layer_divergence(pair, None, rank_by="act_cosine")
    with pytest.raises(ValueError, match="top_k"):
        layer_divergence(pair, None, top_k=5)


def test_identical_pair_has_zero_divergence(pair_dirs):
    base, _, _ = pair_dirs
    same = ModelPair.load(str(base), str(base))
    div = layer_divergence(same, TEXTS[:2], top_k=4)
    for r in div["layers"]:
        assert r["param_abs"] == 0 and r["act_rel_l2"] == 0 and r["act_cosine"] == pytest.approx(0, abs=1e-12)
    assert div["ranking"] == [0, 1, 2, 3]  # ties keep layer order


def test_mismatched_parameters_are_refused(pair_dirs, tmp_path):
    base, _, _ = pair_dirs
    model, tok = build_tiny_llama(tmp_path / "other", TinyRecipe(seed=3, n_layers=4))
    pair = ModelPair(load_model(str(base)), load_model(str(tmp_path / "other")))
    del pair.tuned.hf_model.model.layers[0].mlp.down_proj.weight  # a parameter gone missing
    with pytest.raises(ModelPairMismatch, match="do not line up"):
        parameter_divergence(pair)
