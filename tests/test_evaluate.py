"""evaluate_pair and its parts on tiny Llamas saved locally (a ready-made pair, no tuning)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from irm.models import ModelPair, TinyRecipe, build_tiny_llama
from irm.models.generation import generate
from irm.pair.evaluate import (
    EVAL_JSON,
    EVAL_SAMPLES_JSONL,
    EVAL_SAMPLES_MD,
    bootstrap_effect_size,
    completion_kl,
    distinct_n,
    evaluate_pair,
    evaluation_metrics,
    repetition_report,
    seq_rep_n,
)
from irm.rewards import TokenUtilityRM

PROMPTS = ["This movie was", "I rented this film because", "The acting", "Bad", "A long and boring story about"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two tiny Llamas with the same tokenizer: a valid pair whose next-token distributions differ."""
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting on a shared CPU
    root = tmp_path_factory.mktemp("tiny")
    base, _ = build_tiny_llama(root / "base", TinyRecipe(seed=0, n_layers=2))
    tuned, tok = build_tiny_llama(root / "tuned", TinyRecipe(seed=1, n_layers=2))
    # The random init is nearly uniform over the vocabulary; a larger unembedding makes the two
    # models' distributions (and so their KL) clearly different.
    with torch.no_grad():
        tuned.lm_head.weight.mul_(40)
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


@pytest.fixture(scope="module")
def pair(dirs):
    return ModelPair.load(str(dirs[0]), str(dirs[1]))


@pytest.fixture(scope="module")
def same(dirs):
    return ModelPair.load(str(dirs[0]), str(dirs[0]))


@pytest.fixture(scope="module")
def rm():
    return TokenUtilityRM.from_vader()


# --------------------------------------------------------------------------- metrics
def test_seq_rep_and_distinct():
    assert seq_rep_n([5, 6, 5, 6, 5], n=2) == 0.5
    assert seq_rep_n([1, 2, 3], n=2) == 0.0
    assert seq_rep_n([1], n=2) is None
    assert seq_rep_n([4, 4, 4, 4], n=1) == 0.75
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 0.75  # (1,2) twice, (2,3), (2,4)
    assert distinct_n([[1], [2]], 2) is None


def test_repetition_flags_loops_and_collapse_but_not_noise():
    natural = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [1, 3, 5, 7, 9, 11]]
    looping = [[1, 2, 1, 2, 1, 2], [7, 7, 7, 7, 7, 7], [3, 4, 3, 4, 3, 4]]
    rep, dist = repetition_report(natural, looping)
    assert rep["flag_over_optimised"] and rep["base"] == 0 and rep["tuned"] > 0.5
    assert any("rep-2" in r for r in rep["reasons"])
    # Every sample the same fluent phrase: no loop inside a sample, but diversity collapsed.
    collapsed = [[1, 2, 3, 4, 5, 6]] * 3
    rep, dist = repetition_report(natural, collapsed)
    assert rep["tuned"] == 0 and rep["flag_over_optimised"]
    assert dist["tuned"]["distinct_2"] < 0.5 * dist["base"]["distinct_2"]
    # One repeated bigram in 3 x 9 (rep-2 0.037) is within the slack over a zero base.
    natural10 = [list(range(i, i + 10)) for i in (0, 20, 40)]
    slight = [list(range(0, 10)), list(range(20, 30)), [1, 3, 1, 3, 9, 11, 13, 15, 17, 19]]
    rep, _ = repetition_report(natural10, slight)
    assert 0 < rep["tuned"] < 0.05 and not rep["flag_over_optimised"]
    assert rep["ratio"] is None and rep["ratio_ci"] is None  # no ratio over a base that never repeats


def test_repetition_ratio_has_a_bootstrap_ci():
    rng = np.random.default_rng(0)
    base = [list(rng.integers(0, 12, 20)) for _ in range(40)]  # small vocabulary: some repeats
    tuned = [list(rng.integers(0, 6, 20)) for _ in range(40)]  # smaller still: more repeats
    rep, _ = repetition_report(base, tuned)
    lo, hi = rep["ratio_ci"]
    assert rep["ratio"] > 1 and lo <= rep["ratio"] <= hi and lo > 1


def test_bootstrap_effect_size():
    base = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    tuned = [b + 1.0 for b in base]
    eff, ci = bootstrap_effect_size(base, tuned, n_boot=500, seed=0)
    assert eff == pytest.approx(1.0 / np.std(base, ddof=1))
    assert ci[0] <= eff <= ci[1]
    # A constant shift survives every paired resample whose base still varies.
    rng = np.random.default_rng(1)
    b = rng.normal(size=200)
    eff, (lo, hi) = bootstrap_effect_size(b, b + 0.5 * b.std(ddof=1), n_boot=500, seed=0)
    assert eff == pytest.approx(0.5) and lo < 0.5 < hi and hi - lo < 0.2
    assert bootstrap_effect_size([1.0, 1.0], [2.0, 3.0]) == (None, None)
    with pytest.raises(ValueError, match="paired"):
        bootstrap_effect_size([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- generation
def test_batched_generation_matches_one_at_a_time(pair):
    """Left padding with attention masks must not change what a prompt generates (greedy)."""
    m = pair.base
    batched = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=6, temperature=0, batch_size=5)
    for i, p in enumerate(PROMPTS):
        single = generate(m.hf_model, m.tokenizer, [p], max_new_tokens=6, temperature=0)
        assert single.completion_ids[0] == batched.completion_ids[i]
        assert single.prompt_ids[0] == batched.prompt_ids[i]
    assert batched.prompts == PROMPTS and all(len(c) == 6 for c in batched.completion_ids)


def test_sampling_is_seeded_and_leaves_global_rng_alone(pair):
    m = pair.base
    state = torch.random.get_rng_state()
    a = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=5, n_samples_per_prompt=2, seed=7, batch_size=4)
    assert torch.equal(state, torch.random.get_rng_state())
    b = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=5, n_samples_per_prompt=2, seed=7, batch_size=4)
    c = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=5, n_samples_per_prompt=2, seed=8, batch_size=4)
    assert a.completion_ids == b.completion_ids and a.completion_ids != c.completion_ids
    assert a.prompts == [p for p in PROMPTS for _ in range(2)]
    assert a.completion_ids[0] != a.completion_ids[1]  # two samples of one prompt differ


def test_sampling_does_not_depend_on_the_batch_size(pair):
    """Each completion has its own random stream: batch size and batch neighbours change nothing."""
    m = pair.base
    kw = dict(max_new_tokens=6, n_samples_per_prompt=2, seed=3)
    ref = generate(m.hf_model, m.tokenizer, PROMPTS, batch_size=1, **kw)
    for bs in (3, 16):
        assert generate(m.hf_model, m.tokenizer, PROMPTS, batch_size=bs, **kw).completion_ids == ref.completion_ids
    # A prompt gets what it got among the others, wherever it stands in the list.
    moved = generate(m.hf_model, m.tokenizer, [PROMPTS[3], PROMPTS[0]], batch_size=4, **kw)
    assert moved.completion_ids == ref.completion_ids[6:8] + ref.completion_ids[0:2]
    # A repeated prompt is sampled afresh: its second copy continues that prompt's sample count.
    twice = generate(m.hf_model, m.tokenizer, [PROMPTS[0]] * 2, max_new_tokens=6, seed=3)
    once = generate(m.hf_model, m.tokenizer, [PROMPTS[0]], max_new_tokens=6, n_samples_per_prompt=2, seed=3)
    assert twice.completion_ids == once.completion_ids == ref.completion_ids[0:2]
    # Top-k 1 is greedy whatever the noise.
    greedy = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=6, temperature=0, batch_size=5)
    topk1 = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=6, top_k=1, seed=5, batch_size=2)
    assert topk1.completion_ids == greedy.completion_ids
    with pytest.raises(ValueError, match="top_p"):
        generate(m.hf_model, m.tokenizer, PROMPTS, top_p=0.0)


def _count_forwards(hf_model):
    calls = []
    handle = hf_model.model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_memo_reuses_and_continues_completions(pair):
    """A memo's completion is cut to a shorter max_new_tokens without a forward pass, and an unfinished
    one is continued from where it stopped (its stream skips the draws made): the same tokens as
    sampling from the start, with fewer forward passes."""
    from irm.models.generation import GenerationMemo

    m = pair.base
    kw = dict(n_samples_per_prompt=2, seed=3, batch_size=4)
    ref = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=9, **kw)  # no memo
    memo = GenerationMemo()
    calls, handle = _count_forwards(m.hf_model)
    try:
        short = generate(m.hf_model, m.tokenizer, PROMPTS[:3], max_new_tokens=5, memo=memo, **kw)
        assert short.completion_ids == [c[:5] for c in ref.completion_ids[:6]] and len(memo) == 6
        calls.clear()
        longer = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=9, memo=memo, **kw)
        assert longer.completion_ids == ref.completion_ids and longer.prompt_ids == ref.prompt_ids
        assert longer.completions == ref.completions and longer.prompts == ref.prompts
        # 4 new rows: one batch of 9 steps; 6 continued rows: two batches of 4 steps (from scratch: 3 x 9).
        assert len(calls) == 9 + 2 * 4
        calls.clear()
        cut = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=3, memo=memo, **kw)
        assert cut.completion_ids == [c[:3] for c in ref.completion_ids] and not calls
        # Another seed, another sampling setting: not reused.
        other = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=3, memo=memo, **{**kw, "seed": 4})
        assert calls and other.completion_ids != cut.completion_ids
        calls.clear()
        generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=3, memo=memo, top_k=5, **kw)
        assert calls
        # Changed weights (any in-place update) drop the model's entries.
        calls.clear()
        with torch.no_grad():
            next(m.hf_model.parameters()).add_(0.0)
        again = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=3, memo=memo, **kw)
        assert calls and again.completion_ids == cut.completion_ids
    finally:
        handle.remove()


def test_memo_keeps_finished_completions(pair):
    """A completion that ended on an end-of-sequence token is final: a longer call reuses it as it is."""
    from irm.models.generation import GenerationMemo

    m = pair.base
    kw = dict(n_samples_per_prompt=2, seed=3, batch_size=4)
    free = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=9, **kw)
    stop = free.completion_ids[0][2]  # a token sampled early: make it an end-of-sequence token
    old = m.hf_model.generation_config.eos_token_id
    m.hf_model.generation_config.eos_token_id = stop
    try:
        ref = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=9, **kw)
        ended = [i for i, c in enumerate(ref.completion_ids) if c and c[-1] == stop and len(c) <= 5]
        assert 0 in ended
        memo = GenerationMemo()
        generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=5, memo=memo, **kw)
        calls, handle = _count_forwards(m.hf_model)
        try:
            longer = generate(m.hf_model, m.tokenizer, PROMPTS, max_new_tokens=9, memo=memo, **kw)
        finally:
            handle.remove()
        assert longer.completion_ids == ref.completion_ids
        n_open = len(PROMPTS) * 2 - len(ended)  # only those run, 4 steps each
        assert len(calls) == -(-n_open // 4) * 4
    finally:
        m.hf_model.generation_config.eos_token_id = old


def test_row_sampler_draws_from_the_softmax():
    """Gumbel-max on a fixed distribution: the empirical frequencies match softmax(scores / T)."""
    from irm.models.generation import RowSampler

    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    for temperature in (1.0, 0.5):
        procs = RowSampler.processors([(0, 0)], "cpu", temperature=temperature)
        counts = torch.zeros(5)
        for _ in range(20000):
            counts[int(procs(torch.zeros(1, 1, dtype=torch.long), scores.clone()).argmax(-1))] += 1
        expected = torch.softmax(scores[0] / temperature, -1)
        assert counts[4] == 0
        np.testing.assert_allclose((counts / counts.sum()).numpy(), expected.numpy(), atol=0.015)
    # Top-p 0.7 keeps the two most likely tokens (0.64 + 0.24 crosses 0.7), renormalised.
    procs = RowSampler.processors([(1, 2)], "cpu", top_p=0.7)
    picks = {int(procs(torch.zeros(1, 1, dtype=torch.long), scores.clone()).argmax(-1)) for _ in range(300)}
    assert picks == {0, 1}


def test_generate_refuses_right_padding(pair):
    tok = pair.base.tokenizer
    tok.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="left-padding"):
            generate(pair.base.hf_model, tok, PROMPTS)
    finally:
        tok.padding_side = "left"


# --------------------------------------------------------------------------- KL
def test_completion_kl_matches_a_direct_computation(pair):
    t, b = pair.tuned, pair.base
    gens = generate(t.hf_model, t.tokenizer, PROMPTS, max_new_tokens=4, seed=0)
    kls = completion_kl(b.hf_model, t.hf_model, gens, pad_token_id=t.tokenizer.pad_token_id, batch_size=5)
    i = 3  # a short prompt: padded in the batch
    ids = torch.tensor([gens.prompt_ids[i] + gens.completion_ids[i]])
    with torch.no_grad():
        lt = t.hf_model(ids).logits[0].log_softmax(-1)
        lb = b.hf_model(ids).logits[0].log_softmax(-1)
    n_p = len(gens.prompt_ids[i])
    direct = [float((lt[j].exp() * (lt[j] - lb[j])).sum()) for j in range(n_p - 1, ids.shape[1] - 1)]
    np.testing.assert_allclose(kls[i], direct, rtol=1e-4, atol=1e-6)
    assert all(len(k) == len(c) for k, c in zip(kls, gens.completion_ids))
    assert min(float(k.min()) for k in kls) >= -1e-6 and float(kls[i].mean()) > 0.1


# --------------------------------------------------------------------------- evaluate_pair
def test_identical_pair_shows_no_change(same, rm, tmp_path):
    ev = evaluate_pair(same, rm, PROMPTS, n_samples_per_prompt=2, max_new_tokens=8, run_dir=tmp_path)
    r = ev["reward"]
    assert r["base"] == r["tuned"] and r["base"]["n"] == 10
    assert r["effect_size"] in (0.0, None) and r["win_rate"] == 0.5
    assert ev["kl_per_token"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert all(s["base"] == s["tuned"] for s in ev["samples"])
    assert not ev["repetition"]["flag_over_optimised"]
    assert (tmp_path / EVAL_JSON).is_file() and (tmp_path / EVAL_SAMPLES_MD).read_text().count("\n") == 12
    assert len((tmp_path / EVAL_SAMPLES_JSONL).read_text().splitlines()) == 10


def test_evaluate_pair_result(pair, rm, tmp_path):
    ev = evaluate_pair(pair, rm, PROMPTS, n_samples_per_prompt=3, max_new_tokens=8, seed=1, n_show=4,
                       run_dir=tmp_path)
    json.dumps(ev, allow_nan=False)  # goes into results.json as is
    assert json.loads((tmp_path / EVAL_JSON).read_text())["reward"] == ev["reward"]
    assert ev["reward"]["base"]["n"] == ev["reward"]["tuned"]["n"] == 15
    assert len(ev["samples"]) == 4
    s = ev["samples"][0]
    assert set(s) == {"prompt", "base", "tuned", "reward_base", "reward_tuned"}
    assert s["reward_tuned"] == pytest.approx(rm([s["prompt"]], [s["tuned"]])[0])
    assert ev["kl_per_token"]["mean"] > 0.1 and ev["kl_per_token"]["n_tokens"] > 0
    lo, hi = ev["kl_per_token"]["ci"]
    assert lo <= hi
    assert ev["settings"]["rm"] == "vader" and ev["pair"]["base"]["kind"] == "local"
    flat = evaluation_metrics(ev)
    assert all(k.startswith("eval/") and isinstance(v, float) for k, v in flat.items())
    assert flat["eval/kl_per_token"] == ev["kl_per_token"]["mean"]


def test_evaluate_pair_fills_a_memo_that_the_comparisons_continue(pair, rm, tmp_path):
    """The pipeline's order: the evaluation samples 6 tokens per prompt into the run's memo, the
    contrastive comparisons continue them to 9: the same comparisons as sampled from scratch."""
    from irm.contrastive.comparisons import comparisons_from_pair
    from irm.models.generation import GenerationMemo

    memo = GenerationMemo()
    ev = evaluate_pair(pair, rm, PROMPTS, max_new_tokens=6, seed=2, run_dir=tmp_path, memo=memo)
    json.dumps(ev, allow_nan=False)
    assert len(memo) == 2 * len(PROMPTS)  # both models' completions
    ref = comparisons_from_pair(pair, PROMPTS, rm, 5, max_new_tokens=9, seed=2)
    got = comparisons_from_pair(pair, PROMPTS, rm, 5, max_new_tokens=9, seed=2, memo=memo)
    assert [(c.prompt, c.chosen, c.rejected) for c in got] == [(c.prompt, c.chosen, c.rejected) for c in ref]
    assert ref and len(memo) == 2 * len(PROMPTS)


def test_evaluate_pair_needs_prompts(pair, rm):
    with pytest.raises(ValueError, match="no prompts"):
        evaluate_pair(pair, rm, [])
