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


def test_pair_accuracy_counts_prompts_ties_and_skips_explicit_ties():
    from irm.implicit.sequence import _pair_accuracy

    y = np.array([0.0, 1.0, 2.0, 1.0, 3.0, 3.0, 0.0, 1.0])
    p = np.array([0.0, 5.0, 9.0, 1.0, 1.0, 2.0, 4.0, 4.0])
    g = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    acc, n, ties = _pair_accuracy(y, p, g)
    # prompt 0 agrees, 1 agrees (both decreasing), 2 is an explicit tie (left out), 3 is a source tie (1/2)
    assert (n, ties) == (3, 1) and acc == pytest.approx(2.5 / 3)
