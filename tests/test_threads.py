"""irm.core.threads: the two models of a pair side by side on a CPU, with the same results as one after the other."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from irm.core.threads import ModelThreads, run_side_by_side, side_by_side_enabled


@pytest.fixture
def two_threads():
    """The test suite runs torch on one thread (conftest); side by side needs at least two."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _models(n: int = 2) -> list[torch.nn.Module]:
    return [torch.nn.Linear(4, 4) for _ in range(n)]


def test_calls_run_at_the_same_time_each_on_its_share_of_threads(two_threads):
    barrier = threading.Barrier(2, timeout=20)  # one call after the other would time out here

    def call(k: int):
        def run():
            barrier.wait()
            return k, threading.get_ident(), torch.get_num_threads()
        return run

    with ModelThreads(_models()) as mt:
        assert mt.active and mt.per_call == 1
        out = mt.map([call(0), call(1)])
    assert [k for k, _, _ in out] == [0, 1]  # results in call order
    assert len({ident for _, ident, _ in out}) == 2 and threading.get_ident() not in {i for _, i, _ in out}
    assert [n for _, _, n in out] == [1, 1]
    assert torch.get_num_threads() == 2  # restored on leaving


@pytest.mark.parametrize("case", ["one_thread", "switched_off", "same_model", "not_cpu"])
def test_one_after_the_other_where_side_by_side_cannot_help(case, two_threads, monkeypatch):
    models = _models()
    if case == "one_thread":
        torch.set_num_threads(1)
    elif case == "switched_off":
        monkeypatch.setenv("IRM_MODEL_THREADS", "0")
    elif case == "same_model":
        class Loaded:  # two LoadedModel-likes around one HF model share its modules and hooks
            def __init__(self, hf):
                self.hf_model, self.device = hf, torch.device("cpu")
        models = [Loaded(models[0]), Loaded(models[0])]
    else:
        models = [torch.nn.Linear(4, 4, device="meta"), models[1]]
    assert not side_by_side_enabled(models)
    with ModelThreads(models) as mt:
        assert not mt.active
        out = mt.map([threading.get_ident, threading.get_ident])
    assert out == [threading.get_ident()] * 2


def test_an_error_is_raised_once_every_call_has_ended(two_threads):
    finished = threading.Event()

    def fails():
        raise ValueError("bad input in the base model")

    def slow():
        time.sleep(0.3)
        finished.set()
        return 1

    with ModelThreads(_models()) as mt, pytest.raises(ValueError, match="bad input in the base model"):
        mt.map([fails, slow])
    assert finished.is_set()
    assert torch.get_num_threads() == 2


def test_grad_and_inference_mode_carry_into_the_calls(two_threads):
    def modes():
        return torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    with ModelThreads(_models()) as mt:
        assert mt.map([modes, modes]) == [(True, False)] * 2
        with torch.no_grad():
            assert mt.map([modes, modes]) == [(False, False)] * 2
        with torch.inference_mode():
            assert mt.map([modes, modes]) == [(False, True)] * 2


def _tiny_pair(tiny_base, tiny_tuned):
    from irm.models import ModelPair

    return ModelPair(tiny_base, tiny_tuned)


@pytest.mark.parametrize("switch", ["1", "0"])
def test_pair_work_equals_one_model_after_the_other(switch, tiny_base, tiny_tuned, two_threads, monkeypatch,
                                                    tmp_path):
    """Log-ratio scoring, capture (shared prefixes, log-probabilities), generation and the KL of the
    evaluation give the same numbers side by side ("1") as one model after the other ("0"): the same
    tokens, and values equal to float rounding (a thread count of 1 instead of 2 can change the order of
    a few sums in torch's CPU kernels: 4e-9 at most on the tiny pair)."""
    import irm.activations.capture as cap
    from irm.activations.capture import capture_activations, records_from_pairs
    from irm.implicit.logratio import token_log_ratios
    from irm.models.generation import generate
    from irm.pair.evaluate import completion_kl

    pair = _tiny_pair(tiny_base, tiny_tuned)
    prompts = ["the movie was", "the movie was", "i thought the film", "a story of"] * 3
    responses = [" good and great", " bad", " was long", " love and loss"] * 3

    def run_all(tag: str) -> dict:
        out: dict = {}
        out["ratios"] = token_log_ratios(pair, prompts, responses, batch_size=3)
        store = capture_activations({"base": pair.base, "tuned": pair.tuned}, records_from_pairs(prompts, responses),
                                    tmp_path / tag, hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                                    positions="all", batch_size=3, shard_size=5, logprobs=True, share_prefix=True)
        out["acts"] = {(r, h): store.load(r, h) for r in ("base", "tuned") for h in store.hooks}
        out["lp"] = {r: store.logprobs(r) for r in ("base", "tuned")}
        gens = generate(pair.tuned.hf_model, pair.tuned.tokenizer, prompts[:4], max_new_tokens=5, seed=3)
        out["gens"] = gens.completions
        out["kl"] = completion_kl(pair.base.hf_model, pair.tuned.hf_model, gens,
                                  pad_token_id=pair.tuned.tokenizer.pad_token_id, batch_size=2)
        return out

    monkeypatch.setattr(cap, "_MIN_PREFIX_SAVING", 1)
    monkeypatch.setenv("IRM_MODEL_THREADS", switch)
    assert side_by_side_enabled([pair.base, pair.tuned]) is (switch == "1")
    got = run_all("a")
    monkeypatch.setenv("IRM_MODEL_THREADS", "0")
    want = run_all("b")
    tol = dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(got["ratios"], want["ratios"], strict=True):
        np.testing.assert_allclose(a, b, **tol)
    for k in want["acts"]:
        torch.testing.assert_close(got["acts"][k], want["acts"][k], **tol)
    for r in want["lp"]:
        np.testing.assert_allclose(got["lp"][r], want["lp"][r], **tol)
    assert got["gens"] == want["gens"]
    for a, b in zip(got["kl"], want["kl"], strict=True):
        np.testing.assert_allclose(a, b, **tol)


def test_run_side_by_side_on_the_pair(tiny_base, tiny_tuned, two_threads):
    from irm.models.generation import generate

    pair = _tiny_pair(tiny_base, tiny_tuned)
    calls = [lambda m=m: generate(m.hf_model, m.tokenizer, ["the movie was"], max_new_tokens=4, seed=0).completions
             for m in (pair.base, pair.tuned)]
    both = run_side_by_side(calls, [pair.base, pair.tuned])
    assert both == [c() for c in calls]
