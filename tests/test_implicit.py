"""The IRM on a tiny pair whose implicit reward is known.

The tuned model is the base with its unembedding shifted so that, after every template, the logit of
word w rises by exactly r(w), where r is planted along a direction of the embedding space
(r(w) = E[w] . v). Held-out words carry the reward through their embeddings, so a probe fitted on
the fit words must recover the planted ranking of the held-out words.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from irm.implicit import LogRatioRM, WordSplit, reconstruct, summarise, token_log_ratios
from irm.implicit.reconstruct import best, divergence_table, rescale
from irm.implicit.stage import collect_word_data, sequence_agreement
from irm.implicit.words import TEMPLATES, build_triples, word_logprobs
from irm.models import LoadedModel, ModelIdentity, ModelPair
from irm.rewards import TokenUtilityRM


def _final_states(model: LoadedModel, prefixes: list[str]) -> torch.Tensor:
    enc = model.tokenizer(prefixes, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.hf_model(**enc, output_hidden_states=True)
    return out.hidden_states[-1][:, -1]  # left-padded: the last position is each prefix's last token


@pytest.fixture(scope="module")
def planted(tiny_base):
    """(pair, planted table) with log p_tuned(w|t) - log p_base(w|t) = r(w) - log Z_t for every template t."""
    torch.manual_seed(0)
    emb = tiny_base.hf_model.model.embed_tokens.weight.detach()
    v = torch.randn(emb.shape[1])
    vocab = tiny_base.tokenizer.get_vocab()
    words = [w for w in TokenUtilityRM.from_vader().alphabetic_words() if w in vocab]
    r_tok = emb @ v
    r_tok = 4 * r_tok / r_tok[[vocab[w] for w in words]].abs().max()  # onto VADER's [-4, 4]
    H = _final_states(tiny_base, [t.replace("{w}", "").rstrip() for t in TEMPLATES]).double()
    u = torch.linalg.lstsq(H, torch.ones(len(TEMPLATES), 1, dtype=torch.float64)).solution[:, 0].float()
    tuned_hf = copy.deepcopy(tiny_base.hf_model)
    with torch.no_grad():
        tuned_hf.lm_head.weight += r_tok[:, None] * u[None, :]  # logit(w) += r(w) * (h . u) = r(w)
    tuned = LoadedModel(tuned_hf, tiny_base.tokenizer,
                        ModelIdentity(spec="planted", kind="test", checkpoint="planted"))
    table = {w: float(r_tok[vocab[w]]) for w in words}
    return ModelPair(tiny_base, tuned), table


def test_log_ratio_reward_matches_the_plant(planted):
    pair, table = planted
    words = list(table)[:30]
    lr = word_logprobs(pair.tuned, words) - word_logprobs(pair.base, words)
    # Per template the log-ratio is r(w) minus a constant (log Z): the ranking is exactly the plant.
    for t in range(len(TEMPLATES)):
        assert np.corrcoef(lr[:, t], [table[w] for w in words])[0, 1] > 0.999
    rm = LogRatioRM(pair, beta=0.5)
    a, b = words[0], words[1]
    pa, pb = rm.score(["The movie was"] * 2, [" " + a, " " + b])
    assert pa - pb == pytest.approx(0.5 * (table[a] - table[b]), abs=1e-3)
    per_token = token_log_ratios(pair, ["The movie was"], [" " + a + " " + b])[0]
    assert per_token.shape == (2,)


def test_irm_recovers_the_planted_ranking_of_held_out_words(planted, tmp_path):
    pair, table = planted
    split = WordSplit.from_words(list(table), test_fraction=0.2, max_words=600, seed=0)
    hooks = ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"]
    data = collect_word_data(pair, split, table, hooks, tmp_path / "store", batch_size=64)
    assert set(data.words[data.n_fit:]) == set(split.test_words)
    results = reconstruct(data, n_boot=200, feature_sets=("tuned", "diff"))
    by_name = {r.name: r for r in results}
    direct = by_name["logratio"].metrics["kendall_tau"]
    assert direct["value"] > 0.95  # the log-ratio reads the plant directly
    # A probe that never saw a held-out word recovers their planted ranking from activations.
    probe = by_name["probe:logratio/tuned/blocks.0.hook_resid_post"].metrics["kendall_tau"]
    assert probe["value"] > 0.7 and probe["low"] > 0.6, probe
    summary = summarise(results)
    assert summary["best_unsupervised"]["kendall_tau"]["value"] > 0.7
    # The control (the base's own preference) knows nothing of the plant.
    assert abs(by_name["control:logprob"].metrics["kendall_tau"]["value"]) < 0.3
    assert summary["best_above_control"]
    top = best(results, ["logratio"])
    div = divergence_table(data, top, k=5)
    assert len(div["overvalued"]) == 5 and div["overvalued"][0]["gap"] >= div["undervalued"][0]["gap"]


def test_identical_models_have_no_implicit_reward(tiny_base, tmp_path):
    pair = ModelPair(tiny_base, tiny_base)
    words = ["good", "bad", "movie"]
    lr = word_logprobs(pair.tuned, words) - word_logprobs(pair.base, words)
    assert np.abs(lr).max() < 1e-5


def test_rescale_keeps_zero_and_ranks():
    p = np.array([-2.0, 0.0, 1.0, 5.0])
    r = rescale(p, np.array([-4.0, 4.0, 1.0]))
    assert r[1] == 0 and np.all(np.diff(r) > 0)


def test_split_is_deterministic_and_disjoint():
    words = [f"w{i}" for i in range(500)]
    a = WordSplit.from_words(words, test_fraction=0.2, seed=3)
    b = WordSplit.from_words(list(reversed(words)), test_fraction=0.2, seed=3)
    assert a == b and not set(a.fit_words) & set(a.test_words)
    assert 60 < len(a.test_words) < 140
    assert WordSplit.from_words(words, test_fraction=0.2, seed=4).test_words != a.test_words


def test_triples_pair_words_with_opposites():
    triples = build_triples(["great", "awful", "good", "bad"], [3.1, -3.4, 1.9, -2.5], seed=0)
    assert len(triples) == 4 * len(TEMPLATES)
    t = triples[0]
    assert t.positive == "great" and t.negative == "awful" and t.neutral not in {"great", "awful"}
    pos, neg, neu = t.sentences()
    assert pos.endswith("great") and neg.endswith("awful")


def test_sequence_agreement_counts_pairwise_preferences():
    rm = TokenUtilityRM({"good": 2.0, "bad": -2.0})
    flipped = TokenUtilityRM({"good": -2.0, "bad": 2.0})
    samples = [{"prompt": "it was", "base": " bad", "tuned": " good"},
               {"prompt": "it was", "base": " good", "tuned": " good bad bad"}]
    res = sequence_agreement(rm, {"same": rm, "flipped": flipped}, samples)
    assert res["same"]["pairwise_agreement"] == 1.0 and res["flipped"]["pairwise_agreement"] == 0.0
    assert res["same"]["n_pairs"] == 2
    # An IRM that cannot tell the responses apart ties: not counted as disagreement, reported apart.
    blind = TokenUtilityRM({"zzz": 1.0})
    res = sequence_agreement(rm, {"blind": blind}, samples)["blind"]
    assert res["pairwise_agreement"] is None and res["n_pairs"] == 0 and res["n_irm_ties"] == 2
    assert res["pairwise_agreement_ties_half"] == 0.5


def test_sequence_agreement_tells_tracking_the_reward_from_telling_the_models_apart():
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "nice", "poor"]
    util = {"good": 2.0, "bad": -2.0, "nice": 1.0, "poor": -1.0}
    rm = TokenUtilityRM(util)

    def text(k):
        return " " + " ".join(rng.choice(words, size=k))

    # Tuned responses carry a marker and more "good": an RM prefers them, and so does anything that
    # spots the marker, without knowing anything about the reward.
    samples = [{"prompt": "it was", "base": text(3), "tuned": text(3) + " good good zz"} for _ in range(40)]
    marker = TokenUtilityRM({"zz": 1.0})
    res = sequence_agreement(rm, {"irm": rm}, samples, controls={"marker": marker}, n_boot=300, seed=0)
    assert res["marker"]["control"] and not res["irm"]["control"]
    bvt, within = res["summary"]["base_vs_tuned"]["irm"], res["summary"]["within_tuned"]["irm"]
    assert res["marker"]["pairwise_agreement_ci"]["value"] > 0.9  # the marker alone orders the model pairs
    assert res["marker"]["within_model"]["tuned"]["pairwise_accuracy"]["value"] == 0.5  # all tie: half
    assert within["value"] == 1.0 and within["control"] == "marker" and within["above_control"]
    assert within["difference"]["low"] > 0.3
    assert not bvt["above_control"]  # on the model pairs the marker is as good as the reward itself


def test_sequence_agreement_leaves_out_a_scorer_that_gives_nan_and_keeps_the_rest():
    rm = TokenUtilityRM({"good": 2.0, "bad": -2.0})

    class Broken:
        def score(self, prompts, responses):
            return np.full(len(prompts), np.nan)

    samples = [{"prompt": "it was", "base": " bad" * (i % 3 + 1), "tuned": " good" * (i % 4 + 1)} for i in range(12)]
    res = sequence_agreement(rm, {"irm": rm, "broken": Broken()}, samples, controls={"nan_control": Broken()},
                             n_boot=100)
    assert "not finite" in res["broken"]["skipped"] and "not finite" in res["nan_control"]["skipped"]
    assert res["irm"]["pairwise_agreement"] == 1.0
    row = res["summary"]["base_vs_tuned"]["irm"]
    assert row["control"] is None and "difference" not in row and "broken" not in res["summary"]["base_vs_tuned"]


def test_response_logprobs_equal_a_plain_full_forward(tiny_base):
    from irm.implicit import response_logprobs

    prompts, responses = ["The movie was", "I hated"], [" great fun", " every minute of it"]
    got = response_logprobs(tiny_base, prompts, responses, batch_size=2)
    for p, r, g in zip(prompts, responses, got):
        ids = tiny_base.tokenizer(p + r, return_tensors="pt").input_ids
        n_prompt = len(tiny_base.tokenizer(p).input_ids)
        with torch.no_grad():
            lp = torch.log_softmax(tiny_base.hf_model(ids).logits[0, :-1].double(), -1)
        ref = lp[torch.arange(n_prompt - 1, ids.shape[1] - 1), ids[0, n_prompt:]].numpy()
        assert g.shape == ref.shape and np.allclose(g, ref, atol=1e-4)


def _perturbed_texts():
    """Perturbations of two responses to two prompts, as the contrastive stage scores them."""
    base_a = " the acting was wonderful and the story moved me more than I expected from a film like this"
    base_b = " it was a long and boring movie with a plot that made no sense at all to anyone"
    variants_a = [base_a, base_a.replace("wonderful", "terrible"), base_a.replace("moved", "bored"),
                  base_a + ". Thanks for asking.", base_a.replace("a film", "the film"), " honestly," + base_a]
    variants_b = [base_b, base_b.replace("boring", "exciting"), base_b + " really", base_b.replace("long", "short")]
    prompts = ["The movie was"] * len(variants_a) + ["Last night I watched a film and"] * len(variants_b)
    return prompts, variants_a + variants_b


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_shared_prefix_scoring_equals_full_passes(which, tiny_base, request):
    """Texts that begin like an anchor run only their own tokens on its cache: same numbers as full passes,
    in any batch size."""
    from irm.implicit import response_logprobs
    from irm.implicit.logratio import _MIN_SHARED, _ShareTree

    m = tiny_base if which == "tiny" else request.getfixturevalue("smollm2")
    prompts, responses = _perturbed_texts()
    ids = [m.tokenizer(p + r).input_ids for p, r in zip(prompts, responses)]
    tree = _ShareTree(ids)
    assert tree.n_shared >= 5 and max(tree.depth) >= 2  # the test exercises sharing, over several levels
    rank = {i: k for k, i in enumerate(tree.order)}
    for i, p in enumerate(tree.parent):  # shared: the longest beginning in common with an earlier text
        best = max((len(os.path.commonprefix([ids[i], ids[j]])) for j in range(len(ids)) if rank[j] < rank[i]),
                   default=0)
        best = min(best, len(ids[i]) - 1)  # at least one token of its own to run
        assert tree.shared[i] == (best if best >= _MIN_SHARED else 0)
        if p >= 0:
            assert rank[p] < rank[i] and ids[i][: tree.shared[i]] == ids[p][: tree.shared[i]]
            assert tree.depth[i] == tree.depth[p] + 1 and i in tree.children[p]
    full = response_logprobs(m, prompts, responses, batch_size=3, share_prefix=False)
    for bs in (1, 3, 16):
        got = response_logprobs(m, prompts, responses, batch_size=bs)
        for g, f in zip(got, full, strict=True):
            assert g.shape == f.shape and len(g) > 0
            np.testing.assert_allclose(g, f, atol=1e-4)


def test_share_tree_runs_in_chunks_of_whole_subtrees(tiny_base, monkeypatch):
    """Scoring holds the caches of one chunk at a time: chunks are whole subtrees (a child never lands
    in another chunk than its parent), and chunked scoring gives the numbers of unchunked scoring."""
    import irm.implicit.logratio as lr
    from irm.implicit import response_logprobs

    prompts, responses = _perturbed_texts()
    prompts, responses = prompts * 2, [r + (" yes" if k else "") for k in range(2) for r in responses]
    ids = [tiny_base.tokenizer(p + r).input_ids for p, r in zip(prompts, responses)]
    tree = lr._ShareTree(ids)
    chunks = tree.chunks(4)
    assert len(chunks) > 1 and sorted(i for c in chunks for i in c) == list(range(len(ids)))
    where = {i: k for k, c in enumerate(chunks) for i in c}
    assert all(where[i] == where[p] for i, p in enumerate(tree.parent) if p >= 0)
    whole = response_logprobs(tiny_base, prompts, responses, batch_size=4)
    monkeypatch.setattr(lr, "_CHUNK_TEXTS", 4)
    chunked = response_logprobs(tiny_base, prompts, responses, batch_size=4)
    full = response_logprobs(tiny_base, prompts, responses, batch_size=4, share_prefix=False)
    for a, b, c in zip(chunked, whole, full, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(a, c, atol=1e-4)


def test_batches_cut_by_length_at_the_least_cost():
    """Scoring batches: every text once, at most max_batch rows, and the cheapest cut of the sorted
    lengths (rows x longest row, plus a fixed cost per forward call), checked against brute force."""
    import itertools

    from irm.implicit.logratio import _CALL_COST_TOKENS, _batches

    def cost(batches, lens, call):
        return sum(call + len(b) * max(lens[i] for i in b) for b in batches)

    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 9))
        lens = [int(x) for x in rng.integers(1, 60, n)]
        got = _batches(list(range(n)), lens, 4, "cpu")
        assert sorted(i for b in got for i in b) == list(range(n)) and all(len(b) <= 4 for b in got)
        srt = sorted(range(n), key=lambda i: lens[i])
        best = min(cost([srt[a:b] for a, b in zip((0, *cuts), (*cuts, n))], lens, _CALL_COST_TOKENS)
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k)
                   if all(b - a <= 4 for a, b in zip((0, *cuts), (*cuts, n))))
        assert cost(got, lens, _CALL_COST_TOKENS) == best
    lens = [1] * 32 + [40] * 32  # short and long texts: apart on a CPU, one full batch on a GPU
    assert sorted(len(b) for b in _batches(list(range(64)), lens, 64, "cpu")) == [32, 32]
    assert [len(b) for b in _batches(list(range(64)), lens, 64, "cuda")] == [64]
    assert sorted(len(b) for b in _batches(list(range(70)), [9] * 70, 32, "cpu")) == [6, 32, 32]  # equal: full


def test_shared_prefix_scoring_falls_back_when_the_model_mishandles_it(smollm2, monkeypatch, caplog):
    """A model that ignores position_ids would score members at the wrong positions: the first shared batch
    is checked against a full pass, and the scoring then runs without sharing."""
    from irm.implicit import response_logprobs

    prompts, responses = _perturbed_texts()
    full = response_logprobs(smollm2, prompts, responses, share_prefix=False)
    base = type(smollm2.hf_model.base_model)
    real = base.forward

    def no_positions(self, *a, position_ids=None, **k):
        return real(self, *a, **k)

    monkeypatch.setattr(base, "forward", no_positions)
    with caplog.at_level("WARNING"):
        got = response_logprobs(smollm2, prompts, responses)
    assert "using full passes" in caplog.text
    for g, f in zip(got, full, strict=True):
        np.testing.assert_allclose(g, f, atol=1e-4)


def test_shared_prefix_scoring_in_mixed_precision(smollm2, monkeypatch, caplog):
    """bfloat16 compute: rounding moves single log-probabilities by tenths of a nat, which must not switch
    sharing off (the check runs in float32); a model that ignores position_ids is still caught."""
    from irm.implicit import response_logprobs
    from irm.models import set_compute_dtype

    prompts, responses = _perturbed_texts()
    set_compute_dtype(smollm2, "bfloat16")
    try:
        full = response_logprobs(smollm2, prompts, responses, share_prefix=False)
        with caplog.at_level("WARNING"):
            got = response_logprobs(smollm2, prompts, responses)
        assert "using full passes" not in caplog.text
        assert float(np.abs(np.concatenate(got) - np.concatenate(full)).mean()) < 0.05
        base = type(smollm2.hf_model.base_model)
        real = base.forward

        def no_positions(self, *a, position_ids=None, **k):
            return real(self, *a, **k)

        monkeypatch.setattr(base, "forward", no_positions)
        caplog.clear()
        with caplog.at_level("WARNING"):
            response_logprobs(smollm2, prompts, responses)
        assert "using full passes" in caplog.text
    finally:
        set_compute_dtype(smollm2, None)
