"""Real loopback servers for the gateway tests and benchmark: uvicorn in a thread on an ephemeral 127.0.0.1 port,
and a stub OpenAI-compatible upstream whose behaviour a test switches (ok, 500, 400, sleep, stall mid-stream)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


class ServerThread:
    """uvicorn serving `app` in a daemon thread on 127.0.0.1:<ephemeral>; `stop()` (or the context) shuts it down."""

    def __init__(self, app: Any, *, startup_timeout: float = 20.0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, backlog=1024)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start within {startup_timeout} s")
            time.sleep(0.01)
        self._sock = sock

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StubUpstream:
    """An OpenAI-compatible upstream. Answers `"<name> says: <last user text>"`, with usage (prompt tokens = words
    of the request's text, completion tokens = words of the answer). `mode`: ok | an HTTP status ("500", "429", ...;
    "400" names a param) | sleep (longer than any gateway timeout in the tests) | stall (a stream that stops after
    its first event) | error_event (a stream that reports an error after its first event) | garbage (an HTML page
    with status 200). Records every request body and Authorization header."""

    def __init__(self, name: str, *, sleep_s: float = 3.0) -> None:
        self.name = name
        self.mode = "ok"
        self.sleep_s = sleep_s
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.app = self._build()

    def answer(self, text: str) -> str:
        return f"{self.name} says: {text}"

    def _build(self) -> FastAPI:
        app = FastAPI()

        async def misbehave() -> JSONResponse | None:
            if self.mode == "400":
                return JSONResponse({"error": {"message": f"{self.name} dislikes max_tokens", "type":
                                               "invalid_request_error", "param": "max_tokens", "code": None}}, 400)
            if self.mode == "garbage":  # a proxy's error page with status 200
                return PlainTextResponse("<html>bad gateway</html>")
            if self.mode.isdigit():  # any other status: an error body as OpenAI sends it
                return JSONResponse({"error": {"message": f"{self.name} fails with {self.mode}", "type": "error"}},
                                    int(self.mode))
            if self.mode == "sleep":
                await asyncio.sleep(self.sleep_s)
            return None

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            self.auth.append(request.headers.get("authorization"))
            if (bad := await misbehave()) is not None:
                return bad
            user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
            text = self.answer(user)
            usage = {"prompt_tokens": sum(len(str(m["content"]).split()) for m in body["messages"]),
                     "completion_tokens": len(text.split())}
            if body.get("stream"):
                return StreamingResponse(self._chunks(body["model"], text, usage), media_type="text/event-stream")
            return {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}], "usage": usage}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.requests.append(body)
            if (bad := await misbehave()) is not None:
                return bad
            text = self.answer(body["prompt"])
            return {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": len(text.split())}}

        return app

    async def _chunks(self, model: str, text: str, usage: dict[str, int]):
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            chunk = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            if self.mode == "stall":
                await asyncio.sleep(self.sleep_s)
            if self.mode == "error_event":  # as OpenAI reports a failure inside a stream, then closes it
                yield f"data: {json.dumps({'error': {'message': 'overloaded mid-stream', 'type': 'server_error'}})}\n\n"
                return
        final = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model,
                 "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
        yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"


class KeywordRouter:
    """A query router following routelab.query's protocol, small enough to check by hand: predicted score of the
    strong model 0.9 on prompts containing "hard" (else 0.5), of the weak model 0.3 (else 0.45); route = argmax of
    predicted score - willingness_to_pay * cost, cost = (1.0, 0.1)."""

    name = "keyword"
    knob_name = "willingness_to_pay"

    def __init__(self, model_names: tuple[str, str] = ("strong", "weak")) -> None:
        self.model_names = list(model_names)
        self.cost_M = np.array([1.0, 0.1])
        self.calls = 0

    def predict(self, prompts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.array([[0.9, 0.3] if "hard" in p else [0.5, 0.45] for p in prompts])

    def route(self, prompts: list[str], *, willingness_to_pay: float) -> np.ndarray:
        if willingness_to_pay < 0:
            raise ValueError(f"willingness_to_pay must be >= 0, got {willingness_to_pay}")
        return np.argmax(self.predict(prompts) - willingness_to_pay * self.cost_M, axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# The tests: a gateway (real uvicorn, ephemeral port) over two stub upstreams (real uvicorn servers in threads).

import os  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

from routelab.query.gateway import create_app  # noqa: E402
from routelab.query.gateway_config import GatewayConfigError, load_pool, parse_pool, resolve_model_name  # noqa: E402

pytestmark = pytest.mark.timeout(120)
TOKEN = "sk-routelab-test"
PRICES = {"strong": (10.0, 30.0), "weak": (0.5, 1.5)}  # $ per million input / output tokens
# The timeout tests cut "strong" after TIMEOUT_S; "weak", where fallbacks land, gets a generous timeout so that a
# loaded CI machine does not turn a fallback into a second failure.
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def upstreams():
    a, b = StubUpstream("A", sleep_s=5.0), StubUpstream("B", sleep_s=5.0)
    with ServerThread(a.app) as sa, ServerThread(b.app) as sb:
        a.url, b.url = sa.url, sb.url
        yield a, b


def pool_data(a_url: str, b_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "models": {
            "strong": {"base_url": f"{a_url}/v1", "model": "a-model", "input_price": PRICES["strong"][0],
                       "output_price": PRICES["strong"][1], "timeout": TIMEOUT_S, "api_key_env": "STUB_KEY"},
            "weak": {"base_url": f"{b_url}/v1", "input_price": PRICES["weak"][0], "output_price": PRICES["weak"][1],
                     "timeout": 30},
        },
        "routers": {"kw": {"path": ".", "knob": 0.2}},
        "default": "router-kw-0.2",
        **extra,
    }


@pytest.fixture(scope="module")
def gateway(upstreams, tmp_path_factory):
    a, b = upstreams
    log = tmp_path_factory.mktemp("gw") / "routing.jsonl"
    pool = parse_pool(pool_data(a.url, b.url, log=str(log), api_keys_env="GW_KEYS", max_request_bytes=4096),
                      environ={"STUB_KEY": "upstream-secret", "GW_KEYS": f"other-key, {TOKEN}"})
    router = KeywordRouter()
    with ServerThread(create_app(pool, {"kw": router})) as server:
        server.log, server.router = log, router
        yield server


@pytest.fixture
def client(gateway, upstreams):
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as c:
        yield c
    for up in upstreams:
        up.mode = "ok"


def chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": text}], **extra}


def read_log(path: Path) -> list[dict[str, Any]]:
    # Complete lines only: another request's line may be being written while a test reads.
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]


def log_record(gateway, response: httpx.Response) -> dict[str, Any]:
    rid = response.headers["x-request-id"]
    records = read_log(gateway.log)
    (record,) = [r for r in records if r["request_id"] == rid]
    return record


def expected_cost(model: str, tokens_in: int, tokens_out: int) -> float:
    return (tokens_in * PRICES[model][0] + tokens_out * PRICES[model][1]) / 1e6


@pytest.mark.parametrize("text, knob, expected", [
    # Hand-computed from KeywordRouter: argmax(score - knob * cost), cost = (1.0, 0.1).
    ("a hard question", 0.0, "strong"),   # 0.9 vs 0.3
    ("a hard question", 0.2, "strong"),   # 0.7 vs 0.28
    ("an easy question", 0.2, "weak"),    # 0.3 vs 0.43
    ("a hard question", 1.0, "weak"),     # -0.1 vs 0.2
])
def test_router_picks_the_model_and_the_response_names_it(client, gateway, upstreams, text, knob, expected):
    r = client.post("/v1/chat/completions", json=chat(f"router-kw-{knob}", text))
    assert r.status_code == 200, r.text
    body = r.json()
    up = upstreams[0] if expected == "strong" else upstreams[1]
    assert body["choices"][0]["message"]["content"] == up.answer(text)
    assert body["model"] == expected and r.headers["x-routelab-model"] == expected
    assert r.headers["x-routelab-route"] == f"router-kw-{knob:g}"
    # The upstream got its own model name, not the client's routing alias.
    assert up.requests[-1]["model"] == ("a-model" if expected == "strong" else "weak")
    rec = log_record(gateway, r)
    assert rec["chosen"] == rec["model"] == expected and rec["status"] == 200 and rec["route"] == f"router-kw-{knob:g}"
    hard = "hard" in text
    assert rec["predicted_scores"] == ({"strong": 0.9, "weak": 0.3} if hard else {"strong": 0.5, "weak": 0.45})
    tokens_in, tokens_out = 2 + len(text.split()), len(up.answer(text).split())
    assert rec["tokens"] == {"input": tokens_in, "output": tokens_out, "source": "usage"}
    assert rec["cost_usd"] == pytest.approx(expected_cost(expected, tokens_in, tokens_out), rel=1e-12)
    assert [a["model"] for a in rec["attempts"]] == [expected] and rec["latency_ms"] > 0


def test_pass_through_auto_and_completions(client, gateway, upstreams):
    a, b = upstreams
    r = client.post("/v1/chat/completions", json=chat("weak", "a hard question"))
    assert r.status_code == 200 and r.json()["model"] == "weak"
    assert r.json()["choices"][0]["message"]["content"] == b.answer("a hard question")
    assert "predicted_scores" not in log_record(gateway, r)  # no router ran
    r = client.post("/v1/chat/completions", json=chat("auto", "a hard question"))  # default: router-kw-0.2
    assert r.json()["model"] == "strong" and r.headers["x-routelab-route"] == "router-kw-0.2"
    r = client.post("/v1/chat/completions", json=chat("router-kw", "an easy question"))  # the router's own knob 0.2
    assert r.json()["model"] == "weak"
    r = client.post("/v1/completions", json={"model": "router-kw-0", "prompt": "an easy one", "max_tokens": 5})
    assert r.status_code == 200 and r.json()["model"] == "strong"
    assert r.json()["choices"][0]["text"] == a.answer("an easy one") and a.requests[-1]["max_tokens"] == 5
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["strong", "weak", "router-kw-0.2", "auto"]


def test_upstream_key_goes_to_its_upstream_and_the_client_token_to_none(client, upstreams):
    a, b = upstreams
    client.post("/v1/chat/completions", json=chat("strong", "x"))
    client.post("/v1/chat/completions", json=chat("weak", "x"))
    assert a.auth[-1] == "Bearer upstream-secret" and b.auth[-1] is None


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_streaming_relays_every_event_with_the_answering_model(client, gateway, upstreams):
    text = "a hard streamed question"
    with client.stream("POST", "/v1/chat/completions", json=chat("router-kw-0.2", text, stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-routelab-model"] == "strong"
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["model"] == "strong" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == upstreams[0].answer(text)
    rec = log_record(gateway, r)
    assert rec["status"] == 200 and rec["stream"] is True and rec["tokens"]["source"] == "usage"


def test_fallback_on_upstream_500_goes_to_the_next_best_model(client, gateway, upstreams):
    a, b = upstreams
    a.mode = "500"
    r = client.post("/v1/chat/completions", json=chat("router-kw-0.2", "a hard question"))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "weak" and r.headers["x-routelab-model"] == "weak"
    assert r.json()["choices"][0]["message"]["content"] == b.answer("a hard question")
    assert r.headers["x-routelab-attempts"] == "2"
    rec = log_record(gateway, r)
    assert rec["chosen"] == "strong" and rec["model"] == "weak" and rec["status"] == 200
    assert [(x["model"], x["status"]) for x in rec["attempts"]] == [("strong", "status"), ("weak", "ok")]
    assert "HTTP 500" in rec["attempts"][0]["error"]
    # The same for a stream: the failure happens before any byte reaches the client, so it can still fall back.
    with client.stream("POST", "/v1/chat/completions", json=chat("router-kw-0.2", "hard", stream=True)) as r:
        assert r.headers["x-routelab-model"] == "weak"
        events = sse_events(r)
    assert all(json.loads(e)["model"] == "weak" for e in events[:-1]) and events[-1] == "[DONE]"


@pytest.mark.parametrize("mode, error", [("503", "HTTP 503"), ("429", "HTTP 429"), ("401", "HTTP 401"),
                                         ("garbage", "other than a JSON object")])
def test_other_failures_that_are_not_the_clients_fault_fall_back(client, gateway, upstreams, mode, error):
    upstreams[0].mode = mode
    r = client.post("/v1/chat/completions", json=chat("router-kw-0.2", "a hard question"))
    assert r.status_code == 200 and r.json()["model"] == "weak"
    assert error in log_record(gateway, r)["attempts"][0]["error"]
    with client.stream("POST", "/v1/chat/completions", json=chat("router-kw-0.2", "hard", stream=True)) as r:
        assert r.status_code == 200 and r.headers["x-routelab-model"] == "weak"


def test_fallback_on_upstream_timeout(client, gateway, upstreams):
    upstreams[0].mode = "sleep"  # sleeps 5 s; the gateway gives it TIMEOUT_S
    r = client.post("/v1/chat/completions", json=chat("router-kw-0.2", "a hard question"))
    assert r.status_code == 200 and r.json()["model"] == "weak"
    rec = log_record(gateway, r)
    # "timeout", not "ok": the attempt was cut, not answered late; and not before the configured timeout.
    assert [(x["model"], x["status"]) for x in rec["attempts"]] == [("strong", "timeout"), ("weak", "ok")]
    assert rec["attempts"][0]["latency_ms"] >= TIMEOUT_S * 1000


def test_stall_mid_stream_ends_the_stream_with_an_error_event(client, gateway, upstreams):
    upstreams[0].mode = "stall"  # first event, then silence longer than the timeout
    with client.stream("POST", "/v1/chat/completions", json=chat("strong", "hard", stream=True)) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert json.loads(events[0])["model"] == "strong"
    assert "error" in json.loads(events[-1]) and "[DONE]" not in events
    assert log_record(gateway, r)["status"] == "timeout"


def test_an_error_event_inside_a_stream_is_relayed_and_logged(client, gateway, upstreams):
    upstreams[1].mode = "error_event"
    with client.stream("POST", "/v1/chat/completions", json=chat("weak", "hi", stream=True)) as r:
        events = [json.loads(e) for e in sse_events(r)]
    assert events[-1]["error"]["message"] == "overloaded mid-stream" and events[0]["model"] == "weak"
    record = log_record(gateway, r)
    assert record["status"] == "upstream_error" and record["error"] == "overloaded mid-stream"


def test_every_model_failing_or_pass_through_failing_is_an_openai_error(client, gateway, upstreams):
    a, b = upstreams
    a.mode = b.mode = "500"
    r = client.post("/v1/chat/completions", json=chat("router-kw-0.2", "hard"))
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    assert "strong, weak" in r.json()["error"]["message"]
    b.mode = "ok"
    r = client.post("/v1/chat/completions", json=chat("strong", "hard"))  # asked by name: no fallback
    assert r.status_code == 502 and len(a.requests) and log_record(gateway, r)["attempts"][0]["model"] == "strong"
    a.mode = "sleep"
    r = client.post("/v1/chat/completions", json=chat("strong", "hard"))
    assert r.status_code == 504 and r.json()["error"]["type"] == "upstream_error"


def test_upstream_client_error_is_returned_not_retried(client, gateway, upstreams):
    a, b = upstreams
    a.mode = "400"
    before = len(b.requests)
    r = client.post("/v1/chat/completions", json=chat("router-kw-0.2", "hard"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert len(b.requests) == before  # the client's request was wrong: another model would refuse it too


def test_auth(gateway):
    body = chat("weak", "hi")
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": "Bearer"}):
            r = c.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
            assert c.get("/v1/models", headers=headers).status_code == 401
        assert c.get("/health").json()["status"] == "ok"  # liveness needs no token
        for key in ("other-key", TOKEN):
            r = c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200


@pytest.mark.parametrize("content, status, code, param", [
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    (b"[" * 100_0 + b"]" * 100_0, 400, "invalid_json", None),
    (b'{"messages": [{"role": "user", "content": "x"}]}', 422, "invalid_value", "model"),
    (b'{"model": "weak"}', 422, "invalid_value", "messages"),
    (b'{"model": "weak", "messages": []}', 422, "invalid_value", "messages"),
    (b'{"model": "weak", "messages": [{"content": "x"}]}', 422, "invalid_value", "messages[0]"),
    (b'{"model": "weak", "messages": [{"role": "user", "content": 5}]}', 422, "invalid_type", "messages[0].content"),
    (b'{"model": "weak", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}', 422, "invalid_type",
     "stream"),
    (b'{"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found", "model"),
    (b'{"model": "router-nope-0.5", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found",
     "model"),
    (b'{"model": "router-kw-abc", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found", "model"),
    (b'{"model": "router-kw-nan", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found", "model"),
    (b'{"model": "router-kw--1", "messages": [{"role": "user", "content": "x"}]}', 400, "invalid_knob", "model"),
    (b'{"model": "weak", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}', 413,
     "request_too_large", None),
])
def test_bad_requests_get_openai_style_errors(client, content, status, code, param):
    r = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text


def test_oversized_chunked_body_unknown_path_and_broken_router(client, gateway):
    def chunks():
        for _ in range(10):
            yield b" " * 1000
    r = client.post("/v1/chat/completions", content=chunks())  # no content-length: counted as it arrives
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/chat/completions").status_code == 405
    router = gateway.router
    router.predict, original = (lambda prompts: 1 / 0), router.predict
    try:
        r = client.post("/v1/chat/completions", json=chat("router-kw-0.2", "hard"))
    finally:
        router.predict = original
    assert r.status_code == 500 and r.json()["error"]["code"] == "router_failed" and "Traceback" not in r.text
    assert log_record(gateway, r)["status"] == 500


def test_200_concurrent_requests_each_logged_on_one_intact_line(upstreams, tmp_path):

    # A gateway of its own: the shared one's 1 s upstream timeout is for the fallback tests, and 200 requests
    # through three servers in one process on a shared CPU can take longer than that.
    data = pool_data(upstreams[0].url, upstreams[1].url, log=str(tmp_path / "routing.jsonl"))
    for spec in data["models"].values():
        spec["timeout"] = 60
    pool = parse_pool(data, environ={"STUB_KEY": "k"})
    with ServerThread(create_app(pool, {"kw": KeywordRouter()})) as gateway:
        gateway.log = tmp_path / "routing.jsonl"
        run_200_concurrent(gateway)


def run_200_concurrent(gateway) -> None:
    import asyncio

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60, limits=limits) as c:
            async def one(i: int) -> httpx.Response:
                text = f"{'hard' if i % 2 else 'easy'} question number {i} " + "padding " * (i % 7) * 20
                return await c.post("/v1/chat/completions", json=chat("router-kw-0.2", text))
            return await asyncio.gather(*(one(i) for i in range(200)))

    lines_before = len(gateway.log.read_bytes().splitlines()) if gateway.log.exists() else 0
    responses = asyncio.run(asyncio.wait_for(main(), 100))
    assert [r.status_code for r in responses] == [200] * 200
    raw = gateway.log.read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.splitlines()[lines_before:]]  # any interleaving breaks a line
    assert len(records) == 200
    by_id = {r["request_id"]: r for r in records}
    assert set(by_id) == {r.headers["x-request-id"] for r in responses}
    for i, r in enumerate(responses):  # gather keeps the order: odd i asked a hard question (router → strong)
        rec = by_id[r.headers["x-request-id"]]
        expected = "strong" if i % 2 else "weak"
        assert rec["model"] == r.json()["model"] == expected and rec["status"] == 200
        assert r.json()["choices"][0]["message"]["content"].startswith(f"{'A' if i % 2 else 'B'} says: ")
        assert f"question number {i} " in r.json()["choices"][0]["message"]["content"]


def test_openai_client_talks_to_the_gateway(gateway, upstreams):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=TOKEN, max_retries=0, timeout=10)
    out = client.chat.completions.create(model="router-kw-0.2", messages=[{"role": "user", "content": "hard one"}])
    assert out.model == "strong" and out.choices[0].message.content == upstreams[0].answer("hard one")
    assert out.usage.completion_tokens == len(upstreams[0].answer("hard one").split())
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-routelab-model"] == "weak" and raw.parse().model == "weak"
    stream = client.chat.completions.create(model="router-kw-0", messages=[{"role": "user", "content": "easy"}],
                                            stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == upstreams[0].answer("easy")
    done = client.completions.create(model="weak", prompt="finish this")
    assert done.choices[0].text == upstreams[1].answer("finish this")
    assert {m.id for m in client.models.list()} == {"strong", "weak", "router-kw-0.2", "auto"}
    assert client.models.retrieve("router-kw-0.7").id == "router-kw-0.7"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("router-nope-0.7")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="bad", max_retries=0).models.list()


def test_client_disconnect_mid_stream_is_logged(client, gateway, upstreams):
    upstreams[1].mode = "stall"  # the stub waits 2 s after its first event; the client leaves after reading it
    with client.stream("POST", "/v1/chat/completions", json=chat("weak", "bye", stream=True)) as r:
        rid = r.headers["x-request-id"]
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    record = None
    while record is None and time.monotonic() < deadline:
        lines = read_log(gateway.log)
        record = next((x for x in lines if x["request_id"] == rid), None)
        time.sleep(0.02)
    assert record is not None and record["status"] == "client_disconnected"


# -- pool.yaml -------------------------------------------------------------------------------------------------------

GOOD = {"models": {"m1": {"base_url": "http://127.0.0.1:9/v1"}, "m2": {"base_url": "https://example.invalid/v1",
                                                                      "input_price": 1, "output_price": 2}}}


def with_(path: str, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(GOOD))
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return data


@pytest.mark.parametrize("data, fragment", [
    ([1], "must hold a mapping"),
    ({}, "models: must be a non-empty mapping"),
    (with_("extra", 1), "top level: unknown field 'extra'"),
    (with_("models.m1", {"base_url": "http://127.0.0.1:9", "path": "."}), "models.m1: needs exactly one of base_url"),
    (with_("models.m1", "http://127.0.0.1:9"), "models.m1: must be a mapping"),
    (with_("models.m1.base_url", "ftp://x"), "models.m1.base_url: must be an http:// or https:// URL"),
    (with_("models.m1.base_url", "http://"), "models.m1.base_url"),
    (with_("models.m1.timeout", 0), "models.m1.timeout: must be a finite number > 0"),
    (with_("models.m1.timeout", "10"), "models.m1.timeout"),
    (with_("models.m1.input_price", -1), "models.m1.input_price: must be a finite number >= 0"),
    (with_("models.m1.output_price", float("nan")), "models.m1.output_price"),
    (with_("models.m1.api_key_env", "NOT_SET_ANYWHERE"), "environment variable NOT_SET_ANYWHERE is not set"),
    (with_("models.m1.api_key_env", "bad name"), "models.m1.api_key_env: must be an environment variable name"),
    (with_("models.m1.colour", "red"), "models.m1: unknown field 'colour'; allowed: base_url"),
    (with_("models.auto", {"base_url": "http://127.0.0.1:9"}), "models.auto: 'auto' is reserved"),
    (with_("models.router-x", {"base_url": "http://127.0.0.1:9"}), "'router-x' is reserved"),
    (with_("models.bad name", {"base_url": "http://127.0.0.1:9"}), "models.bad name: a name must be"),
    (with_("models.local", {"path": "/nonexistent/model"}), "models.local.path: model folder not found"),
    (with_("routers.r", "/nonexistent/router"), "routers.r.path: router folder not found"),
    (with_("routers.r", 5), "routers.r: must be a folder path"),
    (with_("routers.r", {"path": ".", "knob": "high"}), "routers.r.knob: must be a finite number"),
    (with_("routers.r", {"path": ".", "k": 1}), "routers.r: unknown field 'k'"),
    (with_("default", "m3"), "default: the model 'm3' does not exist on this gateway; valid: m1, m2"),
    (with_("default", "auto"), "default: cannot be 'auto' itself"),
    (with_("log", "/nonexistent-folder/x.jsonl"), "log: folder /nonexistent-folder does not exist"),
    (with_("log", "."), "log: . exists and is not a regular file"),
    (with_("max_request_bytes", 10), "max_request_bytes: must be an integer in [1024,"),
    (with_("api_keys_env", "NOT_SET_ANYWHERE"), "api_keys_env: environment variable NOT_SET_ANYWHERE is not set"),
    (with_("api_keys_env", "COMMAS"), "api_keys_env: environment variable COMMAS holds no keys"),
])
def test_pool_validation_errors_are_one_line_naming_the_field(data, fragment):
    with pytest.raises(GatewayConfigError) as info:
        parse_pool(data, source="pool.yaml", environ={"COMMAS": " , ,"})
    message = str(info.value)
    assert fragment in message and "\n" not in message and message.startswith("pool.yaml")


def test_pool_file_loading(tmp_path):
    (tmp_path / "routers" / "knn").mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    path = tmp_path / "pool.yaml"
    path.write_text("prices: &p {input_price: 1.5, output_price: 2}\n" if False else
                    "models:\n  a: {base_url: 'http://127.0.0.1:1/v1/', api_key_env: K, input_price: 1.5}\n"
                    "  b: {base_url: 'http://127.0.0.1:2/v1', model: upstream-b, timeout: 3}\n"
                    "routers:\n  knn: routers/knn\n  knn-cheap: {path: routers/knn, knob: 0.25}\n"
                    "default: router-knn-cheap\nlog: logs/r.jsonl\n")
    pool = load_pool(path, environ={"K": "secret"})
    a, b = pool.models["a"], pool.models["b"]
    assert a.base_url == "http://127.0.0.1:1/v1" and a.api_key == "secret" and "secret" not in repr(pool)
    assert a.input_price == 1.5 and a.output_price == 0.0 and a.timeout == 60.0 and a.upstream_model == "a"
    assert b.upstream_model == "upstream-b" and b.timeout == 3.0 and b.api_key is None
    assert pool.routers["knn"].path == tmp_path / "routers/knn" and pool.routers["knn-cheap"].knob == 0.25
    assert pool.log == tmp_path / "logs/r.jsonl" and pool.default == "router-knn-cheap"
    # Five levels of ten aliases each: a few hundred bytes of YAML, 10^5 values once expanded.
    bomb = "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 5))
    for text, fragment in [("models: [1", "is not valid YAML at line"), ("- 1\n", "must hold a mapping"),
                           (bomb, "expands (through YAML aliases)")]:
        path.write_text(text)
        with pytest.raises(GatewayConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            load_pool(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(GatewayConfigError, match="cannot read config file"):
        load_pool(path)
    with pytest.raises(GatewayConfigError, match="config file not found"):
        load_pool(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name, expected", [
    ("m1", ("m1", None, None)),
    ("router-r-0.116", (None, "r", 0.116)),
    ("router-r-1e-3", (None, "r", 0.001)),
    ("router-r--2", (None, "r", -2.0)),
    ("router-my-router-3", (None, "my-router", 3.0)),
    ("router-my-router", (None, "my-router", 0.5)),   # its configured knob
    ("auto", (None, "r", 0.7)),
    ("router-r", LookupError),                        # no configured knob
    ("router-r-inf", LookupError),
    ("router-r-", LookupError),
    ("router-zz-0.5", LookupError),
    ("M1", LookupError),
])
def test_model_names_resolve_like_routellm(name, expected):
    from routelab.query.gateway_config import RouterEntry

    routers = {"r": RouterEntry("r", Path(".")), "my-router": RouterEntry("my-router", Path("."), knob=0.5)}
    if expected is LookupError:
        with pytest.raises(LookupError, match="valid: m1, router-my-router-<knob>, router-r-<knob>|default knob"):
            resolve_model_name(name, {"m1": None}, routers, "router-r-0.7")
    else:
        route = resolve_model_name(name, {"m1": None}, routers, "router-r-0.7")
        assert (route.model, route.router, route.knob) == expected


# -- the command -----------------------------------------------------------------------------------------------------

def test_serve_command_rejects_a_bad_pool_with_one_line(tmp_path, capsys):
    from routelab.cli import main

    (tmp_path / "pool.yaml").write_text("models:\n  a: {base_url: 'http://127.0.0.1:1/v1', timeout: -1}\n")
    assert main(["serve", "--config", str(tmp_path / "pool.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("routelab serve: error: ") and "models.a.timeout" in err and "\n" not in err
    assert main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "pool.yaml"), "--port", "70000"]) == 2
    assert "--port must be an integer in [0, 65535]" in capsys.readouterr().err
    (tmp_path / "pool.yaml").write_text("models:\n  a: {base_url: 'http://127.0.0.1:1/v1'}\ndefault: a\n")
    assert main(["serve", "--config", str(tmp_path / "pool.yaml"), "--check"]) == 0
    assert "routelab serve: models a; routers none; default a" in capsys.readouterr().out


def test_routelab_serve_process_answers_the_openai_client(upstreams, tmp_path):
    """The real command in its own process, as a user starts it."""
    openai = pytest.importorskip("openai")
    a, b = upstreams
    (tmp_path / "pool.yaml").write_text(
        f"models:\n  strong: {{base_url: '{a.url}/v1', timeout: 10}}\n  weak: {{base_url: '{b.url}/v1'}}\n"
        "log: routing.jsonl\napi_keys_env: GW_TOKEN\n")
    env = {**os.environ, "GW_TOKEN": TOKEN, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "routelab", "serve", "--config", str(tmp_path / "pool.yaml"),
                             "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, port, seen = time.monotonic() + 90, None, []
        while port is None:  # port 0: the server binds a free port and uvicorn prints it
            assert time.monotonic() < deadline, f"routelab serve did not start within 90 s: {seen}"
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, f"routelab serve exited: {seen}"
                continue
            if found := re.search(r"Uvicorn running on http://" + re.escape("127.0.0.1") + r":(\d+)", seen[-1]):
                port = int(found.group(1))
        assert seen[0].startswith("routelab serve: models strong, weak; routers none; default none;")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0, timeout=20)
        out = client.chat.completions.create(model="weak", messages=[{"role": "user", "content": "hello"}])
        assert out.model == "weak" and out.choices[0].message.content == b.answer("hello")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn shuts down cleanly, then re-raises the signal
    (record,) = [json.loads(line) for line in (tmp_path / "routing.jsonl").read_text().splitlines()]
    assert record["model"] == "weak" and record["status"] == 200


def test_routers_must_route_to_pool_models_and_follow_the_protocol(upstreams):
    pool = parse_pool(pool_data(upstreams[0].url, upstreams[1].url), environ={"STUB_KEY": "k"})
    with pytest.raises(GatewayConfigError, match="^<pool>: routers.kw: router 'kw' routes to 'elsewhere', which the "
                       "pool does not define"):
        create_app(pool, {"kw": KeywordRouter(("strong", "elsewhere"))})
    broken = KeywordRouter()
    broken.knob_name = "temperature"
    with pytest.raises(ValueError, match="knob_name 'temperature'; expected one of willingness_to_pay, threshold"):
        create_app(pool, {"kw": broken})
    with pytest.raises(ValueError, match="differ from those the pool file names"):
        create_app(pool, {})
    for change, where in [({"routers": {"kw": {"path": ".", "knob": -1}}}, "routers.kw.knob"),
                          ({"default": "router-kw--0.5"}, "default")]:
        data = {**pool_data(upstreams[0].url, upstreams[1].url), **change}
        with pytest.raises(GatewayConfigError, match=f"^pool.yaml: {where}: router 'kw' refuses willingness_to_pay"):
            create_app(parse_pool(data, source="pool.yaml", environ={"STUB_KEY": "k"}), {"kw": KeywordRouter()})


def test_routing_log_counts_failed_writes_instead_of_raising(tmp_path):
    from routelab.query.gateway import RoutingLog

    log = RoutingLog(tmp_path / "r.jsonl")
    log.write({"ok": 1})
    log.write({"bad": float("nan")})  # not JSON: counted, not written, not raised
    log.close()
    log._fd = os.open(tmp_path / "r.jsonl", os.O_RDONLY)  # writes now fail with EBADF
    log.write({"ok": 2})
    assert log.errors == 2 and read_log(tmp_path / "r.jsonl") == [{"ok": 1}]
    os.close(log._fd)


def test_fallback_when_an_upstream_cannot_be_reached(upstreams, tmp_path):
    with socket.socket() as s:  # a port nobody listens on: bound, never listened, then closed
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    pool = parse_pool(pool_data(f"http://127.0.0.1:{dead}", upstreams[1].url, log=str(tmp_path / "r.jsonl")),
                      environ={"STUB_KEY": "k"})
    with ServerThread(create_app(pool, {"kw": KeywordRouter()})) as gateway, \
            httpx.Client(base_url=gateway.url, timeout=10) as c:
        r = c.post("/v1/chat/completions", json=chat("router-kw-0.2", "a hard question"))
        assert r.status_code == 200 and r.json()["model"] == "weak"
        (record,) = read_log(tmp_path / "r.jsonl")
        assert [(a["model"], a["status"]) for a in record["attempts"]] == [("strong", "connection"), ("weak", "ok")]
        r = c.post("/v1/chat/completions", json=chat("strong", "a hard question"))
        assert r.status_code == 502 and "cannot reach upstream strong" in r.json()["error"]["message"]


class ScoresTakingRouter(KeywordRouter):
    """KeywordRouter whose route takes the predicted scores, as routelab's query routers do."""

    def route(self, prompts, *, willingness_to_pay, scores_NM=None):
        if scores_NM is None:
            scores_NM = self.predict(prompts)
        return np.argmax(scores_NM - willingness_to_pay * self.cost_M, axis=1)


def test_a_router_that_takes_its_scores_predicts_once_per_request(upstreams):
    pool = parse_pool(pool_data(upstreams[0].url, upstreams[1].url), environ={"STUB_KEY": "k"})
    router = ScoresTakingRouter()
    app = create_app(pool, {"kw": router})
    before = router.calls  # startup routes a probe prompt with each configured knob
    with ServerThread(app) as gateway, httpx.Client(base_url=gateway.url) as c:
        for text, expected in [("a hard one", "strong"), ("an easy one", "weak")]:
            r = c.post("/v1/chat/completions", json=chat("router-kw-0.2", text))
            assert r.json()["model"] == expected
    assert router.calls - before == 2
