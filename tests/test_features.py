"""SAEs (sae-lens) on a tiny store, dictionary comparison with known answers, autointerp bookkeeping
(unparsable replies are counted, never defaulted), the IRM checks, and the features stage end to end."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from irm.activations.capture import capture_activations, records_from_texts
from irm.data import default_prompts
from irm.features import (
    FeatureRecord,
    SAETrainConfig,
    TokenTable,
    activation_change,
    activation_rate_check,
    alignment_test,
    classification_messages,
    compare_dictionaries,
    decoder_directions,
    effective_decoder,
    encode_rows,
    evaluate_sae,
    explain_and_classify,
    feature_irm_weights,
    irm_direction,
    lexicon_relevance,
    load_sae,
    parse_classification,
    precision_recall,
    pretrained_sae_ids,
    store_data_provider,
    train_sae,
    wilson_interval,
)
from irm.features.sae import eval_text_mask
from irm.llm import LLM_CLIENTS, ParseLog, register_llm
from irm.rewards.lexicon import TokenUtilityRM
from irm.run.config import ConfigError, config_from_dict

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny_store(tiny_base, tiny_tuned, tmp_path_factory):
    texts = default_prompts()[:96]
    store = capture_activations({"base": tiny_base, "tuned": tiny_tuned}, records_from_texts(texts),
                                tmp_path_factory.mktemp("store") / "s", hooks=[HOOK], positions="all",
                                shard_size=40, batch_size=32)
    return store, texts


# ----------------------------------------------------------------------------------------------
# SAE training with sae-lens on our store
def test_data_provider_gives_exact_batches_of_allowed_rows(tiny_store):
    store, _ = tiny_store
    index = store.index()
    x_all = store.load("tuned", HOOK)
    texts = np.zeros(int(store.manifest["dataset"]["n_texts"]), bool)
    texts[::3] = True
    allowed = texts[index["text"]] & (index["pos"] >= 1)
    prov = store_data_provider(store, "tuned", HOOK, 32, texts=texts, min_pos=1, pool_rows=50, seed=0)
    batches = [next(prov) for _ in range(int(allowed.sum()) // 32 + 3)]  # more than one epoch
    assert all(b.shape == (32, store.d(HOOK)) and b.dtype == torch.float32 for b in batches)
    # Every row served is an allowed row, and none is a row of a left-out text or of position 0 (rows
    # with an identical allowed twin, e.g. the same two-token prefix in another text, are left aside).
    rows = torch.cat(batches)

    def dist(a, b):
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").min(1).values

    ok, other = x_all[torch.from_numpy(allowed)], x_all[torch.from_numpy(~allowed)]
    other = other[dist(other, ok) > 1e-3]
    assert len(other) > 100
    assert dist(rows, ok).max() < 1e-5 and dist(rows, other).min() > 1e-3
    # The first epoch serves each allowed row at most once (it is a shuffle, not sampling).
    from collections import Counter

    def key(x):
        return [tuple(np.round(r, 4)) for r in x.numpy()]

    served = Counter(key(torch.cat(batches[: int(allowed.sum()) // 32])))
    assert not served - Counter(key(ok))


def test_standard_sae_trains_saves_and_loads(tiny_store, tmp_path):
    store, _ = tiny_store
    cfg = SAETrainConfig(steps=150, batch_size=64, expansion=2.0)
    t = train_sae(store, "tuned", HOOK, cfg, seed=0, out_dir=tmp_path / "sae")
    m = t.metrics
    assert t.d_sae == 2 * store.d(HOOK) == m["d_sae"]
    assert 0.3 < m["explained_variance"] <= 1.0, m
    assert 0.5 < m["l0"] < 0.5 * t.d_sae, m  # sparse, but not empty
    assert 0.0 <= m["dead_share"] < 0.5 and m["n_eval_rows"] > 0
    # The metrics are those of held-out texts, recomputed here from the raw rows (the input scale was
    # folded into the weights, so the SAE reads raw activations).
    index = store.index()
    held = eval_text_mask(int(store.manifest["dataset"]["n_texts"]), cfg.eval_fraction, 0)[index["text"]]
    x = store.load("tuned", HOOK)[torch.from_numpy(held & (index["pos"] >= 1))]
    with torch.no_grad():
        xh = t.sae.decode(t.sae.encode(x))
    ev = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert float(ev) == pytest.approx(m["explained_variance"], abs=1e-4)
    assert len(x) == m["n_eval_rows"]
    # Saved in sae-lens's format; load_sae (SAE.load_from_disk) gives the same features.
    cfg_json = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "standard" and cfg_json["metadata"]["hook_name"] == HOOK
    loaded = load_sae(tmp_path / "sae")
    assert torch.allclose(encode_rows(loaded, x), encode_rows(t.sae, x), atol=1e-5)
    # Same seed, same SAE.
    again = train_sae(store, "tuned", HOOK, cfg, seed=0)
    assert torch.equal(again.sae.W_dec, t.sae.W_dec)


def test_topk_sae_respects_k(tiny_store):
    store, _ = tiny_store
    t = train_sae(store, "base", HOOK, SAETrainConfig(architecture="topk", k=4, steps=100, batch_size=64), seed=1)
    assert 2.0 < t.metrics["l0"] <= 4.0 + 1e-9
    assert t.metrics["explained_variance"] > 0.2
    assert type(t.sae).__name__ == "TopKSAE"
    # Attributions use the rows decode really multiplies with (unit rows when acts are rescaled by norms).
    x = store.load("base", HOOK)[:50]
    with torch.no_grad():
        f = t.sae.encode(x)
        assert torch.allclose(t.sae.decode(f), f @ effective_decoder(t.sae) + t.sae.b_dec, atol=1e-4)


def test_evaluate_sae_formula_on_a_known_reconstruction(tiny_store):
    store, _ = tiny_store
    t = train_sae(store, "base", HOOK, SAETrainConfig(steps=30, batch_size=64), seed=0)
    x = store.load("base", HOOK)[:200]
    with torch.no_grad():
        f = t.sae.encode(x)
        xh = t.sae.decode(f)
    got = evaluate_sae(t.sae, [x[:77], x[77:]])  # chunking must not change the result
    sse = ((x - xh).double() ** 2).sum()
    sst = ((x.double() - x.double().mean(0)) ** 2).sum()
    assert got["explained_variance"] == pytest.approx(float(1 - sse / sst), abs=1e-6)
    assert got["l0"] == pytest.approx(float((f > 0).sum(1).double().mean()), abs=1e-9)
    assert got["n_dead"] == int(((f > 0).sum(0) == 0).sum())


def test_sae_config_and_errors(tiny_store):
    store, _ = tiny_store
    with pytest.raises(ValueError, match="architecture"):
        SAETrainConfig(architecture="gated")
    with pytest.raises(ValueError, match="exceeds the dictionary size"):
        train_sae(store, "base", HOOK, SAETrainConfig(architecture="topk", k=1000, steps=1))
    with pytest.raises(Exception, match="fewer than one batch"):
        train_sae(store, "base", HOOK, SAETrainConfig(batch_size=100000, steps=1))


def test_pretrained_registry_paths_without_network(tmp_path):
    ids = pretrained_sae_ids("pythia-70m-deduped-res-sm")
    assert "blocks.3.hook_resid_post" in ids
    with pytest.raises(ValueError, match="valid ids"):
        load_sae("pythia-70m-deduped-res-sm", "blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="did you mean"):
        load_sae("pythia-70m-dedupd-res-sm", "blocks.3.hook_resid_post")
    with pytest.raises(FileNotFoundError, match="sae-lens's format"):
        load_sae(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# Dictionary comparison
def test_mmcs_on_constructed_dictionaries_with_a_known_answer():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    Q = Q.T  # rows orthonormal
    base = Q[:8].clone()
    perm = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    tuned = base[perm] * torch.linspace(0.5, 3, 8, dtype=torch.float64)[:, None]  # scale must not matter
    tuned[2] = Q[8]  # replaces base[6]: new, orthogonal to every base feature
    tuned[5] = Q[9]  # replaces base[2]
    tuned[7] = 0.8 * base[4] + 0.6 * Q[10]  # base[4] rotated: cosine 0.8
    cmp = compare_dictionaries(base, tuned, threshold=0.5)
    assert cmp.mmcs == pytest.approx((5 * 1.0 + 0.8 + 0 + 0) / 8, abs=1e-9)
    assert sorted(cmp.appeared) == [2, 5] and sorted(cmp.vanished) == [2, 6]
    pairs = dict(zip(cmp.match_base.tolist(), cmp.match_tuned.tolist(), strict=True))
    for j, i in enumerate(perm.tolist()):
        if j not in (2, 5):
            assert pairs[i] == j
    assert cmp.shifted[0][:2] == (4, 7) and cmp.shifted[0][2] == pytest.approx(0.8)
    assert len(cmp.shifted) == 6 and all(c == pytest.approx(1.0) for _, _, c in cmp.shifted[1:])
    # Alive masks leave dead features out of everything.
    alive_t = np.ones(8, bool)
    alive_t[[2, 5]] = False
    alive_b = np.ones(8, bool)
    alive_b[[2, 6]] = False
    clean = compare_dictionaries(base, tuned, alive_base=alive_b, alive_tuned=alive_t)
    assert clean.mmcs == pytest.approx((5 + 0.8) / 6) and not clean.appeared and not clean.vanished


def test_hungarian_matching_is_one_to_one_unlike_max_cosine():
    e1, e2 = torch.eye(2, dtype=torch.float64)
    near = 0.95 * e1 + np.sqrt(1 - 0.95**2) * e2
    cmp = compare_dictionaries(torch.stack([e1, e2]), torch.stack([e1, near]))
    assert cmp.mmcs == pytest.approx((1 + np.sqrt(1 - 0.95**2)) / 2)
    assert cmp.mmcs_max_tuned == pytest.approx((1 + 0.95) / 2)
    with pytest.raises(ValueError, match="same d"):
        compare_dictionaries(torch.eye(3), torch.eye(4))


def test_activation_change_of_matched_features():
    n = 100
    acts_b = torch.zeros(n, 3)
    acts_t = torch.zeros(n, 3)
    acts_b[:10, 0] = 1.0  # base feature 0 fires on 10% of rows ...
    acts_t[:40, 2] = 2.0  # ... its tuned partner 2 on 40%
    acts_b[:50, 1] = 1.0
    acts_t[:50, 0] = 1.0  # unchanged pair 1 -> 0
    res = activation_change(acts_b, acts_t, np.array([0, 1]), np.array([2, 0]))
    assert res["up"][0] == pytest.approx({"base": 0, "tuned": 2, "rate_base": 0.1, "rate_tuned": 0.4,
                                          "mean_base": 0.1, "mean_tuned": 0.8, "rate_change": 0.3,
                                          "corr": res["up"][0]["corr"]})
    assert res["down"] == [] and res["mean_abs_rate_change"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="same tokens"):
        activation_change(acts_b, acts_t[:5], np.array([0]), np.array([0]))


# ----------------------------------------------------------------------------------------------
# Autointerp
def test_snippets_mark_active_tokens_and_words_map_back(tiny_base):
    texts = ["the movie was great fun and the end", "a terrible film"]
    table = TokenTable.from_texts(tiny_base.tokenizer, texts, max_length=32)
    ids = table.token_ids[0].tolist()
    pos_great = ids.index(tiny_base.tokenizer.convert_tokens_to_ids("great"))
    active = np.zeros(len(ids), bool)
    active[[pos_great, pos_great + 1]] = True  # "great fun": adjacent tokens become one marked span
    s = table.snippet(0, pos_great, active, left=2, right=1)
    assert s == "...movie was <<great fun>>..."
    assert table.word_at(0, pos_great) == "great"
    assert table.word_at(1, 0) in ("", "a")  # a special token (if any) maps to no word
    text, pos = table.locate(np.array([table.row(1, 1)]))
    assert (int(text[0]), int(pos[0])) == (1, 1)
    wrong = {"token": np.concatenate(table.token_ids)[::-1].copy()}
    with pytest.raises(ValueError, match="other texts or with another tokenizer"):
        table.check(wrong)


def test_words_map_back_under_bpe_tokens_that_carry_their_space(smollm2):
    """SmolLM2's tokens carry the space before a word (" love"): the word is 'love', never 'of love'.
    (A word-level tokenizer cannot show this; the lexicon ground truth read every such word as unknown.)"""
    texts = ["a story of love, and devastation", "I love it"]
    table = TokenTable.from_texts(smollm2.tokenizer, texts, max_length=32)
    words = [[table.word_at(t, p) for p in range(len(table.token_ids[t]))] for t in range(len(texts))]
    assert words[0][words[0].index("love,")] == "love,"  # punctuation stays; word_utility strips it
    assert "of love," not in words[0] and "of" in words[0] and "a" in words[0]
    assert {w for w in words[0] if w.startswith("devast")} == {"devastation"}  # sub-word pieces -> whole word
    assert words[1][-2:] == ["love", "it"] and all(" " not in w for ws in words for w in ws)
    vader = TokenUtilityRM.from_vader()
    assert lexicon_relevance(words[1], vader.word_utility) == pytest.approx(1 / 3)


def test_lexicon_relevance_and_precision_recall_known_numbers():
    lex = {"great": 3.1, "awful": -2.0, "zero": 0.0}.get
    assert lexicon_relevance(["great", "the", "awful", "film", "zero"], lex) == pytest.approx(0.4)
    assert lexicon_relevance([], lex) is None
    pr = precision_recall([1, 1, 0, 0, None, 1], [True, False, True, False, True, None])
    assert (pr["tp"], pr["fp"], pr["fn"], pr["tn"], pr["n_unknown"]) == (1, 1, 1, 1, 2)
    assert pr["precision"]["value"] == 0.5 and pr["recall"]["value"] == 0.5
    lo, hi = wilson_interval(1, 2)
    assert pr["precision"]["low"] == pytest.approx(lo) and 0 < lo < 0.5 < hi < 1
    none = precision_recall([0, 0], [False, False])
    assert none["recall"]["value"] is None and any("recall" in n for n in none["notes"])


class ScriptedLLM:
    """An LLMClient whose replies are scripted by feature name (the first snippet's text)."""

    name = "scripted"

    def __init__(self, explain: dict[str, str], classify: dict[str, str]) -> None:
        self.explain, self.classify, self.calls = explain, classify, []

    def complete(self, messages, *, max_tokens=256, temperature=0.0, seed=0) -> str:
        content = messages[-1]["content"]
        feature = re.search(r"1\. (\w+)", content).group(1)
        self.calls.append(("classify" if "Is this feature related" in content else "explain", feature))
        return (self.classify if self.calls[-1][0] == "classify" else self.explain)[feature]


def test_unparsable_replies_are_counted_with_excerpts_never_defaulted():
    recs = [FeatureRecord("tuned", HOOK, i, snippets=[f"{name} <<x>>"]) for i, name in
            enumerate(["alpha", "beta", "gamma", "delta", "eps"])]
    recs.append(FeatureRecord("tuned", HOOK, 9, snippets=[]))  # never active: nothing to show the LLM
    llm = ScriptedLLM(
        explain={"alpha": "Praise words.", "beta": "Words of judgement", "gamma": "Numbers.",
                 "delta": "Commas and periods.", "eps": "   "},
        classify={"alpha": "1 | positive sentiment", "beta": "Hard to say, it depends on context.",
                  "gamma": "It could be 0 or 1, hard to say", "delta": "0 | punctuation"})
    plog = ParseLog()
    explain_and_classify(llm, recs, "positive or negative sentiment", plog=plog)
    by = {r.snippets[0].split()[0] if r.snippets else "none": r for r in recs}
    assert by["alpha"].label == 1 and by["alpha"].attribute == "positive sentiment"
    assert by["delta"].label == 0 and by["delta"].attribute == "punctuation"
    assert by["alpha"].explanation == "Praise words."
    for name in ("beta", "gamma", "eps", "none"):  # unknown, not a silent 0
        assert by[name].label is None and by[name].errors, name
    assert by["eps"].explanation is None and ("classify", "eps") not in llm.calls
    assert plog.counts == {"text": {"ok": 4, "failed": 1}, "label01": {"ok": 2, "failed": 2}}
    failures = {f["feature"]: f for f in plog.failures}
    assert failures[by["beta"].key]["excerpt"].startswith("Hard to say")
    assert failures[by["gamma"].key]["error"].startswith("ambiguous")
    assert failures[by["eps"].key]["step"] == "explain"
    pr = precision_recall([r.label for r in recs], [True] * len(recs))
    assert pr["n"] == 2 and pr["n_unknown"] == 4


class ScoringLLM(ScriptedLLM):
    """ScriptedLLM that also exposes token log-probabilities: log-odds of '1' over '0' by feature name."""

    def __init__(self, explain, classify, odds: dict[str, float]) -> None:
        super().__init__(explain, classify)
        self.odds = odds

    def choice_logprobs(self, batch, choices):
        assert list(choices) == ["1", "0"]
        out = []
        for messages in batch:
            feature = re.search(r"1\. (\S+)", messages[-1]["content"]).group(1)
            o = self.odds[feature]
            out.append([-np.logaddexp(0, -o), -np.logaddexp(0, o)])  # log sigmoid(o), log sigmoid(-o)
        return np.array(out)


def test_calibrated_labels_remove_the_llms_bias_and_keep_the_written_ones():
    names = ["alpha", "beta", "gamma"]
    recs = [FeatureRecord("tuned", HOOK, i, snippets=[f"{n} <<x>>"]) for i, n in enumerate(names)]
    # A biased LLM: it writes 1 for everything and leans to "1" by log-odds 2 even on a content-free feature.
    llm = ScoringLLM(explain={n: f"Feature {n}." for n in names}, classify={n: "1 | sentiment" for n in names},
                     odds={"N/A": 2.0, "alpha": 5.0, "beta": 1.0, "gamma": 2.5})
    info = explain_and_classify(llm, recs, "positive or negative sentiment", plog=ParseLog(), mode="calibrated")
    assert info["mode"] == "calibrated" and info["content_free_log_odds"] == pytest.approx(2.0)
    by = {r.snippets[0].split()[0]: r for r in recs}
    assert [by[n].label for n in names] == [1, 0, 1]
    assert [by[n].label_generated for n in names] == [1, 1, 1]
    assert by["beta"].label_score == pytest.approx(-1.0) and by["alpha"].label_score == pytest.approx(3.0)

    # 'auto' on an LLM without token probabilities: the written labels stand, and the reason is recorded.
    plain = [FeatureRecord("tuned", HOOK, i, snippets=[f"{n} <<x>>"]) for i, n in enumerate(names)]
    info = explain_and_classify(ScriptedLLM(llm.explain, llm.classify), plain, "sentiment", plog=ParseLog(),
                                mode="auto")
    assert info["mode"] == "generate" and "classify_mode" in info["calibration_unavailable"]
    assert [r.label for r in plain] == [1, 1, 1] and all(r.label_score is None for r in plain)
    with pytest.raises(Exception, match="classify_mode"):
        explain_and_classify(ScriptedLLM(llm.explain, llm.classify), plain, "sentiment", plog=ParseLog(),
                             mode="calibrated")
    with pytest.raises(ValueError, match="mode must be"):
        explain_and_classify(llm, plain, "sentiment", plog=ParseLog(), mode="vote")


# ----------------------------------------------------------------------------------------------
# Scored explanations (detection and fuzzing)
def _word_table(texts: list[str]) -> TokenTable:
    """A TokenTable of whitespace words (one token per word, a BOS-like special token first)."""
    ids, offs = [], []
    for t in texts:
        spans = [(0, 0)] + [(m.start(), m.end()) for m in re.finditer(r"\S+", t)]
        offs.append(np.asarray(spans, dtype=np.int64))
        ids.append(np.arange(len(spans), dtype=np.int64))
    return TokenTable(list(texts), ids, offs, np.concatenate([[0], np.cumsum([len(x) for x in ids])]))


def _planted_feature(n_texts: int = 60, word: str = "zebra", seed: int = 0):
    """Texts of random filler words, a third with ``word`` planted; a feature that fires exactly on ``word``
    with a strength that varies across texts (so every activation bin has texts)."""
    rng = np.random.default_rng(seed)
    filler = ["the", "a", "film", "was", "long", "story", "then", "after", "of", "and", "city", "night"]
    texts, acts = [], []
    for i in range(n_texts):
        words = list(rng.choice(filler, size=10))
        if i % 3 == 0:
            words[int(rng.integers(2, 9))] = word
        texts.append(" ".join(words))
        acts += [0.0] + [float(0.5 + i / n_texts) if w == word else 0.0 for w in words]
    table = _word_table(texts)
    acts = np.asarray(acts)
    eligible = np.ones(len(acts), bool)
    eligible[table.starts[:-1]] = False  # the special token
    return table, acts, eligible


class JudgeLLM:
    """A rule-based judge that reads the explanation ('The word "x".') and the text from the prompt and
    answers as a perfect judge would (``clueless``: by a hash of the prompt, ignoring the explanation).
    ``logprobs`` exposes token log-probabilities (log-odds +-3 of its answer)."""

    def __init__(self, *, clueless: bool = False, logprobs: bool = False) -> None:
        self.name = f"judge-{'clueless' if clueless else 'perfect'}"
        self.clueless, self.prompts = clueless, []
        if logprobs:
            self.choice_logprobs = self._choice_logprobs

    def answer(self, messages) -> int:
        content = messages[-1]["content"]
        self.prompts.append(content)
        if self.clueless:
            return int(hashlib.sha256(content.encode()).digest()[0] % 2)
        m = re.search(r'Explanation: "The word \W*(\w+)', content)
        if m is None:
            return 0
        word, text = m.group(1), content.split("Text: ", 1)[1]
        if "marked words" in content:
            marked = re.findall(r"<<(.+?)>>", text)
            return int(bool(marked) and all(x.strip(".,") == word for x in marked))
        return int(word in re.findall(r"\w+", text))

    def complete(self, messages, *, max_tokens=256, temperature=0.0, seed=0) -> str:
        return str(self.answer(messages))

    def _choice_logprobs(self, batch, choices):
        assert list(choices) == ["1", "0"]
        out = []
        for messages in batch:
            o = 3.0 if self.answer(messages) else -3.0
            out.append([-np.logaddexp(0, -o), -np.logaddexp(0, o)])
        return np.array(out)


def test_scoring_snippets_are_held_out_balanced_and_span_the_quantiles():
    from irm.features.scoring import scoring_snippets

    table, acts, eligible = _planted_feature()
    top = [57, 54, 51]  # the texts an explanation would have been written from
    sets = scoring_snippets(table, acts, eligible=eligible, exclude_texts=top, n=8, n_quantiles=4, seed=0,
                            key="f")
    assert sets.n_active_texts == 20 - 3 and sets.n_inactive_texts == 40
    det, fz = sets.detection, sets.fuzzing
    assert sum(s.label for s in det) == 8 and len(det) == 16  # balanced
    assert not {s.text for s in det + fz} & set(top)  # held out
    assert all("<<" not in s.snippet for s in det)
    assert all(("zebra" in s.snippet) == bool(s.label) for s in det)
    assert sorted({s.bin for s in det if s.label}) == [0, 1, 2, 3]  # weak activations are scored too
    assert len(fz) == 16 and all(("<<zebra>>" in s.snippet) == bool(s.label) for s in fz)
    assert all(s.snippet.count("<<") == 1 for s in fz)  # the fuzzed ones mark as many tokens
    again = scoring_snippets(table, acts, eligible=eligible, exclude_texts=top, n=8, n_quantiles=4, seed=0, key="f")
    assert [s.snippet for s in again.detection] == [s.snippet for s in det]  # deterministic


@pytest.mark.parametrize("logprobs", [False, True])
def test_scoring_tells_a_right_explanation_from_a_wrong_one(logprobs, tmp_path):
    from irm.features.scoring import score_explanations, scoring_snippets
    from irm.llm import CachedLLM

    table, acts, eligible = _planted_feature(n_texts=90)
    sets = scoring_snippets(table, acts, eligible=eligible, exclude_texts=[0, 3], n=12, n_quantiles=3, seed=0,
                            key="f")
    items = [("right", 'The word "zebra".', sets), ("wrong", 'The word "violin".', sets)]
    judge = JudgeLLM(logprobs=logprobs)
    llm = CachedLLM(judge, tmp_path / "cache")
    res = score_explanations(llm, items, plog=ParseLog(), n_boot=300)
    assert res["mode"] == ("logprobs" if logprobs else "generate")
    right, wrong = res["features"]["right"], res["features"]["wrong"]
    for m in ("detection", "fuzzing"):
        assert right[m]["balanced_accuracy"]["value"] == 1.0 and right[m]["auroc"]["value"] == 1.0
        assert right[m]["balanced_accuracy"]["low"] > 0.7
        assert wrong[m]["balanced_accuracy"]["value"] == 0.5 and wrong[m]["auroc"]["value"] == 0.5
        assert wrong[m]["balanced_accuracy"]["low"] < 0.5 < wrong[m]["balanced_accuracy"]["high"]
    assert right["above_chance"] is True and wrong["above_chance"] is False
    assert set(right["detection"]["recall_by_bin"]) == {"0", "1", "2"}
    assert res["n_above_chance"] == 1 and res["n_scored"] == 2
    # Replies go through the cache: a rerun asks the judge nothing.
    n = len(judge.prompts)
    again = score_explanations(llm, items, plog=ParseLog(), n_boot=300)
    assert len(judge.prompts) == n and again["features"]["right"] == right

    # A clueless judge (answers ignore the explanation) is near chance even with the right explanation,
    # and the verdict says so plainly.
    clueless = score_explanations(JudgeLLM(clueless=True, logprobs=logprobs), items[:1], plog=ParseLog(),
                                  n_boot=300)
    ba = clueless["features"]["right"]["detection"]["balanced_accuracy"]
    assert ba["low"] < 0.5 and clueless["features"]["right"]["above_chance"] is False
    assert "NO BETTER THAN CHANCE" in clueless["verdict"]


def test_scoring_modes_and_unparsable_replies():
    from irm.features.scoring import auroc, method_metrics, score_explanations, scoring_snippets

    table, acts, eligible = _planted_feature()
    sets = scoring_snippets(table, acts, eligible=eligible, n=4, seed=0, key="f")
    with pytest.raises(Exception, match="log-probabilities"):
        score_explanations(JudgeLLM(), [("f", 'The word "zebra".', sets)], plog=ParseLog(), mode="logprobs")
    res = score_explanations(JudgeLLM(), [("f", 'The word "zebra".', sets)], plog=ParseLog(), mode="auto",
                             methods=["detection"])
    assert res["mode"] == "generate" and "log-probabilities" in res["logprobs_unavailable"]

    class Mumbler(JudgeLLM):
        def complete(self, messages, **kw):
            return "It depends."

    plog = ParseLog()
    res = score_explanations(Mumbler(), [("f", 'The word "zebra".', sets)], plog=plog, methods=["detection"])
    det = res["features"]["f"]["detection"]
    # An unparsable reply is a wrong prediction, never a default label; AUROC sees no information (0.5).
    assert det["n_unparsed"] == 8 and det["balanced_accuracy"]["value"] == 0.0 and det["auroc"]["value"] == 0.5
    assert plog.counts["label01"]["failed"] == 8
    assert auroc(np.array([1, 1, 0, 0]), np.array([0.9, 0.2, 0.5, 0.1])) == pytest.approx(0.75)
    m = method_metrics([1, 0, 1, 0], [True, True, True, False], [1, 0, 1, 1])
    assert m["balanced_accuracy"]["value"] == pytest.approx(0.75) and m["tnr"] == 0.5
    with pytest.raises(ValueError, match="mode must be"):
        score_explanations(JudgeLLM(), [], plog=ParseLog(), mode="vote")


@pytest.mark.slow
def test_scoring_with_the_real_smollm2(smollm2, tmp_path):
    """The scorer's plumbing with a real model: SmolLM2 answers every prompt, its log-odds are read
    (mode 'logprobs'), and the metrics come out in range. Its judgement is not asserted: a 135M model is
    a weak judge, which is what the scores are there to show."""
    from irm.features.scoring import score_explanations, scoring_snippets
    from irm.llm import CachedLLM, LocalChatLLM

    table, acts, eligible = _planted_feature(n_texts=45)
    sets = scoring_snippets(table, acts, eligible=eligible, exclude_texts=[0, 3, 6], n=4, seed=0, key="f")
    items = [("right", 'The word "zebra".', sets), ("wrong", 'The word "violin".', sets)]
    llm = CachedLLM(LocalChatLLM(smollm2), tmp_path)
    res = score_explanations(llm, items, plog=ParseLog(), methods=["detection", "fuzzing"], n_boot=200)
    assert res["mode"] == "logprobs" and set(res["content_free_log_odds"]) == {"detection", "fuzzing"}
    for key in ("right", "wrong"):
        for m in ("detection", "fuzzing"):
            r = res["features"][key][m]
            assert r["n_pos"] == r["n_neg"] == 4
            assert all(np.isfinite(sn["score"]) for sn in r["snippets"])
            assert 0 <= r["balanced_accuracy"]["low"] <= r["balanced_accuracy"]["value"] <= 1
            assert 0 <= r["auroc"]["value"] <= 1 and "written_balanced_accuracy" in r
    print("\nSmolLM2 as judge:", {k: {m: (v[m]["balanced_accuracy"]["value"], v[m]["auroc"]["value"],
                                          v[m]["written_balanced_accuracy"]["value"]) for m in ("detection", "fuzzing")}
                                   for k, v in res["features"].items()}, res["verdict"])
    misses = llm.stats.misses
    assert score_explanations(llm, items, plog=ParseLog(), methods=["detection", "fuzzing"], n_boot=200)[
        "features"]["right"]["detection"]["snippets"] == res["features"]["right"]["detection"]["snippets"]
    assert llm.stats.misses == misses  # the rerun is read from the reply cache


def test_parse_classification_forms():
    assert parse_classification("Yes | praise")[0].value == 1
    assert parse_classification("0\nAttribute: dates")[1] == "dates"
    p, attr = parse_classification("")
    assert not p.ok and attr is None
    # The worked examples shown to the LLM must themselves parse as the labels they demonstrate.
    msgs = classification_messages("x", ["a <<b>>"], "sentiment")
    shots = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert [parse_classification(a)[0].value for a in shots] == [1, 0] and msgs[-1]["role"] == "user"
    assert [m["role"] for m in classification_messages("x", ["a"], "s", few_shot=False)] == ["system", "user"]


# ----------------------------------------------------------------------------------------------
# The IRM checks
def test_irm_direction_recovers_a_linear_readout():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12))
    w_true = rng.normal(size=12)
    y = X @ w_true + 0.01 * rng.normal(size=300)
    w, info = irm_direction(X, y, slice(0, 240))
    assert np.dot(w, w_true) / np.linalg.norm(w) / np.linalg.norm(w_true) > 0.999
    assert info["heldout_spearman"] > 0.98 and info["n_fit"] == 240
    weights = feature_irm_weights(torch.eye(12, dtype=torch.float64), w)
    assert np.allclose(weights, w / np.linalg.norm(w))
    with pytest.raises(ValueError, match="constant"):
        irm_direction(X, np.zeros(300))


def test_alignment_test_detects_weight_on_flagged_features():
    v = np.array([5.0, 4.0] + [0.1] * 8)
    good = np.zeros(10, bool)
    good[:2] = True
    res = alignment_test(v, good, n_perm=4000, seed=0)
    assert res["share"] == pytest.approx(9 / 9.8)
    assert res["baseline_mean"] == pytest.approx(9.8 * 0.2 / 9.8, abs=0.02)  # E[share] = k / n
    assert res["p_value"] < 0.05 and res["lift"] > 4
    bad = alignment_test(v, ~good, n_perm=4000, seed=0)
    assert bad["p_value"] > 0.9
    assert alignment_test(v, np.zeros(10, bool))["p_value"] is None


def test_activation_rate_check_high_vs_low():
    rng = np.random.default_rng(0)
    n_texts, per = 60, 5
    text_of_row = np.repeat(np.arange(n_texts), per)
    scores = np.linspace(-1, 1, n_texts)
    active = np.zeros((n_texts * per, 2), bool)
    active[:, 0] = np.repeat(scores > 0.3, per)  # flagged: on exactly on high-scoring texts
    active[:, 1] = rng.random(n_texts * per) < 0.5  # unflagged: noise
    res = activation_rate_check(scores, active, text_of_row, np.array([True, False]), n_perm=500, n_boot=300)
    f, u = res["by_score"]["flagged"], res["by_score"]["unflagged"]
    assert f["rate_high"] == 1.0 and f["rate_low"] == 0.0 and f["p_value"] < 0.01
    assert u["diff_low"] < 0 < u["diff_high"] and u["p_value"] > 0.01
    assert res["by_abs_score"]["flagged"]["diff"] < 1.0  # |score| mixes the negative end in
    assert "note" in activation_rate_check(np.zeros(n_texts), active, text_of_row, np.array([True, False]))


# ----------------------------------------------------------------------------------------------
# Config and the stage
def test_features_config_nested_tables():
    cfg = config_from_dict({"features": {"n_features": 4, "sae": {"architecture": "topk", "k": 8},
                                         "llm": {"model": "tiny-llama", "max_tokens": 8}}})
    fc = cfg.section("features")
    assert fc.sae.architecture == "topk" and fc.sae.k == 8 and fc.llm.model == "tiny-llama"
    assert cfg.to_dict()["features"]["sae"]["k"] == 8
    with pytest.raises(ConfigError, match="did you mean 'architecture'"):
        config_from_dict({"features": {"sae": {"architecure": "topk"}}})
    with pytest.raises(ConfigError, match="texts"):
        config_from_dict({"features": {"texts": ["prompts", "tweets"]}})
    assert fc.score_explanations and fc.score_methods == ["detection"] and fc.n_score_snippets == 4
    with pytest.raises(ConfigError, match="holds 'detection'"):
        config_from_dict({"features": {"score_methods": ["fuzzing"]}})
    with pytest.raises(ConfigError, match="score_mode"):
        config_from_dict({"features": {"score_mode": "vote"}})


def _label_llm_factory(model=None, **_):
    """A deterministic labeller: explains every feature, labels by a hash of the snippets, and answers
    one feature in three with something unparsable."""

    class HashLLM:
        name = "hash-labeller"

        def complete(self, messages, *, max_tokens=256, temperature=0.0, seed=0):
            content = messages[-1]["content"]
            if "Explanation:" in content:  # scoring an explanation: a clueless 1 or 0
                return str(sum(map(ord, content)) % 2)
            if "Is this feature related" not in content:
                return "Tokens of a certain kind."
            h = sum(map(ord, content)) % 3
            return {0: "1 | sentiment", 1: "0 | other", 2: "I cannot tell."}[h]

    return HashLLM()


if "test-hash" not in LLM_CLIENTS:
    register_llm("test-hash")(_label_llm_factory)


def _tiny_cfg(tmp_path, **features):
    return config_from_dict({
        "name": "feat", "run_dir": str(tmp_path / "run"),
        "models": {"base": "tiny-llama", "tuned": "tiny-llama:seed=1"},
        "data": {"prompts": "default", "limit": 48},
        "tracking": {"mode": "disabled"},
        "irm": {"max_words": 60, "n_boot": 20, "layers": [2], "feature_sets": ["tuned", "base"],
                "sequence_eval": False},
        "features": {"n_word_texts": 120, "n_features": 8, "n_perm": 300, "sae": {"steps": 60, "batch_size": 64},
                     **features},
    })


def _run_stages(cfg, base, tuned):
    """The reward, irm and features stages on models already in memory (no reload per test)."""
    from irm.models import ModelPair
    from irm.run.pipeline import open_context
    from irm.run.registry import STAGES, import_stages

    import_stages()
    ctx = open_context(cfg)
    ctx.base = base
    ctx.pair = ModelPair(base, tuned) if tuned is not None else None
    try:
        for name in ("reward", "irm", "features"):
            STAGES[name][1](ctx)
    finally:
        ctx.tracker.finish()
    return ctx


def test_features_stage_end_to_end_on_a_tiny_pair(tmp_path, tiny_base, tiny_tuned):
    from irm.run.report import write_report

    cfg = _tiny_cfg(tmp_path, llm={"kind": "test-hash", "model": "x", "cache": False})
    ctx = _run_stages(cfg, tiny_base, tiny_tuned)
    sec = json.loads((ctx.run_path / "results.json").read_text())["features"]
    # The middle layer (2 of 4), which the IRM stage probed, so the IRM checks ran there.
    assert sec["hooks"] == ["blocks.2.hook_resid_post"] and "middle" in sec["layer_choice"]
    hook = sec["hooks"][0]
    assert set(sec["saes"][hook]) == {"base", "tuned", "base_seed2"}
    assert (ctx.run_path / "features" / "saes" / f"tuned-{hook}" / "cfg.json").is_file()
    m = sec["mmcs"][hook]
    # Two unrelated random models share few features; two seeds on the same data share many.
    assert m["mmcs"] < m["seed_control"]["mmcs"]
    feats = sec["features"]
    assert len(feats) == 16 and {f["selection"] for f in feats} == {"aligned", "random"}
    aligned = [abs(f["irm_weight"]) for f in feats if f["selection"] == "aligned"]
    rand = [abs(f["irm_weight"]) for f in feats if f["selection"] == "random"]
    assert min(aligned) >= max(rand) - 1e-12 or np.mean(aligned) > np.mean(rand)
    # Bookkeeping: every feature is labelled or carries the parse error; counts agree everywhere.
    ai = sec["autointerp"]
    assert ai["n_labelled"] + ai["parse"]["counts"]["label01"]["failed"] == 16
    assert all((f["label"] is None) == any("did not parse" in e for e in f["errors"]) for f in feats)
    gt = sec["ground_truth"]["overall"]
    truth = [f["relevant"] for f in feats]
    assert gt["tp"] == sum(f["label"] == 1 and t for f, t in zip(feats, truth, strict=True))
    assert gt["n_unknown"] == sum(f["label"] is None or t is None for f, t in zip(feats, truth, strict=True))
    # Scored explanations: every explained feature has detection scores on balanced held-out sets, and a
    # clueless judge leaves the LLM no better than chance, which the results and the report say.
    sc = sec["scoring"]
    assert sc["mode"] == "generate" and "log-probabilities" in sc["logprobs_unavailable"]
    assert sc["n_scored"] == sum(f["explanation"] is not None for f in feats) == 16
    for f in feats:
        det = f["scores"]["detection"]
        assert det["n_pos"] == det["n_neg"] >= 1 and len(det["snippets"]) == det["n_pos"] + det["n_neg"]
        assert f["explanation_above_chance"] == (det["balanced_accuracy"]["low"] > 0.5)
    assert sc["n_prompts"] == sum(len(f["scores"]["detection"]["snippets"]) for f in feats)
    assert sc["llm_above_chance"] is False and "NO BETTER THAN CHANCE" in sc["verdict"]
    for role in ("base", "tuned"):
        labelled = [f for f in feats if f["role"] == role and f["label"] is not None]
        if labelled and all(f["relevant"] is not None for f in labelled):  # against the lexicon ground truth
            g = sec["alignment_ground_truth"][hook][role]["weight"]  # over every labelled feature
            assert g["n"] == len(labelled) and g["n_flagged"] == sum(bool(f["relevant"]) for f in labelled)
        al = sec["alignment"][hook][role]["weight"]
        trusted = [f for f in feats if f["role"] == role and f["label"] is not None and f["explanation_above_chance"]]
        if not trusted:  # only labels of above-chance explanations are counted
            assert "above chance" in al["note"]
            continue
        assert al["n"] == len(trusted)
        assert al.get("p_value") is None or 0 < al["p_value"] <= 1
        assert "by_score" in sec["activation_rate"][hook][role] or "note" in sec["activation_rate"][hook][role]

    assert sec["seconds"] > 0 and set(sec["timings"]) >= {"capture", "autointerp", "checks"}
    assert (ctx.run_path / "plots" / "features_mmcs.png").is_file()
    report = write_report(ctx.run_path).read_text()
    assert "## features" in report and "MMCS base vs tuned" in report and "could not render" not in report
    assert "Scored explanations" in report and "NO BETTER THAN CHANCE" in report and "detection bal. acc." in report


def test_features_stage_without_tuned_model_records_what_it_skipped(tmp_path, tiny_base):
    # The tiny model's context (256 tokens) has no room for the few-shot examples.
    cfg = _tiny_cfg(tmp_path, llm={"model": "tiny-llama", "max_tokens": 6, "cache": False}, n_features=3,
                    texts=["prompts"], classify_few_shot=False, score_few_shot=False, n_score_snippets=2)
    cfg.models.tuned = None
    ctx = _run_stages(cfg, tiny_base, None)
    sec = json.loads((ctx.run_path / "results.json").read_text())["features"]
    assert sec["roles"] == ["base"] and sec["mmcs"] == {} and set(sec["saes"][sec["hooks"][0]]) == {"base"}
    whats = " ".join(s["what"] for s in sec["skipped"])
    assert "MMCS" in whats and "IRM alignment" in whats
    # A real (tiny, random) local LLM: its replies rarely parse, and each failure is on record.
    n_failed = sec["autointerp"]["parse"]["n_failed"]
    assert n_failed == len(sec["autointerp"]["parse"]["failures"])
    assert sec["autointerp"]["n_labelled"] + sec["autointerp"]["parse"]["counts"].get("label01", {}).get("failed", 0) \
        + sec["autointerp"]["parse"]["counts"].get("text", {}).get("failed", 0) == 3


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sae_on_smollm2_activations(smollm2, tmp_path):
    texts = default_prompts()[:120]
    hook = "blocks.15.hook_resid_post"
    store = capture_activations({"base": smollm2}, records_from_texts(texts), tmp_path / "s", hooks=[hook],
                                positions="all", batch_size=32)
    t = train_sae(store, "base", hook, SAETrainConfig(steps=300, batch_size=128), seed=0)
    assert t.metrics["explained_variance"] > 0.4, t.metrics  # an untrained SAE is near 0 or below
    assert 1 < t.metrics["l0"] < 200
    # BPE tokens carry their leading space; the marker goes around the word.
    table = TokenTable.from_texts(smollm2.tokenizer, texts, max_length=256).check(store.index())
    acts = encode_rows(t.sae, store.load("base", hook))
    j = int(torch.argmax((acts > 0).sum(0)))
    eligible = store.index()["pos"] >= 1
    from irm.features import feature_snippets

    snippets, _ = feature_snippets(table, acts, j, eligible=eligible, k=3)
    assert snippets and all("<<" in s and "<< " not in s for s in snippets)
    dirs = decoder_directions(t.sae)
    assert torch.allclose(dirs.norm(dim=1), torch.ones(len(dirs)), atol=1e-5)
