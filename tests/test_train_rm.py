"""Training a reward model on human preference pairs (irm.rewards.train), its pipeline stages (train_rm,
humans) and the `irm train-rm` / `irm eval-rm` commands. Real MiniLM, few pairs, few steps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from irm.rewards.train import META_FILE, TrainRMConfig, minilm_dir, rm_key, train_reward_model

REPO = Path(__file__).resolve().parents[1]

# Small: 48 tweet pairs, 3 steps of 16. Checks the mechanics, not the quality.
SMALL = dict(corpora=["tweets"], pairs_per_corpus=48, eval_pairs_per_corpus=16, batch_size=16, max_length=40,
             eval_steps=0, logging_steps=1)


@pytest.fixture(scope="module")
def data():
    from test_human_data import ensure_human_data

    return ensure_human_data()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("rmcache")
    rows: list[dict] = []
    t0 = time.perf_counter()
    res = train_reward_model(TrainRMConfig(**SMALL), cache_root=cache, on_log=rows.append)
    return res, cache, rows, time.perf_counter() - t0


@pytest.mark.parametrize("kw, match", [
    (dict(corpora=["tweet"]), "corpora"), (dict(corpora=[]), "corpora"), (dict(margin=-0.1), "margin"),
    (dict(pairs_per_corpus=0), "pairs_per_corpus"), (dict(learning_rate=0), "learning_rate"),
    (dict(backbone=""), "backbone"), (dict(irm_eval_corpora=["imdb"]), "irm_eval_corpora")])
def test_config_errors_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainRMConfig(**kw)


def test_the_key_covers_what_changes_the_model_only():
    d = minilm_dir()
    base = rm_key(TrainRMConfig(), d)
    assert rm_key(TrainRMConfig(n_boot=10, evaluate=False, enabled=True, eval_corpora=["nyt"]), d) == base
    for kw in (dict(margin=1.0), dict(pairs_per_corpus=10), dict(seed=1), dict(with_prompt=True),
               dict(corpora=["tweets"]), dict(learning_rate=1e-5)):
        assert rm_key(TrainRMConfig(**kw), d) != base, kw


def test_a_bad_backbone_fails_before_training(data, tmp_path):
    with pytest.raises(ValueError, match="neither 'minilm' nor a directory"):
        train_reward_model(TrainRMConfig(backbone="no-such-model", **{k: v for k, v in SMALL.items()}),
                           cache_root=tmp_path)
    assert not (tmp_path / "rm").exists()


def test_training_saves_a_plain_classifier_checkpoint(trained):
    from irm.rewards import SequenceClassifierRM, load_rm

    res, cache, rows, _ = trained
    assert not res.reused and res.checkpoint == cache / "rm" / res.key
    meta = json.loads((res.checkpoint / META_FILE).read_text())
    assert meta["data"]["n_train_pairs"] == 48 and meta["steps"] == 3 and meta["input_format"] == "concat"
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and "eval_accuracy" in meta["validation"]
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(res.checkpoint))
    assert cfg.architectures == ["BertForSequenceClassification"] and cfg.num_labels == 1
    rm = load_rm(f"classifier:{res.checkpoint}?input_format=concat&max_length=40")
    assert isinstance(rm, SequenceClassifierRM)
    a = rm.score(["", ""], ["What a wonderful day, I love it!", "What a wonderful day, I love it!"])
    b = res.load().score(["", ""], ["What a wonderful day, I love it!", "This is awful, I hate it."])
    assert a[0] == pytest.approx(a[1]) and a[0] == pytest.approx(b[0], abs=1e-5)


def test_a_second_call_reuses_the_cache(trained):
    res, cache, _, first = trained
    t0 = time.perf_counter()
    again = train_reward_model(TrainRMConfig(**{**SMALL, "n_boot": 7}), cache_root=cache)
    assert again.reused and again.checkpoint == res.checkpoint and time.perf_counter() - t0 < max(5.0, first / 2)


def test_eval_rm_command(data, tmp_path, capsys):
    from irm.cli import main

    out = tmp_path / "ev.json"
    assert main(["eval-rm", "--rm", "vader", "--rm", "vader_analyzer", "--corpora", "tweets", "--n-boot", "50",
                 "--out", str(out), "--plot", str(tmp_path / "ev.png")]) == 0
    printed = capsys.readouterr().out
    assert "pairwise accuracy" in printed and "vader_analyzer\ttweets\t873" in printed
    res = json.loads(out.read_text())
    assert set(res["rms"]) == {"vader", "vader_analyzer"} and (tmp_path / "ev.png").is_file()
    assert main(["eval-rm", "--rm", "no/such/dir/x.tsv", "--corpora", "tweets"]) == 2
    assert main(["eval-rm", "--rm", "vader", "--corpora", "imdb"]) == 2
    assert "the corpora are" in capsys.readouterr().err


@pytest.mark.slow
def test_learned_rm_tiny_pipeline(data, tmp_path, monkeypatch):
    """experiments/learned_rm_tiny.toml through the stages that make and read the pair: the trained RM is the
    explicit RM the tiny Llama is tuned against, and it, VADER and the IRMs are measured against the humans."""
    from irm.run.config import load_config
    from irm.run.pipeline import run_experiment

    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "experiments" / "learned_rm_tiny.toml")
    ctx = run_experiment(cfg, only=["reward", "train_rm", "tune", "pair", "irm", "humans", "report"])
    res = json.loads(ctx.run.results_path.read_text())
    assert res["reward"]["kind"] == "classifier" and res["reward"]["name"] == "learned_rm"
    ev = res["train_rm"]["human_eval"]
    assert set(ev["rms"]) == {"vader_analyzer", "lexicon", "learned_rm"} and set(ev["corpora"]) == {"tweets"}
    assert set(res["humans"]["rms"]) == {"explicit_rm", "irm_logratio", "irm_linear"}
    assert res["tune"]["checkpoint"]
    report = (ctx.run_path / "report.md").read_text()
    assert "human_eval.png" in report and "learned_rm" in report


def test_a_decoder_backbone_gets_a_last_token_scalar_head(data, tmp_path):
    """The LLM-style RM (SmolLM2 in practice; the tiny Llama here): a decoder with a scalar head on the last
    token, trained and loaded the same way."""
    from irm.models.loading import resolve_checkpoint

    _, ckpt = resolve_checkpoint("tiny-llama")
    res = train_reward_model(TrainRMConfig(**{**SMALL, "backbone": "tiny-llama", "learning_rate": 1e-3}),
                             cache_root=tmp_path, backbone_dir=ckpt)
    rm = res.load()
    assert type(rm.model).__name__ == "LlamaForSequenceClassification" and rm.model.config.pad_token_id is not None
    s = rm.score(["", "", ""], ["a good movie", "a good movie and more words here", "a good movie"])
    assert s.shape == (3,) and s[0] == pytest.approx(s[2]) and len(set(s.round(6))) == 2


def test_train_rm_command(data, tmp_path, capsys):
    from irm.cli import main

    cfg = str(REPO / "experiments" / "learned_rm_tiny.toml")
    assert main(["train-rm", cfg, "--set", f"run_dir={tmp_path}/{{name}}", "--set", "train_rm.n_boot=50"]) == 0
    out = capsys.readouterr().out
    assert "learned_rm\ttweets\t873" in out and "Reward model: " in out and 'input_format = "concat"' in out
    res = json.loads((tmp_path / "learned_rm_tiny" / "results.json").read_text())
    assert Path(res["train_rm"]["checkpoint"]).is_dir() and "reward" in res
    assert main(["train-rm", cfg, "--set", "train_rm.corpora=['imdb']"]) == 2
    assert "corpora" in capsys.readouterr().err
