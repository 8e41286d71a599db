from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from irm.rewards import (
    BaseRewardModel,
    Preference,
    RewardModel,
    SequenceClassifierRM,
    TokenUtilityRM,
    build_reward_model,
    load_lexicon,
)


def test_vader_reward_is_sum_over_five_and_scores_prompt():
    rm = TokenUtilityRM.from_vader()
    assert len(rm.table) > 7000
    great, joy = rm.table["great"], rm.table["joy"]
    assert rm.score(["The film was"], ["a great joy"])[0] == pytest.approx((great + joy) / 5)
    # The prompt is scored too (the paper's choice), unless switched off.
    assert rm.score(["A great"], ["film"])[0] == pytest.approx(great / 5)
    assert TokenUtilityRM.from_vader(score_prompt=False).score(["A great"], ["film"])[0] == 0.0
    # Case and punctuation: "GREAT!" is "great"; an emoticon matches as written.
    assert rm.score([""], ["GREAT!"])[0] == pytest.approx(great / 5)
    assert rm.score([""], [":)"])[0] == pytest.approx(rm.table[":)"] / 5)


def test_clipping_and_custom_tsv(tmp_path):
    p = tmp_path / "lex.tsv"
    p.write_text("word\tutility\nzap\t30\nboo\t-2.5\n")
    rm = TokenUtilityRM.from_tsv(p)
    assert rm.name == "lex"
    assert rm.score(["zap zap"], ["zap"])[0] == 10.0  # 90 / 5 = 18, clipped
    assert rm.score([""], ["boo"])[0] == pytest.approx(-0.5)
    assert build_reward_model("lexicon", path=str(p)).table == {"zap": 30.0, "boo": -2.5}


def test_bad_lexicons_are_rejected(tmp_path):
    p = tmp_path / "bad.tsv"
    p.write_text("good\t1\nbad\tnotanumber\n")
    with pytest.raises(ValueError, match="bad.tsv:2: utility 'notanumber'"):
        load_lexicon(p)
    (tmp_path / "empty.tsv").write_text("\n")
    with pytest.raises(ValueError, match="holds no"):
        load_lexicon(tmp_path / "empty.tsv")
    with pytest.raises(ValueError, match="must be finite"):
        TokenUtilityRM({"x": float("nan")})
    with pytest.raises(ValueError, match="Unknown reward model kind 'lexicom'.*Did you mean 'lexicon'"):
        build_reward_model("lexicom")


def test_compare_and_trl_signature():
    rm = TokenUtilityRM.from_vader()
    assert isinstance(rm, RewardModel)
    pref = rm.compare("The film was", "wonderful", "awful")
    assert isinstance(pref, Preference) and pref.preferred == "a" and pref.margin > 0
    # trl calls reward functions with plain strings or chat messages.
    out = rm(prompts=["It was", [{"role": "user", "content": "It was"}]],
             completions=["great", [{"role": "assistant", "content": "terrible"}]], completion_ids=None)
    assert out[0] > 0 > out[1] and all(isinstance(v, float) for v in out)
    assert rm.__name__ == "vader"
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rm.score(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="single string"):
        rm.score("a", "b")


def test_nan_rewards_never_reach_training():
    class Broken(BaseRewardModel):
        name = "broken"

        def score(self, prompts, responses):
            return np.array([1.0, math.nan])

    with pytest.raises(FloatingPointError, match="non-finite rewards at positions \\[1\\]"):
        Broken()(["a", "b"], ["c", "d"])


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from irm.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=2, pad_token_id=tok.pad_token_id,
                      id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = LlamaForSequenceClassification(cfg)
    path = tmp_path_factory.mktemp("clf")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_sequence_classifier_rm_on_a_local_model(tiny_classifier):
    with pytest.raises(ValueError, match="say which one is the reward"):
        SequenceClassifierRM.from_pretrained(str(tiny_classifier))
    rm = build_reward_model("classifier", path=str(tiny_classifier), label="positive", input_format="concat",
                            batch_size=2)
    prompts, responses = ["the movie was", "i think", "it"], ["great", "it was a bad film", "ok"]
    got = rm.score(prompts, responses)
    # Same numbers as running the classifier by hand, one text at a time (so batching/padding is right).
    for p, r, g in zip(prompts, responses, got):
        enc = rm.tokenizer(p + r, return_tensors="pt")
        ref = rm.model(**enc).logits[0, 1].item()
        assert g == pytest.approx(ref, abs=1e-5)
    assert rm(["the movie was"], ["great"]) == [pytest.approx(got[0], abs=1e-6)]
    with pytest.raises(ValueError, match="valid labels are"):
        SequenceClassifierRM.from_pretrained(str(tiny_classifier), label="joy")


def test_classifier_rm_missing_model_says_how_to_fix(tmp_path):
    with pytest.raises(OSError, match="Point `path` at a directory"):
        SequenceClassifierRM.from_pretrained(str(tmp_path / "nothing-here"))
