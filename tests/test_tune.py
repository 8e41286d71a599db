"""RLHF tuning with trl: the tiny Llama learns a planted lexicon reward; caching, RLOO, config safety.

The tiny model's vocabulary is words, so a lexicon reward on a set of words is something it can find:
a random set of 200 words worth +3 each, which the near-uniform random model emits about 2.6% of
the time, is learned in a few seconds with a high learning rate.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from irm.data import default_prompts
from irm.models import ModelPair, load_model
from irm.pair.tune import (
    CURVES_JSON,
    SPLIT_JSON,
    TUNE_CONFIG_JSON,
    TuneConfig,
    ZeroRewardVarianceWarning,
    _Budget,
    _trainer_args,
    reward_model_identity,
    tune,
    tune_key,
    zero_variance_flag,
)
from irm.rewards import TokenUtilityRM

TINY = "tiny-llama:n_layers=2"
# Fast settings for the tiny model: short completions, 4 prompts x 8 generations per step.
TINY_KW = dict(max_new_tokens=8, prompts_per_step=4, num_generations=8, eval_every=0, eval_prompts=16)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private IRM cache (tiny model checkpoints) for this module, and one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting on a shared CPU
    root = tmp_path_factory.mktemp("irmcache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IRM_CACHE_DIR", str(root))
        mp.setenv("IRM_PROGRESS", "0")
        yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted(cache):
    """+3 on 200 random words of the tiny vocabulary; the response alone is scored."""
    tok = load_model(TINY).tokenizer
    words = sorted(w for w in tok.get_vocab() if w.isalpha())
    random.Random(0).shuffle(words)
    return TokenUtilityRM({w: 3.0 for w in words[:200]}, score_prompt=False, name="planted")


@pytest.fixture(scope="module")
def tuned(cache, planted, tmp_path_factory):
    from irm.run.tracking import Tracker

    run_dir = tmp_path_factory.mktemp("run")
    cfg = TuneConfig(steps=12, learning_rate=0.1, **TINY_KW)
    t0 = time.perf_counter()
    with Tracker.open({}, run_dir=run_dir, mode="disabled") as tracker:
        res = tune(TINY, planted, default_prompts(), cfg, cache_root=cache, run_dir=run_dir, tracker=tracker)
    return res, run_dir, time.perf_counter() - t0


# --------------------------------------------------------------------------- config
def test_defaults_are_the_measured_recipe():
    c = TuneConfig()
    assert (c.algorithm, c.steps, c.learning_rate, c.beta) == ("grpo", 30, 1e-4, 0.04)
    assert (c.num_generations, c.prompts_per_step, c.batch_size, c.max_new_tokens) == (8, 2, 16, 20)
    assert (c.top_k, c.top_p, c.temperature, c.lora) == (0, 1.0, 1.0, False)
    assert TuneConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(beta=0.0), "beta"),
        (dict(num_generations=1), ">= 2"),
        (dict(algorithm="ppo"), "'grpo'"),
        (dict(held_out_fraction=1.0), "held_out_fraction"),
        (dict(steps=0), "steps"),
        (dict(top_p=0.0), "top_p"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(max_kl_per_token=0.0), "max_kl_per_token"),
        (dict(max_kl_per_token=float("nan")), "max_kl_per_token"),
        (dict(max_kl_per_token=0.5, eval_every=0), "eval_every >= 1"),
        (dict(stop_on_over_optimised=True, eval_every=0), "eval_every >= 1"),
    ],
)
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        TuneConfig(**kw)
    with pytest.raises(ValueError, match="Unknown TuneConfig field"):
        TuneConfig.from_dict({"stepz": 3})


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trainer_args_override_unsafe_trl_defaults(tmp_path, algorithm):
    cfg = TuneConfig(algorithm=algorithm)
    args = _trainer_args(cfg, tmp_path, torch.device("cpu"), disable_tqdm=True)
    assert args.beta == 0.04 and args.learning_rate == 1e-4 and args.max_completion_length == 20
    assert args.bf16 is False and args.fp16 is False and args.gradient_checkpointing is False
    assert args.per_device_train_batch_size == 16 and args.num_generations == 8  # batch counts completions
    assert args.report_to == [] or args.report_to == ["none"]
    assert (args.top_k, args.top_p, args.temperature, args.seed) == (0, 1.0, 1.0, 0)
    assert args.max_steps == 30 and args.save_strategy == "no"


def test_cache_key_covers_what_determines_the_weights(planted):
    base = {"kind": "tiny", "fingerprint": "abc"}
    rm_id = reward_model_identity(planted)
    k = tune_key(base, rm_id, TuneConfig(), "p")
    assert k == tune_key(base, rm_id, TuneConfig(), "p")
    assert k == tune_key(base, rm_id, TuneConfig(eval_every=3, final_eval=False, save_every=5), "p")
    assert k != tune_key(base, rm_id, TuneConfig(steps=29), "p")
    assert k != tune_key(base, rm_id, TuneConfig(seed=1), "p")
    assert k != tune_key({"kind": "tiny", "fingerprint": "abd"}, rm_id, TuneConfig(), "p")
    assert k != tune_key(base, rm_id, TuneConfig(), "q")
    other = TokenUtilityRM({**planted.table, "zzz": 1.0}, score_prompt=False, name="planted")
    assert k != tune_key(base, reward_model_identity(other), TuneConfig(), "p")
    with pytest.warns(UserWarning, match="no identity"):
        reward_model_identity(lambda prompts, completions, **kw: [0.0] * len(prompts))


def test_budget_options_enter_the_key_only_when_on(planted):
    # The key of every config without a budget is what it was before the budget existed (cached models
    # of experiments/default.toml stay valid): exactly these fields, with their values.
    assert set(TuneConfig().key_dict()) == {
        "algorithm", "steps", "learning_rate", "lr_scheduler", "beta", "num_generations", "prompts_per_step",
        "max_new_tokens", "temperature", "top_k", "top_p", "max_grad_norm", "lora", "lora_r", "lora_alpha", "seed",
        "held_out_fraction"}
    base = {"kind": "tiny", "fingerprint": "abc"}
    rm_id = reward_model_identity(planted)
    k = tune_key(base, rm_id, TuneConfig(), "p")
    assert k == tune_key(base, rm_id, TuneConfig(max_kl_per_token=None, stop_on_over_optimised=False), "p")
    budget = tune_key(base, rm_id, TuneConfig(max_kl_per_token=0.5), "p")
    assert budget != k and budget != tune_key(base, rm_id, TuneConfig(max_kl_per_token=0.6), "p")
    assert tune_key(base, rm_id, TuneConfig(max_kl_per_token=1), "p") == tune_key(
        base, rm_id, TuneConfig(max_kl_per_token=1.0), "p")
    assert tune_key(base, rm_id, TuneConfig(stop_on_over_optimised=True), "p") not in (k, budget)
    # With a budget the checks pick the kept step: their schedule and samples change the weights.
    assert budget != tune_key(base, rm_id, TuneConfig(max_kl_per_token=0.5, eval_every=5), "p")
    assert budget != tune_key(base, rm_id, TuneConfig(max_kl_per_token=0.5, eval_prompts=8), "p")
    assert budget == tune_key(base, rm_id, TuneConfig(max_kl_per_token=0.5, final_eval=False, save_every=3), "p")


def test_budget_keeps_the_last_check_within_it():
    """_Budget on a toy module: each reason stops, step 0 always passes, restore puts the kept weights back."""
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen parameters are not copied (LoRA: only the adapter trains)
    ok = {"flag_over_optimised": False, "reasons": []}
    loops = {"flag_over_optimised": True, "reasons": ["rep-2 0.300 > max(2 x base 0.010, base + 0.05)"]}
    budget = _Budget(TuneConfig(max_kl_per_token=0.5, stop_on_over_optimised=True, eval_every=2))
    assert budget.check(model, 0, 0.9, loops)  # step 0 is the base: within budget whatever the noise says
    with torch.no_grad():
        model.weight.add_(1.0)
    kept = model.weight.detach().clone()
    assert budget.check(model, 2, 0.4, ok) and budget.kept_step == 2
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not budget.check(model, 4, 0.7, ok)
    assert budget.stop_step == 4 and budget.stop_reason == "max_kl_per_token" and budget.kept_step == 2
    assert "0.7 nats/token > max_kl_per_token 0.5" in budget.stop_message and "step 2" in budget.stop_message
    budget.restore(model)
    assert torch.equal(model.weight, kept)
    assert [c["within_budget"] for c in budget.checks] == [True, True, False]

    looping = _Budget(TuneConfig(stop_on_over_optimised=True, eval_every=2))
    assert looping.check(model, 0, None, ok) and looping.check(model, 2, 9.0, ok)  # no KL budget: KL is free
    assert not looping.check(model, 4, 0.1, loops) and looping.stop_reason == "over_optimised"
    assert "rep-2 0.300" in looping.stop_message and looping.kept_step == 2


def test_zero_variance_flag_criterion():
    def step(i, std, frac=None):
        return {"step": i, "reward_mean": 0.0, "reward_std": 0.0, "reward_group_std_max": std,
                "frac_reward_zero_std": frac}

    flat = [step(i, 0.0) for i in range(1, 6)]
    flag = zero_variance_flag(flat, 5, 8)
    assert flag["first_steps"] == 5 and flag["zero_variance_steps"] == 5 and "never elicit" in flag["message"]
    assert zero_variance_flag(flat[:4], 5, 8) is None  # too few steps to judge
    # One group that varies in one of the first steps is a learning signal: no flag.
    assert zero_variance_flag([*flat[:2], step(3, 0.5), *flat[3:]], 5, 8) is None
    assert zero_variance_flag([step(i, 1e-7) for i in range(1, 6)], 5, 8) is not None  # near zero is zero
    # Records without the RM's own spread: trl's share of zero-std groups, then the batch std.
    assert zero_variance_flag([step(i, None, 1.0) for i in range(1, 6)], 5) is not None
    assert zero_variance_flag([step(i, None, 0.75) for i in range(1, 6)], 5) is None
    old = [{"step": i, "reward_mean": 1.0, "reward_std": 0.0} for i in range(1, 4)]
    assert zero_variance_flag(old, 3) is not None
    assert zero_variance_flag([{**r, "reward_std": 0.3} for r in old], 3) is None


# --------------------------------------------------------------------------- tuning the tiny model
def test_tiny_tune_learns_the_planted_reward(tuned, cache):
    res, _, _ = tuned
    assert not res.reused  # (its wall time is reported by the fixture, not asserted: machines vary)
    ev = res.evaluation
    # Held-out prompts: the tuned model's samples score far above the base's.
    assert ev["reward"]["tuned"]["mean"] > ev["reward"]["base"]["mean"] + 1.0
    assert ev["reward"]["effect_size"] > 2.0 and ev["reward"]["effect_size_ci"][0] > 1.0
    assert ev["kl_per_token"]["mean"] > 0
    held = [c for c in res.curves if "held_out_reward_mean" in c]
    assert [c["step"] for c in held] == [0, 12]
    assert held[-1]["held_out_reward_mean"] > held[0]["held_out_reward_mean"] + 1.0
    # A reward that varies raises no flag; without a budget the last step is the one kept.
    assert res.flags == {} and res.outcome["checks"] == []
    assert (res.kept_step, res.outcome["stopped_early"], res.outcome["stop_reason"]) == (12, False, None)
    assert all(c["reward_group_std_max"] > 0 for c in res.curves if "reward_mean" in c)


def test_tiny_tune_changed_the_parameters(tuned):
    res, _, _ = tuned
    pair = ModelPair(load_model(TINY), load_model(str(res.checkpoint)))
    base_sd = pair.base.hf_model.state_dict()
    diffs = {k: float((v - base_sd[k]).abs().max()) for k, v in pair.tuned.hf_model.state_dict().items()}
    assert diffs["lm_head.weight"] > 1e-3
    assert sum(d > 0 for d in diffs.values()) >= len(diffs) // 2  # full fine-tuning moves most tensors


def test_tiny_tune_saves_its_record(tuned, cache):
    res, run_dir, _ = tuned
    out = res.checkpoint
    assert out == cache / "tuned" / res.key and not (cache / "tuned" / f"{res.key}.partial").exists()
    record = json.loads((out / TUNE_CONFIG_JSON).read_text())
    assert record["seed"] == 0 and record["config"]["steps"] == 12 and record["rm"]["name"] == "planted"
    assert record["base"]["spec"] == TINY and record["versions"]["trl"] != "not installed"
    split = json.loads((out / SPLIT_JSON).read_text())
    prompts = default_prompts()
    assert not set(split["train"]) & set(split["held_out"])
    assert sorted(split["train"] + split["held_out"]) == sorted(prompts)
    assert len(split["held_out"]) == round(0.2 * len(prompts)) and res.held_out_prompts == split["held_out"]
    curves = json.loads((out / CURVES_JSON).read_text())
    steps = [c for c in curves if "reward_mean" in c]
    assert [c["step"] for c in steps] == list(range(1, 13))
    assert all(c["kl"] is not None and c["loss"] is not None for c in steps) and steps[-1]["kl"] > 0
    assert (out / "evaluation.json").is_file() and not (out / "trainer").exists()
    # The run directory: the summary, the curves plot, and the tracker's namespaced metrics.
    summary = json.loads((run_dir / "tune.json").read_text())
    assert summary["key"] == res.key and summary["evaluation"]["reward"] == res.evaluation["reward"]
    assert (run_dir / "tune_curves.png").read_bytes()[:4] == b"\x89PNG"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "tune/reward_mean" in r] == list(range(1, 13))
    assert any("tune/held_out_reward_mean" in r and r["step"] == 0 for r in logged)


def test_rerun_reuses_and_force_retrains(cache, planted, monkeypatch):
    import irm.models

    cfg = TuneConfig(steps=2, learning_rate=0.05, final_eval=False, **TINY_KW)
    first = tune(TINY, planted, default_prompts(), cfg, cache_root=cache)
    weights = first.checkpoint / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    loads = []
    real_load = irm.models.load_model
    monkeypatch.setattr(irm.models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    again = tune(TINY, planted, default_prompts(), cfg, cache_root=cache)
    assert again.reused
    assert loads == []  # a cached tuned model is found without loading the base
    assert again.checkpoint == first.checkpoint and again.curves == first.curves
    assert again.held_out_prompts == first.held_out_prompts and weights.stat().st_mtime_ns == stamp
    forced = tune(TINY, planted, default_prompts(), cfg, cache_root=cache, force=True)
    assert len(loads) == 1
    assert not forced.reused and forced.checkpoint == first.checkpoint and weights.stat().st_mtime_ns != stamp
    other = tune(TINY, planted, default_prompts()[:100], cfg, cache_root=cache)
    assert other.key != first.key  # other prompts, other model


def test_rloo_runs_with_a_kl_penalty(cache, planted):
    cfg = TuneConfig(algorithm="rloo", steps=2, learning_rate=0.05, final_eval=False, **TINY_KW)
    res = tune(TINY, planted, default_prompts(), cfg, cache_root=cache)
    steps = [c for c in res.curves if "reward_mean" in c]
    assert [c["step"] for c in steps] == [1, 2] and steps[-1]["kl"] > 0
    base = load_model(TINY).hf_model.state_dict()
    tuned = load_model(str(res.checkpoint)).hf_model.state_dict()
    assert float((tuned["lm_head.weight"] - base["lm_head.weight"]).abs().max()) > 1e-3


def test_zero_variance_reward_warns_and_flags(cache, tmp_path):
    """A lexicon whose only word the tiny model never generates: every score is 0, no learning signal."""
    never = TokenUtilityRM({"zzqxjv": 5.0}, score_prompt=False, name="never-generated")
    cfg = TuneConfig(steps=3, learning_rate=0.1, final_eval=False, **TINY_KW)
    with pytest.warns(ZeroRewardVarianceWarning, match="never elicit what the reward pays for") as caught:
        res = tune(TINY, never, default_prompts(), cfg, cache_root=cache, run_dir=tmp_path)
    assert len([w for w in caught if w.category is ZeroRewardVarianceWarning]) == 1  # once, not every step
    flag = res.flags["zero_reward_variance"]
    assert flag["first_steps"] == 3 and flag["zero_variance_steps"] == 3 and flag["max_group_std"] == 0.0
    steps = [c for c in res.curves if "reward_mean" in c]
    assert [c["reward_group_std_max"] for c in steps] == [0.0, 0.0, 0.0]
    assert [c["frac_reward_zero_std"] for c in steps] == [1.0, 1.0, 1.0]  # trl agrees: every group is flat
    # The flag is in tune.json (the results' tune section), in the cached record, and in the report.
    summary = json.loads((tmp_path / "tune.json").read_text())
    assert summary["flags"]["zero_reward_variance"]["message"] == flag["message"]
    assert json.loads((res.checkpoint / TUNE_CONFIG_JSON).read_text())["outcome"]["flags"] == res.flags
    again = tune(TINY, never, default_prompts(), cfg, cache_root=cache)
    assert again.reused and again.flags == res.flags
    import irm.pair.stages  # noqa: F401  (registers the tune renderer)
    from irm.run.report import RENDERERS

    text = RENDERERS["tune"][1](summary, tmp_path)
    assert text.startswith("**Warning: zero reward variance.**") and "never elicit" in text


def test_kl_budget_stops_and_keeps_the_last_step_within_it(cache, planted):
    """lr 0.1 (decaying over 8 steps) on the planted reward: measured KL 0.24, 0.62, 1.10 nats/token at the
    checks of steps 2, 4, 6 (seed 0). A budget of 0.75 stops tuning at step 6 and keeps step 4; the
    assertions hold for any stop before the last step that keeps a step after 0."""
    cfg = TuneConfig(steps=8, learning_rate=0.1, final_eval=False, max_kl_per_token=0.75, save_every=2,
                     **{**TINY_KW, "eval_every": 2})
    res = tune(TINY, planted, default_prompts(), cfg, cache_root=cache)
    out = res.outcome
    assert out["stopped_early"] and out["stop_reason"] == "max_kl_per_token"
    assert out["kept_step"] < out["steps_run"] < cfg.steps
    checks = {c["step"]: c for c in out["checks"]}
    assert checks[0]["kl_per_token"] == pytest.approx(0.0, abs=1e-5)
    kept = checks[out["kept_step"]]
    assert kept["within_budget"] and 0 < kept["kl_per_token"] <= cfg.max_kl_per_token
    last = checks[out["steps_run"]]
    assert not last["within_budget"] and last["kl_per_token"] > cfg.max_kl_per_token
    assert [c["step"] for c in out["checks"]] == list(range(0, out["steps_run"] + 1, 2))
    assert [c["step"] for c in res.curves if "reward_mean" in c] == list(range(1, out["steps_run"] + 1))
    # The saved model is the kept check's weights (save_every wrote them at that step), not the last step's.
    saved = load_model(str(res.checkpoint)).hf_model.state_dict()
    at_kept = load_model(str(res.checkpoint / "checkpoints" / f"step-{out['kept_step']:06d}")).hf_model.state_dict()
    at_last = load_model(str(res.checkpoint / "checkpoints" / f"step-{out['steps_run']:06d}")).hf_model.state_dict()
    assert all(torch.equal(v, at_kept[k]) for k, v in saved.items())
    assert not torch.equal(saved["lm_head.weight"], at_last["lm_head.weight"])
    again = tune(TINY, planted, default_prompts(), cfg, cache_root=cache)
    assert again.reused and again.outcome == out


def test_lora_without_peft_says_how_to_install(cache, planted):
    try:
        import peft  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("peft is installed")
    cfg = TuneConfig(steps=1, lora=True, final_eval=False, **TINY_KW)
    with pytest.raises(ImportError, match="pip install peft"):
        tune(TINY, planted, default_prompts(), cfg, cache_root=cache)


def test_too_few_prompts(cache, planted):
    with pytest.raises(ValueError, match="prompts_per_step"):
        tune(TINY, planted, default_prompts()[:4], TuneConfig(prompts_per_step=4), cache_root=cache)


# --------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_tunes_end_to_end(tmp_path):
    """A few GRPO steps of SmolLM2 against VADER: the real path (GGUF -> plain checkpoint -> trl)."""
    prompts = default_prompts()[:40]
    cfg = TuneConfig(steps=2, eval_every=0, eval_prompts=8)
    res = tune("smollm2-135m-instruct", TokenUtilityRM.from_vader(), prompts, cfg,
               cache_root=tmp_path, run_dir=tmp_path / "run")
    assert [c["step"] for c in res.curves if "reward_mean" in c] == [1, 2]
    assert len(res.held_out_prompts) == 8 and res.evaluation["reward"]["base"]["n"] == 8
    tuned = load_model(str(res.checkpoint))
    base = load_model("smollm2-135m-instruct")
    pair = ModelPair(base, tuned)
    with torch.no_grad():
        diff = max(float((p - q).abs().max()) for p, q in zip(pair.base.hf_model.parameters(),
                                                                pair.tuned.hf_model.parameters()))
    assert diff > 0
    assert Path(res.checkpoint / "tokenizer_config.json").is_file()
