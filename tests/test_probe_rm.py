"""The IRM for any RM and as an RM of its own (issue #19): explicit word utilities from any RM, the
saved probe IRM as a reward model (`probe:` specs, `irm score`), guardrails before tuning, and a run's
saved config reproducing the run. Real tiny models, built locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.toml"
STAGES = ["reward", "tune", "pair", "evaluate", "divergence", "irm"]


def _run(run_dir: Path, config: Path = TINY, only=STAGES, **overrides):
    from irm.run.config import load_config
    from irm.run.pipeline import run_experiment

    cfg = load_config(config, overrides={"run_dir": str(run_dir), "tracking.mode": "disabled", **overrides})
    return run_experiment(cfg, only=list(only) if only else None)  # None: every stage


@pytest.fixture(scope="module")
def tiny_irm(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("probe") / "run"
    return _run(run_dir)


def _tiny_classifier(path: Path, seed: int = 0) -> Path:
    """A small random Llama sequence classifier (one scalar head) with the tiny word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from irm.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
def test_the_run_saves_its_linear_irm_and_it_loads_as_a_reward_model(tiny_irm):
    from irm.implicit.probe_rm import ProbeRM
    from irm.rewards import load_rm

    res = tiny_irm.run.results()["irm"]
    probe_dir = tiny_irm.run_path / "irm_probe"
    assert res["probe"]["path"] == str(probe_dir)
    assert (probe_dir / "probe.json").is_file() and (probe_dir / "probe.safetensors").is_file()
    rm = load_rm(f"probe:{probe_dir}")
    assert isinstance(rm, ProbeRM) and rm.name == "irm_linear"
    assert load_rm(str(probe_dir)).meta == rm.meta  # a probe directory is recognised without the prefix
    # The run hands the same probe on: the lookup table is gone.
    assert isinstance(tiny_irm.state["irms"]["irm_linear"], ProbeRM)
    assert "cv_tau_ci" in res["probe"] and isinstance(res["summary"]["irm_recovered"], bool)


def test_saved_probe_reproduces_the_in_run_word_utilities(tiny_irm):
    from irm.implicit.reconstruct import PROBE_KINDS, best
    from irm.rewards import load_rm

    data, results = tiny_irm.state["irm_data"], tiny_irm.state["irm_results"]
    src = best(results, PROBE_KINDS)
    rm = load_rm(f"probe:{tiny_irm.run_path / 'irm_probe'}")
    assert rm.meta.source == src.name
    test_ids = np.arange(len(data.words))[data.test][:25]
    words = [data.words[i] for i in test_ids]
    got = rm.utilities_of_words(words)
    np.testing.assert_allclose(got, src.pred_all[test_ids], rtol=1e-6, atol=1e-8)
    # And the words it never saw: any word gets a utility (no lookup table, no ties from coverage).
    unseen = ["xylophone", "table", "banana"]
    assert np.all(np.isfinite(rm.utilities_of_words(unseen)))


def test_irm_score_with_a_saved_probe_equals_the_in_run_scores(tiny_irm, tmp_path):
    samples = tiny_irm.state["samples"][:6]
    prompts = [s["prompt"] for s in samples] * 2
    responses = [s["base"] for s in samples] + [s["tuned"] for s in samples]
    in_run = tiny_irm.state["irms"]["irm_linear"].score(prompts, responses)
    assert np.ptp(in_run) > 0  # scores that vary: a real comparison, not zeros
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses)))
    out = tmp_path / "scores.jsonl"
    env = dict(os.environ, IRM_PROGRESS="0")
    p = subprocess.run([sys.executable, "-m", "irm.cli", "score", "--rm", f"probe:{tiny_irm.run_path / 'irm_probe'}",
                        "--rm", "vader", "--pairs", str(pairs), "--out", str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    np.testing.assert_allclose([r["irm_linear"] for r in rows], in_run, rtol=1e-9, atol=1e-12)
    assert [r["vader"] for r in rows] == pytest.approx(list(tiny_irm.rm.score(prompts, responses)))


def test_probe_token_utilities_are_per_word_and_sum_to_the_score(tiny_irm):
    rm = tiny_irm.state["irms"]["irm_linear"]
    prompts, responses = ["the movie was", "the movie was"], [" great and good fun", " ..."]
    tu = rm.token_utilities(prompts, responses)
    assert [w for w, _ in tu[0]] == ["great", "and", "good", "fun"] and tu[1] == []
    s = rm.score(prompts, responses)
    assert s[1] == 0.0
    total = sum(u for _, u in tu[0]) / rm.meta.scale
    assert s[0] == pytest.approx(np.clip(total, -rm.meta.clip, rm.meta.clip) if rm.meta.clip else total)


def test_a_probe_refuses_models_it_was_not_fitted_on(tiny_irm):
    from irm.implicit.probe_rm import ProbeRM
    from irm.models import ModelPair, load_model

    other = ModelPair(load_model("tiny-llama"), load_model("tiny-llama:seed=7"))
    with pytest.raises(ValueError, match="fingerprint"):
        ProbeRM.load(tiny_irm.run_path / "irm_probe", pair=other)


def test_saved_config_reloads_and_reproduces_the_run(tiny_irm, tmp_path):
    saved = tiny_irm.run_path / "config.json"
    again = _run(tmp_path / "again", config=saved)
    # Paths name each run's own directory; everything else must be the same.
    a = json.loads(json.dumps(tiny_irm.run.results()).replace(str(tiny_irm.run_path), "RUN"))
    b = json.loads(json.dumps(again.run.results()).replace(str(again.run_path), "RUN"))
    for key in ("data", "reward", "evaluation", "divergence"):
        assert a[key] == b[key], key
    assert a["irm"]["summary"] == b["irm"]["summary"]
    assert a["irm"]["sequence"] == b["irm"]["sequence"]
    assert a["tune"]["checkpoint"] == b["tune"]["checkpoint"]  # the same cached tuned model


# ----------------------------------------------------------------------------------------------
def test_classifier_word_utilities_match_a_hand_computation(tmp_path):
    from irm.rewards import load_rm
    from irm.rewards.utilities import NEUTRAL_WORDS, word_utilities

    rm = load_rm(f"classifier:{_tiny_classifier(tmp_path / 'clf')}")
    templates = ["the movie was {w}", "today was {w}", "i thought it was {w}"]
    words = ["great", "awful", "boring"]
    wu = word_utilities(rm, words, templates=templates)
    assert wu.method == "templates"
    for i, w in enumerate(words):
        diffs = []
        for t in templates:
            s_w = rm.score([""], [t.replace("{w}", w)])[0]
            s_n = np.mean([rm.score([""], [t.replace("{w}", n)])[0] for n in NEUTRAL_WORDS])
            diffs.append(s_w - s_n)
        # Batched and one-by-one float32 forward passes differ by float noise (~1e-7).
        assert wu.values[i] == pytest.approx(np.mean(diffs), rel=1e-4, abs=1e-6)
        assert wu.spread[i] == pytest.approx(np.std(diffs, ddof=1), rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_the_whole_pipeline_runs_with_a_classifier_rm(tmp_path):
    clf = _tiny_classifier(tmp_path / "clf")
    ctx = _run(tmp_path / "run", only=None,
               **{"reward.kind": "classifier", "reward.params": {"path": str(clf)}, "tune.steps": 4,
                  "irm.templates": "everyday"})
    res = ctx.run.results()
    assert not [k for k in res if k.startswith("error_")]
    irm = res["irm"]
    assert "skipped" not in irm
    assert irm["explicit_utilities"]["method"] == "templates"
    assert irm["templates"][0] == "Today was {w}"
    assert {s["kind"] for s in irm["sources"]} >= {"logratio", "probe:logratio", "probe:triple", "ceiling"}
    assert "auc" in irm["summary"]["best_unsupervised"]
    assert (ctx.run_path / "irm_probe" / "probe.json").is_file()
    assert "irm_linear" in json.dumps(res["contrastive"])  # the probe IRM is explained too
    assert "features" in res and "capture" in res
    assert "## irm" in (ctx.run_path / "report.md").read_text()


def test_a_too_small_lexicon_fails_before_tuning_naming_the_setting(tmp_path):
    from irm.rewards import TokenUtilityRM
    from irm.run.config import ConfigError

    vader = TokenUtilityRM.from_vader()
    words = vader.alphabetic_words()[:: len(vader.alphabetic_words()) // 40][:40]
    lex = tmp_path / "small.tsv"
    lex.write_text("".join(f"{w}\t{vader.table[w]}\n" for w in words))
    with pytest.raises(ConfigError, match=r"irm\.test_fraction"):
        _run(tmp_path / "run", **{"reward.params": {"path": str(lex)}})
    # Nothing ran, not even the run directory: the check came before the reward, the tuning and all else.
    assert not (tmp_path / "run").exists()


def test_sequence_level_probes_are_compared_with_the_explicit_rm(tiny_irm):
    sp = tiny_irm.run.results()["irm"]["sequence_probes"]
    assert sp["n_test_prompts"] >= 3 and sp["n_test_texts"] < sp["n_texts"]
    kinds = {s["kind"] for s in sp["sources"]}
    assert kinds >= {"logratio", "probe:logratio", "probe:contrast", "ceiling", "control"}
    for k in ("linear_irm", "logratio_direct", "ceiling", "control"):
        row = sp["summary"][k]
        acc = row["pairwise_accuracy"]
        assert 0.0 <= acc["value"] <= 1.0 and acc["low"] <= acc["value"] <= acc["high"], (k, acc)
    # The supervised ceiling reads the explicit RM off the activations; the unsupervised IRM never saw it.
    assert sp["summary"]["ceiling"]["supervised"] and not sp["summary"]["linear_irm"]["supervised"]
    from irm.run.report import write_report

    report = write_report(tiny_irm.run_path).read_text()
    assert "Probes on whole responses" in report and "linear IRM (unsupervised)" in report


def test_sequence_agreement_sets_the_irms_beside_the_base_controls(tiny_irm):
    seq = tiny_irm.run.results()["irm"]["sequence"]
    assert {"irm_linear", "irm_logratio", "control_logprob", "control_probe"} <= set(seq)
    assert seq["control_logprob"]["control"] and seq["control_probe"]["control"] and not seq["irm_linear"]["control"]
    n = seq["n_prompts"]
    for name in ("irm_linear", "irm_logratio", "control_logprob", "control_probe"):
        r = seq[name]
        m = r["pairwise_agreement_ci"]
        assert m["low"] <= m["value"] <= m["high"] and m["value"] == r["pairwise_agreement_ties_half"], name
        w = r["within_model"]["tuned"]
        assert w["n_pairs"] <= n * (n - 1) // 2 and 0 <= w["pairwise_accuracy"]["value"] <= 1, name
    for which in ("base_vs_tuned", "within_tuned"):
        row = seq["summary"][which]["irm_linear"]
        assert row["control"] in ("control_logprob", "control_probe")
        assert row["control_value"] == max(seq[c]["pairwise_agreement_ci"]["value"] if which == "base_vs_tuned"
                                           else seq[c]["within_model"]["tuned"]["pairwise_accuracy"]["value"]
                                           for c in ("control_logprob", "control_probe"))
        assert row["above_control"] == (row["difference"]["low"] > 0)
    from irm.run.report import write_report

    report = write_report(tiny_irm.run_path).read_text()
    assert "control_logprob (control)" in report and "tuned vs tuned" in report


def test_pair_accuracy_counts_prompts_ties_and_skips_explicit_ties():
    from irm.implicit.sequence import _pair_accuracy

    y = np.array([0.0, 1.0, 2.0, 1.0, 3.0, 3.0, 0.0, 1.0])
    p = np.array([0.0, 5.0, 9.0, 1.0, 1.0, 2.0, 4.0, 4.0])
    g = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    acc, n, ties = _pair_accuracy(y, p, g)
    # prompt 0 agrees, 1 agrees (both decreasing), 2 is an explicit tie (left out), 3 is a source tie (1/2)
    assert (n, ties) == (3, 1) and acc == pytest.approx(2.5 / 3)


def _loop_by_prompt_ci(y, p, group, *, n_boot, seed):
    """The resampling loop the vectorised CI replaces (prompts drawn with replacement, metric recomputed)."""
    from irm.implicit.sequence import _pair_accuracy

    rng = np.random.default_rng(seed)
    gs = np.unique(group)
    rows = {g: np.nonzero(group == g)[0] for g in gs}
    vals = []
    for _ in range(n_boot):
        pick = rng.choice(gs, size=len(gs), replace=True)
        idx = np.concatenate([rows[g] for g in pick])
        new_group = np.concatenate([np.full(len(rows[g]), k) for k, g in enumerate(pick)])
        v = _pair_accuracy(y[idx], p[idx], new_group)[0]
        if np.isfinite(v):
            vals.append(v)
    return np.quantile(vals, [0.025, 0.975])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prompt_bootstrap_equals_the_resampling_loop(seed):
    from irm.implicit.sequence import _by_prompt_ci, _pair_accuracy

    rng = np.random.default_rng(seed)
    # 25 two-response prompts, a one-response prompt and a three-response one (never counted), shuffled.
    g = np.concatenate([np.repeat(np.arange(25), 2), [90, 91, 91, 91]])
    rng.shuffle(g)
    y = rng.integers(-2, 3, len(g)).astype(float)
    p = y + rng.normal(0, 1.5, len(g))
    p[::6] = p[0]  # some ties of the prediction
    got = _by_prompt_ci(y, p, g, n_boot=400, seed=seed)
    assert got["value"] == _pair_accuracy(y, p, g)[0] and got["n"] == 27
    assert [got["low"], got["high"]] == pytest.approx(_loop_by_prompt_ci(y, p, g, n_boot=400, seed=seed), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_auc_bootstrap_vectorised_equals_the_loop(seed):
    import probes.metrics as pm
    from irm.implicit.reconstruct import auc
    from probes import bootstrap_ci

    rng = np.random.default_rng(seed)
    y = rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0], 120)
    p = y + rng.normal(0, 1, 120)
    p[::4] = np.round(p[::4])  # ties across classes
    fast = bootstrap_ci(auc, y, p, n_boot=300, seed=seed)
    weighted = pm._WEIGHTED.pop(auc)
    try:
        slow = bootstrap_ci(auc, y, p, n_boot=300, seed=seed)
    finally:
        pm._WEIGHTED[auc] = weighted
    assert fast.value == slow.value
    assert (fast.low, fast.high) == pytest.approx((slow.low, slow.high), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# The shared log-probability memo (irm.models.memo): one forward pass serves the probe, the log-ratio
# IRM and the fluency check.
def _texts(tiny_irm):
    samples = tiny_irm.state["samples"][:5]
    prompts = [s["prompt"] for s in samples] * 2
    return prompts, [s["base"] for s in samples] + [s["tuned"] for s in samples]


def test_logratio_reads_what_the_probe_capture_left_and_scores_the_same(tiny_irm, monkeypatch):
    import irm.implicit.logratio as lr
    from irm.models.memo import logprob_memo, sharing_logprobs

    probe, logratio = tiny_irm.state["irms"]["irm_linear"], tiny_irm.state["irms"]["irm_logratio"]
    pair = probe.pair
    prompts, responses = _texts(tiny_irm)
    plain = logratio.score(prompts, responses)
    probe_plain = probe.score(prompts, responses)
    calls = []
    real = lr.response_logprobs
    monkeypatch.setattr(lr, "response_logprobs", lambda m, p, r, **kw: calls.append(m) or real(m, p, r, **kw))
    with sharing_logprobs(pair.base, pair.tuned):
        np.testing.assert_array_equal(probe.score(prompts, responses), probe_plain)  # activations unchanged
        memo = logprob_memo(pair.base)
        assert memo is not None and (prompts[0], responses[0]) in memo
        shared = logratio.score(prompts, responses)
    # The log-ratio IRM ran no model the probe reads (their texts came from the probe's capture), only the
    # other one (the tiny run's probe reads the base model alone).
    assert probe.meta.roles and set(map(id, calls)) == {id(getattr(pair, r)) for r in ("base", "tuned")
                                                        if r not in probe.meta.roles}
    np.testing.assert_allclose(shared, plain, rtol=1e-5, atol=1e-6)
    assert logprob_memo(pair.base) is None and logprob_memo(pair.tuned) is None  # gone with the block
    # Each entry equals the log-ratio path's own sum over the response tokens.
    other = next(r for r in ("base", "tuned") if r not in probe.meta.roles or len(probe.meta.roles) == 2)
    with sharing_logprobs(getattr(pair, other)):
        probe.score(prompts[:1], responses[:1])  # a probe model without a memo: the probe leaves nothing
        assert logprob_memo(getattr(pair, other)) == {}


def test_logprob_sums_store_only_untruncated_texts_and_fluency_reuses_them(tiny_irm, monkeypatch):
    import irm.implicit.logratio as lr
    from irm.contrastive.fluency import LMFluency
    from irm.models.memo import logprob_memo, sharing_logprobs

    base = tiny_irm.state["irms"]["irm_linear"].pair.base
    prompts, responses = _texts(tiny_irm)
    lps = lr.response_logprobs(base, prompts, responses)
    with sharing_logprobs(base):
        sums, counts = lr.response_logprob_sums(base, prompts, responses)
        np.testing.assert_allclose(sums, [lp.sum() for lp in lps], rtol=1e-12)
        assert list(counts) == [len(lp) for lp in lps]
        n_tok = len(base.tokenizer(prompts[0] + responses[0])["input_ids"])
        lr.response_logprob_sums(base, ["a b c d e f g h"], [" i j k l"], max_length=4)  # cut at 4 tokens
        assert ("a b c d e f g h", " i j k l") not in logprob_memo(base)
        monkeypatch.setattr(lr, "response_logprobs", lambda *a, **k: pytest.fail("the memo should serve these"))
        ppl = LMFluency(base, cache=False).perplexity(prompts, responses)
        np.testing.assert_allclose(ppl, np.exp(-sums / counts), rtol=1e-12)
        # A reader with a smaller max_length than a stored text computes that text itself.
        monkeypatch.setattr(lr, "response_logprobs", lambda m, p, r, **kw: [np.zeros(1)] * len(p))
        got, _ = lr.response_logprob_sums(base, prompts[:1], responses[:1], max_length=n_tok - 1)
        assert got[0] == 0.0
