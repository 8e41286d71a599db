"""A loopback OpenAI-compatible server (stdlib only) for the tests: serves any :class:`LLMClient` with
injectable faults (HTTP 500/429/400, malformed bodies or replies), so :class:`OpenAICompatibleLLM`
is tested over real HTTP; it answers ``logprobs``/``top_logprobs`` for a local chat model (as vLLM does)
unless told not to (as ``transformers serve`` does not). Not part of the installed package."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from irm.llm.base import LLMClient, check_messages

__all__ = ["Fault", "OpenAICompatibleServer"]

@dataclass(frozen=True)
class Fault:
    """One injected answer of :class:`OpenAICompatibleServer` in place of the model's.

    ``status``: answer with this HTTP error status (e.g. 500, 429, 400); ``retry_after``: with a
    ``Retry-After`` header; ``reply``: answer 200 with this content; ``body``: answer 200 with these raw
    bytes (a malformed response).
    """

    status: int | None = None
    reply: str | None = None
    body: bytes | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.status, self.reply, self.body)) != 1:
            raise ValueError(f"A Fault sets exactly one of status, reply, body; got {self!r}")


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class OpenAICompatibleServer:
    """Serve an :class:`LLMClient` at ``http://127.0.0.1:PORT/v1/chat/completions`` in a thread.

    Loopback only. The request loop is bounded: it stops itself after ``max_requests`` requests or
    ``lifetime_s`` seconds, or on :meth:`stop` (a context manager calls it). Faults queued with
    :meth:`inject` answer the next requests in order. :attr:`requests` keeps each request's JSON body
    and whether it carried an ``Authorization`` header (never the header itself).

    >>> with OpenAICompatibleServer(LocalChatLLM("tiny-llama"), model_name="tiny") as srv:
    ...     srv.inject(Fault(status=500), Fault(status=429))
    ...     os.environ["IRM_LLM_BASE_URL"] = srv.base_url
    ...     OpenAICompatibleLLM("tiny", backoff_s=0.01).complete([{"role": "user", "content": "hi"}])
    """

    def __init__(self, client: LLMClient, *, model_name: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 max_requests: int = 1000, lifetime_s: float = 600.0, max_body_bytes: int = 1 << 20,
                 logprobs: bool = True) -> None:
        if host not in _LOOPBACK:
            raise ValueError(f"host must be a loopback address {_LOOPBACK}, got {host!r}; this server has no auth.")
        if max_requests < 1 or lifetime_s <= 0:
            raise ValueError(f"need max_requests >= 1 and lifetime_s > 0, got {max_requests}, {lifetime_s}")
        self.client = client
        self.model_name = model_name or client.name
        self.max_requests = int(max_requests)
        self.lifetime_s = float(lifetime_s)
        self.max_body_bytes = int(max_body_bytes)
        # Token log-probabilities need the model itself (a LocalChatLLM: ``render`` and ``model``).
        self.logprobs = bool(logprobs) and hasattr(client, "render") and hasattr(client, "model")
        self.requests: list[dict[str, Any]] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._httpd = HTTPServer((host, port), self._handler_class())
        self._httpd.timeout = 0.1
        self.host, self.port = host, int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def start(self) -> OpenAICompatibleServer:
        if self._thread is not None:
            raise RuntimeError("This server was already started; make a new one.")
        self._thread = threading.Thread(target=self._loop, name=f"llm-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        deadline = time.monotonic() + self.lifetime_s
        try:
            while not self._stop.is_set() and len(self.requests) < self.max_requests and time.monotonic() < deadline:
                self._httpd.handle_request()  # returns after `timeout` when idle
        finally:
            self._httpd.server_close()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._httpd.server_close()

    def __enter__(self) -> OpenAICompatibleServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def first_token_logprobs(self, messages: list[dict[str, str]], k: int) -> dict[str, Any]:
        """The ``logprobs`` object of an OpenAI chat completion for the reply's first (greedy) token, with
        its ``k`` most likely alternatives, from one forward pass of the served local model."""
        import torch

        model = self.client.model
        tok = model.tokenizer
        ids = tok(self.client.render(messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model.hf_model(input_ids=ids.to(model.device)).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1).cpu()
        vals, idx = lp.topk(max(k, 1))

        def entry(i: int, v: float) -> dict[str, Any]:
            return {"token": tok.decode([i]), "logprob": float(v), "bytes": None}

        first = entry(int(idx[0]), float(vals[0]))
        return {"content": [first | {"top_logprobs": [entry(int(i), float(v)) for i, v in
                                                      zip(idx[:k].tolist(), vals[:k].tolist(), strict=True)]}]}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
                body = {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                                  "code": status}}
                self._send(status, json.dumps(body).encode(), headers)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/") in ("/v1/models", "/models"):
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": server.model_name, "object": "model", "owned_by": "irm"}]}).encode())
                elif self.path.rstrip("/") == "/health":
                    self._send(200, b'{"status": "ok"}')
                else:
                    self._error(404, f"no route {self.path}")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                if length > server.max_body_bytes:
                    self._error(413, f"body of {length} bytes exceeds {server.max_body_bytes}")
                    return
                raw = self.rfile.read(length)
                try:
                    req = json.loads(raw or b"{}")
                except ValueError:
                    self._error(400, "body is not JSON")
                    return
                server.requests.append({"path": self.path, "body": req,
                                        "authorized": bool(self.headers.get("Authorization"))})
                if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                    self._error(404, f"no route {self.path}")
                    return
                fault = server._next_fault()
                if fault is not None and fault.status is not None:
                    hdr = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
                    self._error(fault.status, f"injected fault {fault.status}", hdr)
                    return
                if fault is not None and fault.body is not None:
                    self._send(200, fault.body)
                    return
                if req.get("model") not in (server.model_name, None):
                    self._error(404, f"model {req.get('model')!r} not found; this server serves {server.model_name!r}")
                    return
                try:
                    messages = check_messages(req.get("messages"))
                    text = fault.reply if fault is not None else server.client.complete(
                        messages, max_tokens=int(req.get("max_tokens") or 256),
                        temperature=float(req.get("temperature") or 0.0), seed=int(req.get("seed") or 0))
                except (TypeError, ValueError) as e:
                    self._error(400, str(e))
                    return
                except Exception as e:  # the model failed: a 500, as a real server would answer
                    self._error(500, f"{type(e).__name__}: {e}")
                    return
                logprobs = None
                if req.get("logprobs") and server.logprobs:
                    logprobs = server.first_token_logprobs(messages, int(req.get("top_logprobs") or 0))
                body = {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": int(time.time()),
                    "model": server.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": logprobs, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                }
                self._send(200, json.dumps(body).encode())

        return Handler
