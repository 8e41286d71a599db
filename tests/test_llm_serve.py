"""The features stage's LLM calls through a real OpenAI-compatible server: ``transformers serve`` (the
``transformers[serving]`` extra, installed by ``make dev``) serving the cached SmolLM2 checkpoint on
loopback, offline. Its explanations, labels and explanation scores equal the in-process model's at
temperature 0; a server killed mid-run is retried with backoff and the run resumes from the reply cache;
token log-probabilities, which ``transformers serve`` does not return, fall back to the written labels
with a clear message."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from irm.features import FeatureRecord, TokenTable, explain_and_classify, feature_snippets
from irm.features.scoring import score_explanations, scoring_snippets
from irm.llm import CachedLLM, LLMError, LocalChatLLM, OpenAICompatibleLLM, ParseLog, complete_many

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 240.0  # model load on a busy 2-core CPU; a healthy start takes ~20 s
POST = re.compile(r'"POST /v1/chat/completions HTTP/1\.[01]" 200')


def _serve_executable() -> Path:
    """The ``transformers`` CLI of this interpreter's environment, with the serving extra; fails (never
    skips) with what to do when it is missing."""
    exe = Path(sys.executable).with_name("transformers")
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:  # pragma: no cover - a transformers without `serve`
        is_serve_available = None
    if not exe.is_file() or is_serve_available is None or not is_serve_available():
        pytest.fail("`transformers serve` is not installed in this environment (it needs the "
                    "`transformers[serving]` extra: fastapi, uvicorn). Run `make dev`, which installs the "
                    "project's dev extra, then rerun the tests.")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TransformersServe:
    """``transformers serve CHECKPOINT`` as a subprocess on 127.0.0.1:``port`` (offline, CPU, float32),
    its output in ``log_dir``. :meth:`start` waits for ``/health`` with a bounded timeout; :meth:`kill`
    ends it (SIGKILL, a crash); :meth:`stop` terminates it, then kills it if it lingers."""

    def __init__(self, checkpoint: Path, port: int, log_dir: Path) -> None:
        self.checkpoint, self.port, self.log_dir = checkpoint, port, log_dir
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> TransformersServe:
        exe = _serve_executable()
        log = self.log_dir / f"serve-{len(self.logs)}.log"
        self.logs.append(log)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false")
        for k in ("IRM_LLM_BASE_URL", "IRM_LLM_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
            env.pop(k, None)
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [str(exe), "serve", str(self.checkpoint), "--host", "127.0.0.1", "--port", str(self.port),
                 "--device", "cpu", "--dtype", "float32"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"`transformers serve` exited with code {self.proc.returncode} before it was ready:\n"
                            + log.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"`transformers serve` was not ready within {READY_TIMEOUT_S:.0f} s:\n"
                    + log.read_text(errors="replace")[-3000:])

    def requests_served(self, i: int = -1) -> int:
        """Chat completions answered (200) by start ``i`` of the server, from its access log."""
        return len(POST.findall(self.logs[i].read_text(errors="replace"))) if self.logs else 0

    def kill(self) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    from irm.models import resolve_checkpoint

    srv = TransformersServe(Path(resolve_checkpoint("smollm2-135m-instruct")[1]), _free_port(),
                            tmp_path_factory.mktemp("serve"))
    try:
        yield srv.start()
    finally:
        srv.stop()
        assert not srv.alive


@pytest.fixture
def remote_env(serve, monkeypatch):
    monkeypatch.setenv("IRM_LLM_BASE_URL", serve.base_url)
    monkeypatch.delenv("IRM_LLM_API_KEY", raising=False)
    return serve


# ----------------------------------------------------------------------------------------------
# Two features with known meaning on real SmolLM2 tokens: one fires on "rain", one on "terrible".
FILLER = ["the", "film", "was", "long", "and", "then", "after", "a", "story", "of", "city", "night", "we", "left"]
PLANTED = ("rain", "terrible")


def _features(tokenizer):
    rng = np.random.default_rng(0)
    texts = []
    for i in range(36):
        words = list(rng.choice(FILLER, size=9))
        if i % 3 < 2:
            words[int(rng.integers(2, 8))] = PLANTED[i % 3]
        texts.append(" ".join(words))
    table = TokenTable.from_texts(tokenizer, texts, max_length=32)
    n = int(table.starts[-1])
    acts = np.zeros((n, 2))
    eligible = np.ones(n, bool)
    for t in range(len(texts)):
        eligible[table.starts[t]] = table.offsets[t][0][1] > table.offsets[t][0][0]  # no special token
        for p in range(len(table.token_ids[t])):
            w = table.word_at(t, p)
            for j, word in enumerate(PLANTED):
                if w == word:
                    acts[table.row(t, p), j] = 1.0 + t / 40
    recs, sets = [], {}
    for j in range(2):
        snips, rows = feature_snippets(table, acts, j, eligible=eligible, k=3, left=6, right=2)
        rec = FeatureRecord("tuned", "blocks.15.hook_resid_post", j, snippets=snips)
        sets[rec.key] = scoring_snippets(table, acts[:, j], eligible=eligible, exclude_texts=table.locate(rows)[0],
                                         n=2, n_quantiles=2, left=6, right=2, seed=0, key=rec.key)
        recs.append(rec)
    return recs, sets


def _run(llm, recs, sets, *, mode: str):
    """The stage's three kinds of LLM calls: explain, label, score (detection and fuzzing)."""
    plog = ParseLog()
    info = explain_and_classify(llm, recs, "positive or negative sentiment", plog=plog, explain_tokens=24,
                                classify_tokens=8, mode=mode)
    scores = score_explanations(llm, [(r.key, r.explanation, sets[r.key]) for r in recs], plog=plog,
                                mode="generate" if mode == "generate" else "auto", n_boot=200)
    return info, scores


def _answers(recs, scores):
    out = {}
    for r in recs:
        out[r.key] = {"explanation": r.explanation, "label": r.label_generated, "attribute": r.attribute}
        for m in ("detection", "fuzzing"):
            out[r.key][m] = [s["written"] for s in scores["features"][r.key][m]["snippets"]]
    return out


def test_features_llm_calls_through_transformers_serve_equal_the_local_models(remote_env, smollm2, tmp_path):
    recs_local, sets = _features(smollm2.tokenizer)
    local = LocalChatLLM(smollm2)
    t = time.perf_counter()
    _, sc_local = _run(local, recs_local, sets, mode="generate")
    t_local = time.perf_counter() - t

    remote = CachedLLM(OpenAICompatibleLLM(str(remote_env.checkpoint), backoff_s=0.5, max_retries=3), tmp_path)
    recs_remote, _ = _features(smollm2.tokenizer)
    t = time.perf_counter()
    _, sc_remote = _run(remote, recs_remote, sets, mode="generate")
    t_remote = time.perf_counter() - t
    a_local, a_remote = _answers(recs_local, sc_local), _answers(recs_remote, sc_remote)
    print(f"\nlocal {t_local:.1f} s, through transformers serve {t_remote:.1f} s; "
          f"{remote.stats.misses} requests; answers: {a_remote}")
    # Greedy decoding of the same float32 weights: the same explanations, labels and scoring answers.
    assert a_remote == a_local
    assert all(r.explanation for r in recs_remote)
    n_prompts = 2 * len(recs_remote) + sc_remote["n_prompts"]
    assert remote.stats.misses == n_prompts == remote_env.requests_served()

    # Token log-probabilities: `transformers serve` ignores `logprobs`; the calibrated labels and the
    # log-odds scores fall back to the written answers, saying why, after one request.
    recs_auto, _ = _features(smollm2.tokenizer)
    n = remote_env.requests_served()
    info, sc_auto = _run(remote, recs_auto, sets, mode="auto")
    assert info["mode"] == "generate" and "no token log-probabilities" in info["calibration_unavailable"]
    assert sc_auto["mode"] == "generate" and "no token log-probabilities" in sc_auto["logprobs_unavailable"]
    assert remote_env.requests_served() == n + 1  # the one log-probability request; the rest is cached
    assert [r.label for r in recs_auto] == [r.label_generated for r in recs_local]
    with pytest.raises(LLMError, match="transformers serve"):
        OpenAICompatibleLLM(str(remote_env.checkpoint)).choice_logprobs([[{"role": "user", "content": "hi"}]],
                                                                        ["1", "0"])


def test_a_server_killed_mid_run_is_retried_and_the_run_resumes_from_the_cache(remote_env, smollm2, tmp_path):
    prompts = [[{"role": "user", "content": f"In three words, what is a {w}?"}]
               for w in ("rain", "cat", "film", "city", "river", "night")]
    want = complete_many(LocalChatLLM(smollm2), prompts, max_tokens=6)
    remote_env.stop()
    remote_env.start()  # a fresh access log: this test's requests alone
    i0 = len(remote_env.logs) - 1
    restarts: list[float] = []

    def backoff(delay: float) -> None:  # a supervisor brings the server back while the client waits
        if not remote_env.alive:
            t = time.perf_counter()
            remote_env.start()
            restarts.append(time.perf_counter() - t)
        time.sleep(min(delay, 0.5))

    def killer() -> None:  # a crash (SIGKILL) once two replies are out, while the next is asked for
        deadline = time.monotonic() + 300
        while remote_env.requests_served(i0) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        remote_env.kill()

    client = OpenAICompatibleLLM(str(remote_env.checkpoint), backoff_s=0.5, max_retries=4, sleep=backoff)
    llm = CachedLLM(client, tmp_path)  # a server answers one request at a time: each reply cached as it comes
    th = threading.Thread(target=killer, daemon=True)
    th.start()
    got = complete_many(llm, prompts, max_tokens=6)
    th.join(5)
    assert got == want  # every reply, as the local model gives them
    assert client.stats["retries"] >= 1 and len(restarts) == 1
    before_kill, after = remote_env.requests_served(i0), remote_env.requests_served(i0 + 1)
    print(f"\nkilled after {before_kill} replies; restart took {restarts[0]:.1f} s; the restarted server "
          f"answered {after}; retries {client.stats['retries']}")
    assert before_kill >= 2 and before_kill + after == len(prompts)  # nothing cached was asked again
    # A rerun reads everything from the cache: the restarted server sees no request.
    again = CachedLLM(OpenAICompatibleLLM(str(remote_env.checkpoint), max_retries=0), tmp_path)
    assert complete_many(again, prompts, max_tokens=6) == want
    assert again.stats.hits == len(prompts) and remote_env.requests_served(i0 + 1) == after
