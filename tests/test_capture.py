"""Activation capture: padding-correct, memory-bounded, resumable, careful."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from irm.activations.capture import (
    StoreExistsError,
    capture_activations,
    expand_hooks,
    records_from_pairs,
    records_from_texts,
)
from irm.activations.store import ActivationStore, StoreError
from irm.data import default_prompts

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "The movie was",
    "I rented this film because my friend said it was a great story",
    "Honestly",
    "After the first twenty minutes I wanted to leave the theater",
    "A wonderful and moving performance",
]


def _hidden_states(m, text: str) -> torch.Tensor:
    """Reference: the HF model on one unpadded text; [n_layers, T, d] resid_post."""
    enc = m.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hs = m.hf_model(**enc, output_hidden_states=True).hidden_states
    return torch.stack(hs[1:])[:, 0]


def _padding_check(models, tmp_path, max_diff):
    batched = capture_activations(models, records_from_texts(TEXTS), tmp_path / "b", positions="all",
                                  batch_size=len(TEXTS), shard_size=64)
    single = capture_activations(models, records_from_texts(TEXTS), tmp_path / "s", positions="all",
                                 batch_size=1, shard_size=64)
    worst = 0.0
    for role in models:
        for hook in batched.hooks:
            worst = max(worst, (batched.load(role, hook) - single.load(role, hook)).abs().max().item())
    assert worst < max_diff, worst
    return batched


def test_batched_left_padded_capture_equals_one_at_a_time(tiny_base, tiny_tuned, tmp_path):
    store = _padding_check({"base": tiny_base, "tuned": tiny_tuned}, tmp_path, 1e-4)
    # ...and both equal the plain HF forward (the hooks read true resid_post, not something else).
    idx = store.index()
    x = store.load("tuned", "blocks.2.hook_resid_post")
    for t, text in enumerate(TEXTS):
        ref = _hidden_states(tiny_tuned, text)[2]
        got = x[idx["text"] == t]
        assert torch.allclose(got, ref, atol=1e-4)
        assert (idx["pos"][idx["text"] == t] == np.arange(len(ref))).all()
    assert store.manifest["complete"] and store.manifest["models"]["base"]["spec"] == "tiny-llama"


@pytest.mark.slow
def test_padding_correct_on_smollm2(smollm2, tmp_path):
    # SmolLM2's residual stream reaches |x| ~ 24,000 from layer 12 on, where one float32 ulp is 0.002,
    # so batch composition alone moves values by ~1e-2 there (measured: 0.0098 abs, 6e-5 relative).
    # The absolute 1e-4 bound holds where |x| allows it; beyond, it is 1e-4 of the row's largest |x|. A padding
    # bug (wrong positions or mask) shows as differences of order |x|, far above either.
    models = {"base": smollm2}
    b = capture_activations(models, records_from_texts(TEXTS), tmp_path / "b", positions="all", batch_size=len(TEXTS))
    s = capture_activations(models, records_from_texts(TEXTS), tmp_path / "s", positions="all", batch_size=1)
    for hook in b.hooks:
        x, y = b.load("base", hook), s.load("base", hook)
        # Rounding error scales with the row's largest components (they enter every sum), not with the element.
        bound = 1e-4 * torch.clamp(y.abs().amax(dim=-1, keepdim=True), min=1.0)
        assert ((x - y).abs() <= bound).all(), (hook, (x - y).abs().max().item())
    early = b.load("base", "blocks.0.hook_resid_post") - s.load("base", "blocks.0.hook_resid_post")
    assert early.abs().max() < 1e-4


def test_position_rules(tiny_base, tmp_path):
    m = {"base": tiny_base}
    hook = "blocks.1.hook_resid_post"
    last = capture_activations(m, records_from_texts(TEXTS), tmp_path / "last", hooks=[hook], positions="last")
    x = last.load("base", hook)
    assert x.shape == (len(TEXTS), 64)
    for t, text in enumerate(TEXTS):
        assert torch.allclose(x[t], _hidden_states(tiny_base, text)[1, -1], atol=1e-4)

    prompts, responses = ["The movie was", "I thought it"], [" truly wonderful", " was bad"]
    rm = capture_activations(m, records_from_pairs(prompts, responses), tmp_path / "rm", hooks=[hook],
                             positions="response_mean")
    y = rm.load("base", hook)
    for t, (p, r) in enumerate(zip(prompts, responses)):
        n_prompt = len(tiny_base.tokenizer(p)["input_ids"])
        ref = _hidden_states(tiny_base, p + r)[1, n_prompt:].mean(0)
        assert torch.allclose(y[t], ref, atol=1e-4)

    texts, words = ["a truly awful film", "what a great great movie"], ["awful", "great"]
    tg = capture_activations(m, records_from_texts(texts, words), tmp_path / "tg", hooks=[hook], positions="target")
    idx = tg.index()
    assert idx["pos"].tolist() == [2, 2]  # first whole-word occurrence
    assert torch.allclose(tg.load("base", hook)[1], _hidden_states(tiny_base, texts[1])[1, 2], atol=1e-4)
    with pytest.raises(ValueError, match="does not occur"):
        records_from_texts(["a film"], ["great"])
    with pytest.raises(ValueError, match="needs \\(prompt, response\\) records"):
        capture_activations(m, records_from_texts(TEXTS), tmp_path / "x", hooks=[hook], positions="response_mean")


def test_unknown_hook_fails_before_any_forward_pass(tiny_base, tmp_path, monkeypatch):
    import irm.activations.capture as cap

    def boom(*a, **k):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(cap, "_forward_hooks", boom)
    with pytest.raises(KeyError, match="did you mean 'blocks.1.hook_resid_post'"):
        capture_activations({"base": tiny_base}, records_from_texts(TEXTS), tmp_path / "s",
                            hooks=["blocks.1.hook_resid_pots"])
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="out of range"):
        expand_hooks(None, 4, [7])
    with pytest.raises(ValueError, match="empty dataset"):
        capture_activations({"base": tiny_base}, [], tmp_path / "e")


def test_refuses_to_overwrite(tiny_base, tmp_path):
    m = {"base": tiny_base}
    recs = records_from_texts(TEXTS)
    capture_activations(m, recs, tmp_path / "s", positions="last", layers=[0])
    # The same settings again: nothing to do, the store is returned as it is.
    before = (tmp_path / "s" / "shards" / "shard-00000.safetensors").stat().st_mtime_ns
    capture_activations(m, recs, tmp_path / "s", positions="last", layers=[0])
    assert (tmp_path / "s" / "shards" / "shard-00000.safetensors").stat().st_mtime_ns == before
    with pytest.raises(StoreExistsError, match="differs in: positions.*--overwrite"):
        capture_activations(m, recs, tmp_path / "s", positions="all", layers=[0])
    store = capture_activations(m, recs, tmp_path / "s", positions="all", layers=[0], overwrite=True)
    assert store.manifest["positions"]["rule"] == "all"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="not an activation store"):
        capture_activations(m, recs, tmp_path / "other")


def test_reader_streams_batches_and_checks_names(tiny_base, tiny_tuned, tmp_path):
    texts = default_prompts()[:40]
    store = capture_activations({"base": tiny_base, "tuned": tiny_tuned}, records_from_texts(texts), tmp_path / "s",
                                positions="all", shard_size=7, batch_size=4)
    full = store.load("base", "blocks.0.hook_resid_post")
    batches = list(store.iter_batches("base", "blocks.0.hook_resid_post", batch_size=50))
    assert [len(b) for b in batches[:-1]] == [50] * (len(batches) - 1)
    assert torch.equal(torch.cat(batches), full)
    shuffled = torch.cat(list(store.iter_batches("base", "blocks.0.hook_resid_post", 50, shuffle=True)))
    assert not torch.equal(shuffled, full) and torch.allclose(shuffled.sum(0), full.sum(0), atol=1e-3)
    assert store.verify() == []
    with pytest.raises(StoreError, match="closest"):
        store.load("base", "blocks.0.hook_resid_pst")
    with pytest.raises(StoreError, match="holds \\['base', 'tuned'\\]"):
        store.load("rlhf", "blocks.0.hook_resid_post")


# ----------------------------------------------------------------------------------------------
# Resume and memory: real child processes (a real SIGKILL; a real peak RSS).
_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import irm.activations.capture as cap
    from irm.models import load_model
    from irm.data import default_prompts
    args = json.loads(sys.argv[1])
    if args.get("slow_commit"):
        real = cap._commit_shard
        def slow(*a, **k):
            real(*a, **k)
            time.sleep(args["slow_commit"])
        cap._commit_shard = slow
    models = {r: load_model(s) for r, s in args["models"].items()}
    base = default_prompts()
    period = args.get("period") or args["n"]  # texts repeat with this period: same shard sizes at 1x and 4x
    texts = [" ".join(base[(i % period + k) % len(base)] for k in range(args["join"])) for i in range(args["n"])]
    cap.capture_activations(models, cap.records_from_texts(texts), args["out"], positions=args["positions"],
                            layers=args.get("layers", "all"), batch_size=args["batch"], shard_size=args["shard"],
                            max_length=args.get("max_length", 256))
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """
)


def _child(args: dict, **popen) -> subprocess.Popen:
    env = dict(os.environ, IRM_PROGRESS="0")
    return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _run_child(args: dict) -> dict:
    p = _child(args)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _resume_check(tmp_path, models: dict, n: int, shard: int, positions: str, layers="all"):
    common = dict(models=models, n=n, join=2, positions=positions, batch=4, shard=shard, layers=layers)
    _run_child(dict(common, out=str(tmp_path / "full")))

    p = _child(dict(common, out=str(tmp_path / "killed"), slow_commit=0.5))
    shard_dir = tmp_path / "killed" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shard_dir.glob("shard-*.json"))) < 2:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_shards = (n + shard - 1) // shard
    done_before = sorted(shard_dir.glob("shard-*.json"))
    assert 2 <= len(done_before) < n_shards, "the kill did not land mid-way"
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "killed")
    stamps = {f.name: f.stat().st_mtime_ns for f in shard_dir.glob("shard-*.safetensors") if
              (shard_dir / f.name.replace(".safetensors", ".json")).exists()}

    _run_child(dict(common, out=str(tmp_path / "killed")))
    # Only the missing shards were computed: the committed ones were not rewritten.
    for name, ns in stamps.items():
        assert (shard_dir / name).stat().st_mtime_ns == ns, name
    full, resumed = ActivationStore(tmp_path / "full"), ActivationStore(tmp_path / "killed")
    assert [s.sha256 for s in full.completed_shards()] == [s.sha256 for s in resumed.completed_shards()]
    for role in full.roles:
        for hook in full.hooks:
            assert torch.equal(full.load(role, hook), resumed.load(role, hook))
    drop = ("created",)
    assert {k: v for k, v in full.manifest.items() if k not in drop} == \
        {k: v for k, v in resumed.manifest.items() if k not in drop}


def test_killed_capture_resumes_to_an_identical_store(tmp_path, tiny_base, tiny_tuned):
    _resume_check(tmp_path, {"base": "tiny-llama", "tuned": "tiny-llama:seed=1"}, n=40, shard=4, positions="all")


@pytest.mark.slow
def test_killed_capture_resumes_on_smollm2(tmp_path, smollm2):
    _resume_check(tmp_path, {"base": "smollm2-135m-instruct"}, n=24, shard=4, positions="last")


def _memory_check(tmp_path, models, n1, recipe):
    # The 4x data repeat the 1x texts, so every shard has the same size distribution: any growth of the
    # peak is then memory that accumulates with the dataset, which is what must not happen.
    small = _run_child(dict(recipe, models=models, n=n1, period=n1, out=str(tmp_path / "x1")))
    big = _run_child(dict(recipe, models=models, n=4 * n1, period=n1, out=str(tmp_path / "x4")))
    store = ActivationStore(tmp_path / "x4")
    bytes_x4 = sum(store.path.joinpath("shards", f"shard-{s.index:05d}.safetensors").stat().st_size
                   for s in store.completed_shards())
    bytes_x1 = sum(p.stat().st_size for p in (tmp_path / "x1" / "shards").glob("*.safetensors"))
    growth_mb = (big["maxrss_kb"] - small["maxrss_kb"]) / 1024
    held_mb = (bytes_x4 - bytes_x1) / 2**20
    # Holding the whole store in memory would add held_mb; a bounded capture adds (almost) nothing.
    assert held_mb > 100, f"the test data are too small to show growth ({held_mb:.0f} MB)"
    assert growth_mb < 0.15 * held_mb, f"peak RSS grew by {growth_mb:.0f} MB for {held_mb:.0f} MB more data"
    return growth_mb, held_mb


def test_peak_memory_does_not_grow_with_dataset_size(tmp_path):
    _memory_check(tmp_path, {"base": "tiny-llama:d_model=256,n_heads=4,n_kv_heads=2,n_layers=8",
                             "tuned": "tiny-llama:d_model=256,n_heads=4,n_kv_heads=2,n_layers=8,seed=1"},
                  n1=150, recipe=dict(join=3, positions="all", batch=16, shard=32))


@pytest.mark.slow
def test_peak_memory_flat_on_smollm2(tmp_path, smollm2):
    _memory_check(tmp_path, {"base": "smollm2-135m-instruct"}, n1=64,
                  recipe=dict(join=2, positions="all", batch=16, shard=16, max_length=48))


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_logprobs_from_the_capture_pass_equal_a_separate_scoring_pass(which, tiny_base, tiny_tuned, request,
                                                                       tmp_path):
    """capture_activations(logprobs=True) scores each record's response in the capture's own forward pass:
    the numbers equal word_logprobs (a separate pass), and the activations equal a capture without it."""
    from irm.implicit.words import TEMPLATES, word_logprobs, word_records

    if which == "tiny":
        models = {"base": tiny_base, "tuned": tiny_tuned}
        words = ["good", "bad", "movie", "great"]
    else:
        sm = request.getfixturevalue("smollm2")
        models = {"base": sm}
        words = ["good", "abominable", "heartwarming", "ok"]  # multi-token words under BPE
    recs = word_records(words)
    hooks = ["blocks.1.hook_resid_post"]
    store = capture_activations(models, recs, tmp_path / "lp", hooks=hooks, positions="target",
                                batch_size=5, shard_size=7, logprobs=True)
    plain = capture_activations(models, recs, tmp_path / "plain", hooks=hooks, positions="target", batch_size=5,
                                shard_size=7)
    assert store.manifest["logprobs"] is True and "logprobs" not in plain.manifest
    for role, m in models.items():
        want = word_logprobs(m, words, batch_size=3).reshape(-1)
        got = store.logprobs(role)
        assert got.shape == (len(words) * len(TEMPLATES),) and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert (got < 0).all()
        torch.testing.assert_close(store.load(role, hooks[0]), plain.load(role, hooks[0]), rtol=1e-5, atol=1e-4)
    with pytest.raises(StoreError, match="logprobs=True"):
        plain.logprobs("base")
    with pytest.raises(ValueError, match="prompt_chars"):
        capture_activations(models, records_from_texts(TEXTS), tmp_path / "x", hooks=hooks, positions="last",
                            logprobs=True)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_shared_prefix_capture_equals_full_passes(which, tiny_base, tiny_tuned, request, tmp_path, monkeypatch):
    """share_prefix=True runs a shared prompt once and the rest of each record on its key/value cache:
    activations at every position (prompt ones included) and log-probabilities equal full passes."""
    import irm.activations.capture as cap
    from irm.implicit.words import word_records

    monkeypatch.setattr(cap, "_MIN_PREFIX_SAVING", 1)  # share even the tiny groups of this test
    if which == "tiny":
        models = {"base": tiny_base, "tuned": tiny_tuned}
        words = ["good", "bad", "movie", "great", "film", "story"]
    else:
        models = {"base": request.getfixturevalue("smollm2")}
        words = ["good", "abominable", "heartwarming", "ok", "dreadful", "fine"]
    prompts = ["I rented this film because", "I rented this film because", "Honestly", "Honestly",
               "A wonderful and moving"]
    responses = [" my friend said it was good", " it was cheap", " the acting was great and", " no",
                 " performance"]
    cases = [(word_records(words), "target", True), (records_from_pairs(prompts, responses), "all", True),
             (records_from_pairs(prompts, responses), "response_mean", False)]
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for k, (recs, rule, lp) in enumerate(cases):
        kw = dict(hooks=hooks, positions=rule, batch_size=4, shard_size=13, logprobs=lp)
        shared = capture_activations(models, recs, tmp_path / f"s{k}", share_prefix=True, **kw)
        full = capture_activations(models, recs, tmp_path / f"f{k}", **kw)
        assert shared.manifest["share_prefix"] is True and "share_prefix" not in full.manifest
        for role in models:
            for h in hooks:
                torch.testing.assert_close(shared.load(role, h), full.load(role, h), rtol=1e-4, atol=1e-4)
            if lp:
                np.testing.assert_allclose(shared.logprobs(role), full.logprobs(role), rtol=1e-5, atol=1e-4)
        for name, col in full.index().items():
            np.testing.assert_array_equal(shared.index()[name], col)


@pytest.mark.slow
def test_shared_prefix_capture_in_mixed_precision(smollm2, tmp_path, monkeypatch, caplog):
    """bfloat16 compute: the per-shard check runs in float32, so rounding does not switch sharing off, and
    the activations stay close to full passes in the same precision."""
    import irm.activations.capture as cap
    from irm.implicit.words import word_records
    from irm.models import set_compute_dtype

    monkeypatch.setattr(cap, "_MIN_PREFIX_SAVING", 1)
    recs = word_records(["good", "abominable", "heartwarming", "ok", "dreadful", "fine"])
    kw = dict(hooks=["blocks.5.hook_resid_post", "blocks.29.hook_resid_post"], positions="target", batch_size=4,
              shard_size=18, logprobs=True)
    set_compute_dtype(smollm2, "bfloat16")
    try:
        full = capture_activations({"base": smollm2}, recs, tmp_path / "full", **kw)
        with caplog.at_level("WARNING"):
            shared = capture_activations({"base": smollm2}, recs, tmp_path / "shared", share_prefix=True, **kw)
        assert "full forward passes" not in caplog.text
        assert shared.manifest["models"]["base"]["compute_dtype"] == "bfloat16"
        for h in kw["hooks"]:
            a, b = shared.load("base", h), full.load("base", h)
            assert float((a - b).abs().mean() / b.abs().mean()) < 0.03
        assert float(np.abs(shared.logprobs("base") - full.logprobs("base")).mean()) < 0.1
    finally:
        set_compute_dtype(smollm2, None)


@pytest.mark.parametrize("native", ["1", "0"])
def test_shared_prefix_falls_back_when_a_model_ignores_the_cache(native, tiny_base, tmp_path, monkeypatch, caplog):
    """A model whose forward drops past_key_values would give wrong activations through a cached prefix:
    the per-shard check notices, warns, and the capture uses full passes (equal to share_prefix=False),
    with native hooks and through the bridge."""
    import irm.activations.capture as cap
    from irm.implicit.words import word_records

    monkeypatch.setenv("IRM_NATIVE_HOOKS", native)
    monkeypatch.setattr(cap, "_MIN_PREFIX_SAVING", 1)
    recs = word_records(["good", "bad", "movie", "great"])
    kw = dict(hooks=["blocks.1.hook_resid_post"], positions="target", batch_size=4, shard_size=24)
    full = capture_activations({"base": tiny_base}, recs, tmp_path / "full", **kw)
    hf_cls = type(tiny_base.hf_model)  # the bridge calls it too
    real = hf_cls.forward

    def forgetful(self, *a, past_key_values=None, use_cache=None, **k):
        return real(self, *a, **k)

    monkeypatch.setattr(hf_cls, "forward", forgetful)
    with caplog.at_level("WARNING"):
        got = capture_activations({"base": tiny_base}, recs, tmp_path / "shared", share_prefix=True, **kw)
    assert "full forward passes" in caplog.text
    torch.testing.assert_close(got.load("base", kw["hooks"][0]), full.load("base", kw["hooks"][0]))


def _count_passes(monkeypatch):
    """Counts of forward passes with native hooks and through the bridge."""
    import irm.activations.capture as cap

    counts = {"native": 0, "bridge": 0}
    for name, key in (("_native_pass", "native"), ("_bridge_pass", "bridge")):
        real = getattr(cap, name)

        def spy(*a, _real=real, _key=key, **k):
            counts[_key] += 1
            return _real(*a, **k)

        monkeypatch.setattr(cap, name, spy)
    return counts


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_native_hooks_equal_bridge_hooks(which, tiny_base, tiny_tuned, request, tmp_path, monkeypatch):
    """Where every hook is an HF module's output, the capture runs the HF model with plain forward hooks:
    the store (left-padded batches, shared prefixes, log-probabilities) equals the bridge's, and the
    bridge runs only for the once-per-model check."""
    import irm.activations.capture as cap
    from irm.implicit.words import word_records

    monkeypatch.setattr(cap, "_MIN_PREFIX_SAVING", 1)
    if which == "tiny":
        models = {"base": tiny_base, "tuned": tiny_tuned}
        hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out",
                 "blocks.0.hook_attn_out", "ln_final.hook_out"]
    else:
        models = {"base": request.getfixturevalue("smollm2")}
        hooks = ["blocks.2.hook_resid_post", "blocks.29.hook_resid_post", "blocks.7.hook_mlp_out"]
    for m in models.values():
        m.hf_model.__dict__.pop("_irm_native_hooks", None)  # check afresh
    cases = [(records_from_texts(TEXTS), "all", False, False),
             (word_records(["good", "abominable", "movie", "ok"]), "target", True, True)]
    for k, (recs, rule, lp, share) in enumerate(cases):
        kw = dict(hooks=hooks, positions=rule, batch_size=3, shard_size=64, logprobs=lp, share_prefix=share)
        counts = _count_passes(monkeypatch)
        native = capture_activations(models, recs, tmp_path / f"n{k}", **kw)
        # The bridge runs once per model for the check (again only for a hook not checked before).
        assert counts["native"] > len(models) and counts["bridge"] <= len(models), counts
        assert k > 0 or counts["bridge"] == len(models)
        monkeypatch.setenv("IRM_NATIVE_HOOKS", "0")
        counts = _count_passes(monkeypatch)
        bridge = capture_activations(models, recs, tmp_path / f"b{k}", **kw)
        assert counts["native"] == 0 and counts["bridge"] > 0, counts
        monkeypatch.delenv("IRM_NATIVE_HOOKS")
        for role in models:
            for h in hooks:
                a, b = native.load(role, h), bridge.load(role, h)
                assert a.shape == b.shape
                assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()), (role, h)
            if lp:
                np.testing.assert_allclose(native.logprobs(role), bridge.logprobs(role), rtol=1e-5, atol=1e-4)


def test_hooks_without_an_hf_module_go_through_the_bridge(tiny_base, tmp_path, monkeypatch):
    """A hook inside a component (here hook_resid_mid) has no HF module of its own: the whole capture
    goes through the bridge, and its values are the bridge's."""
    counts = _count_passes(monkeypatch)
    hooks = ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    store = capture_activations({"base": tiny_base}, records_from_texts(TEXTS), tmp_path / "s", hooks=hooks,
                                positions="last", batch_size=2)
    assert counts == {"native": 0, "bridge": 3}
    assert store.load("base", hooks[0]).shape == (len(TEXTS), tiny_base.bridge.cfg.d_model)


def test_native_hooks_fall_back_when_they_differ_from_the_bridge(tiny_base, tmp_path, monkeypatch, caplog):
    """If an HF module's output is not what the bridge's hook sees (here: block 1's hook mapped to block
    0), the once-per-model check warns and the capture goes through the bridge, with the bridge's values;
    a native pass that fails does the same."""
    import irm.activations.capture as cap

    hooks = ["blocks.1.hook_resid_post"]
    kw = dict(hooks=hooks, positions="all", batch_size=2)
    monkeypatch.setenv("IRM_NATIVE_HOOKS", "0")
    want = capture_activations({"base": tiny_base}, records_from_texts(TEXTS), tmp_path / "want", **kw)
    monkeypatch.delenv("IRM_NATIVE_HOOKS")

    real = cap._native_modules
    monkeypatch.setattr(cap, "_native_modules",
                        lambda bridge, hs: {h: real(bridge, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
                                            for h in hs})
    counts = _count_passes(monkeypatch)
    with caplog.at_level("WARNING"):
        got = capture_activations({"base": tiny_base}, records_from_texts(TEXTS), tmp_path / "wrong", **kw)
    assert "differs from the bridge's hook" in caplog.text
    assert counts["native"] == 1 and counts["bridge"] == 1 + 3, counts  # the check, then the bridge
    torch.testing.assert_close(got.load("base", hooks[0]), want.load("base", hooks[0]))
    # The verdict is kept on the model: a second capture goes straight through the bridge.
    counts = _count_passes(monkeypatch)
    capture_activations({"base": tiny_base}, records_from_texts(TEXTS), tmp_path / "again", **kw)
    assert counts == {"native": 0, "bridge": 3}
    monkeypatch.setattr(cap, "_native_modules", real)

    def broken(*a, **k):
        raise RuntimeError("simulated failure of the HF forward")

    tiny_base.hf_model.__dict__.pop("_irm_native_hooks", None)
    monkeypatch.setattr(cap, "_native_pass", broken)
    caplog.clear()
    with caplog.at_level("WARNING"):
        got = capture_activations({"base": tiny_base}, records_from_texts(TEXTS), tmp_path / "broken", **kw)
    assert "simulated failure" in caplog.text and "through the TransformerBridge" in caplog.text
    torch.testing.assert_close(got.load("base", hooks[0]), want.load("base", hooks[0]))
    tiny_base.hf_model.__dict__.pop("_irm_native_hooks", None)  # later tests check afresh


@pytest.mark.parametrize("native", ["1", "0"])
def test_shared_prefix_capture_of_perturbations_runs_a_prefix_tree(native, tiny_base, tiny_tuned, tmp_path, monkeypatch,
                                                                  caplog):
    """Perturbations of one response share more than the prompt: each text runs on the cache of the text it
    shares most with (children, grandchildren, siblings with different shared lengths in one batch). The
    store equals full passes, no check fails, and the models run far fewer token positions. Through the
    TransformerBridge (which does not fill a cache it is given) the check fails and full passes run."""
    import irm.activations.capture as cap

    monkeypatch.setenv("IRM_NATIVE_HOOKS", native)
    prompt = "I rented this film because"
    base = " my friend said it was good and the story was moving"
    responses = [base, " my friend said it was bad and the story was moving",
                 " my friend said it was good and the story was dull", " my friend said it was good and the plot was moving",
                 " my friend told me it was good", " a friend said it was good and the story was moving",
                 " my friend said it was good and the story was dull and long", " it was cheap"]
    recs = records_from_pairs([prompt] * len(responses), responses)
    models = {"base": tiny_base, "tuned": tiny_tuned}
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    kw = dict(hooks=hooks, positions="words", batch_size=3, shard_size=64, logprobs=True)
    ran = {"tokens": 0}
    real = cap._forward_hooks

    def counting(m, ids, *a, **k):
        ran["tokens"] += int(ids.numel())
        return real(m, ids, *a, **k)

    full = capture_activations(models, recs, tmp_path / "full", **kw)
    monkeypatch.setattr(cap, "_forward_hooks", counting)
    with caplog.at_level("WARNING"):
        shared = capture_activations(models, recs, tmp_path / "shared", share_prefix=True, **kw)
    assert ("full forward passes" in caplog.text) is (native == "0")
    tok = cap._tokenize(tiny_base.tokenizer, recs, "words", 256)
    forest = cap._ShareForest(tok, range(len(recs)))
    assert max(forest.shared.values()) > len(tok.ids[0]) - 6  # deeper than the prompt
    assert any(forest.parent[forest.parent[j]] >= 0 for j in forest.members if forest.parent[j] >= 0)  # grandchild
    total = sum(len(x) for x in tok.ids)
    check = sum(len(tok.ids[j]) for j in forest.members) * 2  # the per-shard check runs a subtree both ways
    if native == "1":
        assert ran["tokens"] - 2 * check < 0.6 * 2 * total, (ran, total)
    for role in models:
        for h in hooks:
            torch.testing.assert_close(shared.load(role, h), full.load(role, h), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(shared.logprobs(role), full.logprobs(role), rtol=1e-5, atol=1e-4)
    for name, col in full.index().items():
        np.testing.assert_array_equal(shared.index()[name], col)
