"""The routing gateway behind `routelab serve`: an OpenAI-compatible HTTP server in front of a pool of models.

A client sends an ordinary OpenAI request; its `model` field says how to pick the model that answers it:
- a pool model's own name: passed through to that model (no fallback: the client asked for it by name);
- `router-<name>-<knob>` (RouteLLM's convention, e.g. `router-mf-0.116`): router `<name>` scores every model of its
  pool for this prompt and picks one with its knob (`willingness_to_pay` or `threshold`) set to `<knob>`;
  if that model times out, cannot be reached or answers 5xx (or 408/429/401/403: not the client's fault), the
  next-best by predicted score answers instead;
- `auto`: the pool file's `default`.
The response's `model` field and the `x-routelab-model` header name the pool model that answered; a JSONL routing
log (one line per request, written whole under any concurrency) records time, route, chosen and answering model,
predicted scores, every attempt, tokens, estimated cost, latency and status.

Routing reads the text of the last user message (chat) or the prompt (completions), since routers are trained on
single prompts; the whole request goes to the chosen model unchanged but for `model`. Errors are OpenAI-style JSON
(`{"error": {"message", "type", "param", "code"}}`): 400 malformed JSON, 401 bad token, 404 unknown model or path,
413 oversized body, 422 invalid fields, 502/504 when every allowed model failed; never a traceback.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from routelab.query.gateway_backends import UpstreamBackend, UpstreamFailure, UpstreamStream
from routelab.query.gateway_config import (
    GatewayConfigError,
    LocalModel,
    PoolConfig,
    Route,
    UpstreamModel,
    load_pool,
    resolve_model_name,
)

KNOB_NAMES = ("willingness_to_pay", "threshold")
logger = logging.getLogger("uvicorn.error")  # uvicorn's own error log: the server's stderr
CHARS_PER_TOKEN = 4  # the usual rule of thumb, used only when an upstream reports no usage


class GatewayError(Exception):
    """A request the gateway refuses; becomes an OpenAI-style JSON error with this status."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class RoutingLog:
    """Append-only JSONL: each record is one `os.write` of one whole line on an O_APPEND descriptor, under a lock,
    so concurrent requests can neither interleave nor lose lines; an existing log is appended to, never truncated."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._lock = threading.Lock()
        self.errors = 0

    def write(self, record: dict[str, Any]) -> None:
        """Append one record. A failed write (a full disk) is counted and reported on stderr and in /health, not
        raised: the client's answer has already been paid for upstream."""
        with self._lock:
            try:
                line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str, allow_nan=False)
                view = memoryview((line + "\n").encode())
                while view:  # os.write may write less than asked; the lock keeps the rest of the line next to it
                    view = view[os.write(self._fd, view):]
            except (OSError, ValueError) as exc:
                self.errors += 1
                logger.error("routelab gateway: cannot write the routing log %s: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def check_router(name: str, router: Any, models: dict[str, Any]) -> None:
    """The router protocol the gateway relies on; raises ValueError (one line) when `router` does not follow it."""
    for attr in ("model_names", "knob_name", "predict", "route"):
        if not hasattr(router, attr):
            raise ValueError(f"router {name!r} has no {attr!r}; a query router needs model_names, knob_name, "
                             "predict(prompts) and route(prompts, **{knob_name: value})")
    if router.knob_name not in KNOB_NAMES:
        raise ValueError(f"router {name!r} has knob_name {router.knob_name!r}; expected one of {', '.join(KNOB_NAMES)}")
    missing = [m for m in router.model_names if m not in models]
    if missing:
        raise ValueError(f"router {name!r} routes to {', '.join(map(repr, missing))}, which the pool does not "
                         f"define (pool models: {', '.join(models)})")


def load_routers(pool: PoolConfig) -> dict[str, Any]:
    """Load every router folder of the pool file with `routelab.query.load_router`; ValueError names the router."""
    if not pool.routers:
        return {}
    from routelab.query import load_router

    routers = {}
    for name, entry in pool.routers.items():
        try:
            routers[name] = load_router(entry.path)
        except Exception as exc:  # noqa: BLE001 -- any loading error is reported as one line naming the router
            raise GatewayConfigError(f"{pool.source}: routers.{name}: cannot load {entry.path}: {exc}") from None
    return routers


def _check_configured_knobs(pool: PoolConfig, routers: dict[str, Any]) -> None:
    """Route one probe prompt with every knob the pool file sets (each router's `knob:` and `default:`), so that a
    knob the router refuses (a threshold outside [0, 1]) stops startup instead of failing every request."""
    checks = [(f"routers.{name}.knob", name, entry.knob) for name, entry in pool.routers.items()
              if entry.knob is not None]
    if pool.default is not None:
        route = resolve_model_name(pool.default, pool.models, pool.routers)
        if route.router is not None:
            checks.append(("default", route.router, route.knob))
    for where, name, knob in checks:
        router = routers[name]
        try:
            router.route(["a probe prompt"], **{router.knob_name: knob})
        except ValueError as exc:
            raise GatewayConfigError(f"{pool.source}: {where}: router {name!r} refuses {router.knob_name}={knob:g}: "
                                     f"{exc}") from None


def build_app(config_path: str | Path) -> FastAPI:
    """`routelab serve`'s app: load and validate pool.yaml and every router, then create the app."""
    pool = load_pool(config_path)
    return create_app(pool, load_routers(pool))


def create_app(pool: PoolConfig, routers: dict[str, Any] | None = None) -> FastAPI:
    """The gateway app for a validated pool and its loaded routers (name → object following the query-router
    protocol: `model_names`, `knob_name`, `predict(prompts) -> [N, M]`, `route(prompts, **{knob_name: v}) -> [N]`)."""
    routers = dict(routers or {})
    if set(routers) != set(pool.routers):
        raise ValueError(f"routers given ({', '.join(sorted(routers)) or 'none'}) differ from those the pool file "
                         f"names ({', '.join(sorted(pool.routers)) or 'none'})")
    for name, router in routers.items():
        try:
            check_router(name, router, pool.models)
        except ValueError as exc:
            raise GatewayConfigError(f"{pool.source}: routers.{name}: {exc}") from None
    _check_configured_knobs(pool, routers)
    local = {}
    for name, spec in pool.models.items():
        if isinstance(spec, LocalModel):  # loaded now, so that a bad folder stops startup with one line
            from routelab.query.gateway_local import LocalBackend

            try:
                local[name] = LocalBackend(spec)
            except ValueError as exc:
                raise GatewayConfigError(f"{pool.source}: models.{name}.path: {exc}") from None
    gateway = Gateway(pool, routers, local)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="routelab gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                            str(exc.detail))
        return error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal error in the routelab gateway (see its log)", type_="server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        log_errors = gateway.log.errors if gateway.log is not None else 0
        return {"status": "ok", "models": list(pool.models), "routers": list(pool.routers), "log_errors": log_errors}

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if (denied := gateway.authorize(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": gateway.model_cards()})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        if (denied := gateway.authorize(request)) is not None:
            return denied
        card = next((c for c in gateway.model_cards() if c["id"] == model_id), None)
        if card is None:
            try:  # any router-<name>-<knob> resolves, listed or not
                gateway._resolve(model_id)
            except GatewayError as exc:
                return error_response(404, exc.message, param="model", code="model_not_found")
            card = {"id": model_id, "object": "model", "created": 0, "owned_by": "routelab"}
        return JSONResponse(card)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.handle(request, "chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.handle(request, "completions")

    return app


class Gateway:
    """Request handling for one app: resolve `model`, route, try models in order, answer, log."""

    def __init__(self, pool: PoolConfig, routers: dict[str, Any], local: dict[str, Any]) -> None:
        self.pool = pool
        self.routers = routers
        self._router_locks = {name: threading.Lock() for name in routers}
        # routelab's query routers take the scores they would predict as route(..., scores_NM=): passing them saves
        # a second encoding of the prompt per request. Other objects following the protocol are called without it.
        self._takes_scores = {name: "scores_NM" in inspect.signature(r.route).parameters for name, r in routers.items()}
        self.backends: dict[str, Any] = dict(local)
        self.log: RoutingLog | None = None
        self._clients: list[httpx.AsyncClient] = []

    async def start(self) -> None:
        if self.pool.log is not None:
            self.log = RoutingLog(self.pool.log)
        for name, spec in self.pool.models.items():
            if isinstance(spec, UpstreamModel):
                # One client per upstream: its own connection pool, so a slow upstream cannot starve the others.
                # Idle connections are dropped after 3 s, before servers drop them (uvicorn, hence vLLM, after 5 s):
                # reusing one the server is closing at that moment would fail a request for nothing.
                limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100, keepalive_expiry=3.0)
                client = httpx.AsyncClient(timeout=httpx.Timeout(spec.timeout, pool=None), limits=limits)
                self._clients.append(client)
                self.backends[name] = UpstreamBackend(spec, client)

    async def stop(self) -> None:
        for client in self._clients:
            await client.aclose()
        for backend in self.backends.values():
            await backend.aclose()
        if self.log is not None:
            self.log.close()

    # -- requests -------------------------------------------------------------------------------------------------

    def authorize(self, request: Request) -> JSONResponse | None:
        if not self.pool.api_keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        ok = scheme.lower() == "bearer" and token and any(
            hmac.compare_digest(token.encode(), key.encode()) for key in self.pool.api_keys)
        if ok:
            return None
        message = ("Incorrect API key provided." if token else
                   "You didn't provide an API key: send it as an 'Authorization: Bearer <key>' header.")
        return error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def model_cards(self) -> list[dict[str, Any]]:
        ids = list(self.pool.models)
        ids += [f"router-{name}-{entry.knob:g}" for name, entry in self.pool.routers.items() if entry.knob is not None]
        ids += ["auto"] if self.pool.default else []
        return [{"id": i, "object": "model", "created": 0, "owned_by": "routelab"} for i in ids]

    async def handle(self, request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        record: dict[str, Any] = {"time": _now(), "request_id": f"req-{uuid.uuid4().hex[:24]}",
                                  "endpoint": f"/v1/{endpoint}"}
        if (denied := self.authorize(request)) is not None:
            return self._finish(record, started, denied, status=401, error="bad or missing API key")
        try:
            body = await self._read_json(request)
            text, stream = _validate(endpoint, body)
            record["requested"] = body["model"][:200]
            record["stream"] = stream
            route = self._resolve(body["model"])
            record["route"] = route.label
            order, scores = await self._order(route, text)
        except GatewayError as exc:
            response = error_response(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code)
            return self._finish(record, started, response, status=exc.status, error=exc.message)
        record["chosen"] = order[0]
        if scores is not None:
            record["predicted_scores"] = scores
        input_tokens_est = math.ceil(len(_all_text(endpoint, body)) / CHARS_PER_TOKEN)
        attempts: list[dict[str, Any]] = []
        record["attempts"] = attempts
        headers = {"x-routelab-route": route.label, "x-request-id": record["request_id"]}
        last: UpstreamFailure | None = None
        for name in order:
            backend = self.backends[name]
            t0 = time.perf_counter()
            try:
                if stream:
                    opened = await backend.open_stream(endpoint, body)
                else:
                    data = await backend.complete(endpoint, body)
            except Exception as exc:  # noqa: BLE001 -- an unexpected error is one failed attempt, not a crash
                failure = exc if isinstance(exc, UpstreamFailure) else UpstreamFailure(
                    name, "gateway_error", f"{type(exc).__name__} while calling {name}: {str(exc)[:200]}")
                if not isinstance(exc, UpstreamFailure):
                    logger.exception("routelab gateway: unexpected error while calling %s", name)
                attempts.append({"model": name, "status": failure.kind, "error": failure.message,
                                 "latency_ms": _ms(t0)})
                last = failure
                if not failure.retryable:
                    break
                continue
            attempts.append({"model": name, "status": "ok", "latency_ms": _ms(t0)})
            headers.update({"x-routelab-model": name, "x-routelab-attempts": str(len(attempts))})
            record["model"] = name
            if stream:
                return StreamingResponse(self._relay(opened, name, record, started, input_tokens_est),
                                         media_type="text/event-stream",
                                         headers={**headers, "cache-control": "no-cache"})
            data["model"] = name
            self._account(record, name, data.get("usage"), input_tokens_est, _output_chars(data))
            return self._finish(record, started, JSONResponse(data, headers=headers), status=200)
        assert last is not None
        status, message, response = _failure_response(last, attempts, headers)
        return self._finish(record, started, response, status=status, error=message)

    async def _read_json(self, request: Request) -> Any:
        limit = self.pool.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise GatewayError(413, f"the request body is {declared} bytes; this gateway accepts at most {limit}",
                               code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no content-length: count what arrives
            size += len(chunk)
            if size > limit:
                raise GatewayError(413, f"the request body exceeds {limit} bytes, the most this gateway accepts",
                                   code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise GatewayError(400, f"could not parse the JSON body of your request ({reason}); send a JSON object "
                               "with 'Content-Type: application/json'", code="invalid_json") from None

    def _resolve(self, model: str) -> Route:
        try:
            return resolve_model_name(model, self.pool.models, self.pool.routers, self.pool.default)
        except LookupError as exc:
            raise GatewayError(404, str(exc), param="model", code="model_not_found") from None

    async def _order(self, route: Route, text: str) -> tuple[list[str], dict[str, float] | None]:
        """The models to try, best first, and the router's predicted score per model (None for pass-through)."""
        if route.router is None:
            return [route.model], None
        name = route.router
        router = self.routers[name]
        try:
            scores_M, choice = await anyio.to_thread.run_sync(self._route_sync, name, route.knob, text)
        except ValueError as exc:  # the router's own check of its knob: the client chose the value
            raise GatewayError(400, f"router {name!r} refused {router.knob_name}={route.knob:g}: {exc}",
                               param="model", code="invalid_knob") from None
        except Exception as exc:  # noqa: BLE001 -- a broken router is the server's fault: 500, logged, no traceback
            raise GatewayError(500, f"router {name!r} failed: {type(exc).__name__}: {str(exc)[:200]}",
                               type_="server_error", code="router_failed") from None
        # Fallback order: the router's choice, then the others by predicted score (ties by pool order).
        rest = sorted((i for i in range(len(scores_M)) if i != choice), key=lambda i: (-scores_M[i], i))
        names = router.model_names
        predicted = {names[i]: round(float(s), 6) if math.isfinite(s) else None for i, s in enumerate(scores_M)}
        return [names[i] for i in [choice, *rest]], predicted

    def _route_sync(self, name: str, knob: float, text: str) -> tuple[np.ndarray, int]:
        router = self.routers[name]
        m = len(router.model_names)
        # One call at a time per router: routers may cache encodings or update state (online bandits).
        with self._router_locks[name]:
            scores = np.asarray(router.predict([text]), dtype=np.float64)
            extra = {"scores_NM": scores} if self._takes_scores[name] else {}
            choice = np.asarray(router.route([text], **{router.knob_name: knob}, **extra)).reshape(-1)
        if scores.shape != (1, m) or choice.shape != (1,) or not 0 <= int(choice[0]) < m:
            raise RuntimeError(f"router {name!r} broke its contract: predict gave shape {scores.shape} (expected "
                               f"(1, {m})), route gave {choice.tolist()}")
        scores_M = np.where(np.isfinite(scores[0]), scores[0], -np.inf)
        return scores_M, int(choice[0])

    async def _relay(self, opened: UpstreamStream, name: str, record: dict[str, Any], started: float,
                     input_tokens_est: int) -> AsyncIterator[bytes]:
        """Forward the upstream's SSE events with `model` set to the pool name; log once the stream ends."""
        usage, chars, status, error = None, 0, "client_disconnected", None
        try:
            async for payload in opened.events():
                if payload.strip() == "[DONE]":
                    status = "ok"
                    yield b"data: [DONE]\n\n"
                    break
                try:
                    event = json.loads(payload)
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    if "model" in event:
                        event["model"] = name
                    usage = event.get("usage") or usage
                    chars += _output_chars(event)
                    if "error" in event:
                        error = _error_text(event["error"])
                    payload = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
                yield f"data: {payload}\n\n".encode()
            else:
                status = "ok"  # the upstream closed without [DONE]: what it sent is all there is
        except UpstreamFailure as failure:
            status, error = failure.kind, failure.message
            err = {"error": {"message": f"the stream from {name} broke: {failure.message}", "type": "upstream_error",
                             "param": None, "code": "upstream_unavailable"}}
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            # Log first: on a client disconnect this runs inside a cancelled scope where any await is cancelled.
            self._account(record, name, usage, input_tokens_est, chars)
            if status == "ok":  # an error event from the upstream inside a stream that otherwise ended normally
                status = 200 if error is None else "upstream_error"
            self._finish(record, started, None, status=status, error=error)
            with anyio.CancelScope(shield=True):
                await opened.aclose()

    def _account(self, record: dict[str, Any], name: str, usage: Any, input_est: int, output_chars: int) -> None:
        spec = self.pool.models[name]
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int) \
                and isinstance(usage.get("completion_tokens"), int):
            tokens_in, tokens_out, source = usage["prompt_tokens"], usage["completion_tokens"], "usage"
        else:
            tokens_in, tokens_out, source = input_est, math.ceil(output_chars / CHARS_PER_TOKEN), "characters/4"
        record["tokens"] = {"input": tokens_in, "output": tokens_out, "source": source}
        record["cost_usd"] = (tokens_in * spec.input_price + tokens_out * spec.output_price) / 1e6

    def _finish(self, record: dict[str, Any], started: float, response: Response | None, *, status: int | str,
                error: str | None = None) -> Response | None:
        record["status"] = status
        if error is not None:
            record["error"] = error
        record["latency_ms"] = _ms(started)
        if self.log is not None:
            self.log.write(record)
        if response is not None:  # every answer, errors included, can be found in the log by this id
            response.headers["x-request-id"] = record["request_id"]
        return response


def _failure_response(last: UpstreamFailure, attempts: list[dict[str, Any]],
                      headers: dict[str, str]) -> tuple[int, str, JSONResponse]:
    """The answer when no model answered: the upstream's own refusal of the client's request (not retryable), or
    502 (504 when every attempt timed out) naming the models tried."""
    if not last.retryable:
        if last.body is not None:
            return last.status, last.message, JSONResponse(last.body, status_code=last.status, headers=headers)
        return last.status, last.message, error_response(last.status, last.message, headers=headers)
    status = 504 if all(a["status"] == "timeout" for a in attempts) else 502
    message = f"no model could answer (tried {', '.join(a['model'] for a in attempts)}); last error: {last.message}"
    return status, message, error_response(status, message, type_="upstream_error", code="upstream_unavailable",
                                           headers=headers)


def _validate(endpoint: str, body: Any) -> tuple[str, bool]:
    """Check the fields the gateway reads (the rest goes to the model as sent); return (routing text, stream)."""
    if not isinstance(body, dict):
        raise GatewayError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                           code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(422, "'model' is required: a pool model name, router-<name>-<knob> or auto",
                           param="model", code="invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError(422, f"'stream' must be true or false, got {stream!r}", param="stream", code="invalid_type")
    if endpoint == "chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GatewayError(422, "'messages' is required: a non-empty list of {role, content} objects",
                               param="messages", code="invalid_value")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise GatewayError(422, f"messages[{i}] must be an object with a string 'role'",
                                   param=f"messages[{i}]", code="invalid_value")
            content = message.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise GatewayError(422, f"messages[{i}].content must be a string, a list of parts or null",
                                   param=f"messages[{i}].content", code="invalid_type")
        users = [m for m in messages if m["role"] == "user"]
        return _content_text((users or messages)[-1].get("content")), stream
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, stream
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt), stream
    raise GatewayError(422, "'prompt' is required: a string or a non-empty list of strings", param="prompt",
                       code="invalid_value")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _all_text(endpoint: str, body: dict[str, Any]) -> str:
    if endpoint == "chat/completions":
        return "\n".join(_content_text(m.get("content")) for m in body["messages"])
    prompt = body["prompt"]
    return prompt if isinstance(prompt, str) else "\n".join(prompt)


def _output_chars(data: dict[str, Any]) -> int:
    """Characters of generated text in a response or stream chunk (for the cost estimate without usage)."""
    total = 0
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        for part in (choice.get("message"), choice.get("delta")):
            if isinstance(part, dict) and isinstance(part.get("content"), str):
                total += len(part["content"])
        if isinstance(choice.get("text"), str):
            total += len(choice["text"])
    return total


def _error_text(err: Any) -> str:
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    return str(err)[:200]


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
