"""The models behind the gateway: upstream OpenAI-compatible endpoints (over httpx) and local routelab models.

A backend answers one request for one model, or raises `UpstreamFailure`, which says whether another model may be
tried instead (`retryable`: a timeout, a connection error, a 5xx, a 429, or an upstream refusing the gateway's own
credentials — none of them the client's fault) or whether the client's request itself was refused (any other 4xx,
returned to the client as the upstream sent it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from routelab.query.gateway_config import UpstreamModel

# Statuses after which the next-best model is tried: the upstream is down, overloaded or misconfigured.
RETRYABLE_STATUS = frozenset({401, 403, 408, 429})


class UpstreamFailure(Exception):
    """One failed attempt. `kind`: timeout, connection, status or protocol; `status`: what the client gets if this
    is the last attempt; `body`: the upstream's JSON error body when it is passed through."""

    def __init__(self, model: str, kind: str, message: str, *, status: int = 502, retryable: bool = True,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.model, self.kind, self.message = model, kind, message
        self.status, self.retryable, self.body = status, retryable, body


@dataclass
class UpstreamStream:
    """An opened SSE stream whose first event has already arrived (so a stall before it could still fall back).
    `events` yields the payload of every `data:` line, the buffered first one included."""

    model: str
    first: list[str]
    _lines: AsyncIterator[str]
    _response: httpx.Response
    timeout: float
    _closed: bool = field(default=False)

    async def events(self) -> AsyncIterator[str]:
        for payload in self.first:
            yield payload
        while True:
            try:
                line = await asyncio.wait_for(anext(self._lines), self.timeout)
            except StopAsyncIteration:
                return
            except (asyncio.TimeoutError, httpx.TimeoutException):
                raise UpstreamFailure(self.model, "timeout", f"upstream {self.model} stalled mid-stream for more "
                                      f"than {self.timeout:g} s", status=504) from None
            except httpx.HTTPError as exc:
                raise UpstreamFailure(self.model, "connection", f"upstream {self.model} broke the stream: "
                                      f"{type(exc).__name__}") from None
            payload = _data_payload(line)
            if payload is not None:
                yield payload

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._response.aclose()


def _data_payload(line: str) -> str | None:
    # Only `data:` lines carry OpenAI's stream; comments (':'), `event:` and `id:` lines are not forwarded.
    if line.startswith("data:"):
        return line[5:].lstrip(" ")
    return None


class UpstreamBackend:
    """One OpenAI-compatible endpoint. `timeout` bounds a whole non-streaming call, and for a stream the wait for its
    first event and for each later line."""

    def __init__(self, spec: UpstreamModel, client: httpx.AsyncClient) -> None:
        self.spec = spec
        self.name = spec.name
        self.client = client
        self.headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}

    def _payload(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "model": self.spec.upstream_model}

    async def complete(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.spec.base_url}/{endpoint}"
        try:
            response = await asyncio.wait_for(
                self.client.post(url, json=self._payload(body), headers=self.headers), self.spec.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise UpstreamFailure(self.name, "timeout", f"upstream {self.name} did not answer within "
                                  f"{self.spec.timeout:g} s", status=504) from None
        except httpx.HTTPError as exc:
            raise UpstreamFailure(self.name, "connection", f"cannot reach upstream {self.name}: "
                                  f"{type(exc).__name__}") from None
        self._check_status(response.status_code, response.content)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise UpstreamFailure(self.name, "protocol", f"upstream {self.name} answered with something other than "
                                  "a JSON object")
        return data

    async def open_stream(self, endpoint: str, body: dict[str, Any]) -> UpstreamStream:
        url = f"{self.spec.base_url}/{endpoint}"
        request = self.client.build_request("POST", url, json=self._payload(body), headers=self.headers)
        response = None
        try:
            response = await asyncio.wait_for(self.client.send(request, stream=True), self.spec.timeout)
            if response.status_code >= 400:
                content = await asyncio.wait_for(response.aread(), self.spec.timeout)
                self._check_status(response.status_code, content)
            if "text/event-stream" not in response.headers.get("content-type", ""):
                raise UpstreamFailure(self.name, "protocol", f"upstream {self.name} did not answer with a stream "
                                      "(content-type is not text/event-stream)")
            lines = response.aiter_lines()
            first: list[str] = []
            while not first:
                line = await asyncio.wait_for(anext(lines), self.spec.timeout)
                payload = _data_payload(line)
                if payload is not None:
                    first.append(payload)
            return UpstreamStream(self.name, first, lines, response, self.spec.timeout)
        except BaseException as exc:
            if response is not None:
                await response.aclose()
            if isinstance(exc, UpstreamFailure):
                raise
            if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
                raise UpstreamFailure(self.name, "timeout", f"upstream {self.name} did not start streaming within "
                                      f"{self.spec.timeout:g} s", status=504) from None
            if isinstance(exc, StopAsyncIteration):
                raise UpstreamFailure(self.name, "protocol", f"upstream {self.name} closed the stream before "
                                      "sending any event") from None
            if isinstance(exc, httpx.HTTPError):
                raise UpstreamFailure(self.name, "connection", f"cannot reach upstream {self.name}: "
                                      f"{type(exc).__name__}") from None
            raise

    def _check_status(self, status: int, content: bytes) -> None:
        if status < 400:
            return
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        detail = _error_message(body) or content[:200].decode("utf-8", "replace")
        if status >= 500 or status in RETRYABLE_STATUS:
            raise UpstreamFailure(self.name, "status", f"upstream {self.name} answered HTTP {status}: {detail}",
                                  status=502)
        # The client's request was refused (400, 404, 413, 422 ...): the client gets the upstream's answer.
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
            body = None
        raise UpstreamFailure(self.name, "status", f"upstream {self.name} refused the request (HTTP {status}): "
                              f"{detail}", status=status, retryable=False, body=body)

    async def aclose(self) -> None:
        pass  # the shared httpx client is closed by the gateway


def _error_message(body: Any) -> str | None:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:200]
        if isinstance(err, str):
            return err[:200]
    return None
