"""Local routelab models behind the gateway: a model folder (`routelab.load_model`) generating in this process.

The models routelab trains are small base language models, not chat models, so a chat request becomes plain text:
one `role: content` line per message, then `assistant:` for the model to continue. Sampling follows the request:
`max_tokens` (or `max_completion_tokens`; at most the pool entry's `max_new_tokens`, which is also the default),
`temperature` (default 1, as OpenAI's; 0 is greedy), `top_k` (an extension), `seed`, `stop`; generation stops at the
tokenizer's `<|endoftext|>`. A completions request may send a list of prompts: they are generated as one batch, one
choice each. Options a local model cannot honour (`n` > 1, `top_p` < 1, ...) are refused with a 400 rather than
ignored. Generation runs in a worker thread, one request at a time per model (the model is not re-entrant); a
streamed request gets the whole answer in one event once it is generated (generation has no per-token callback).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio

from routelab.query.gateway_backends import UpstreamFailure
from routelab.query.gateway_config import LocalModel

EOS_TOKEN = "<|endoftext|>"
UNSUPPORTED = {"n": 1, "top_p": 1, "logprobs": None, "tools": None, "best_of": 1, "echo": False, "suffix": None}


class BufferedStream:
    """A stream whose events are all known: the same interface as `UpstreamStream`."""

    def __init__(self, payloads: list[str]) -> None:
        self.first = payloads

    async def events(self) -> AsyncIterator[str]:
        for payload in self.first:
            yield payload

    async def aclose(self) -> None:
        pass


class LocalBackend:
    def __init__(self, spec: LocalModel) -> None:
        from routelab.models.decoding import generation_problem
        from routelab.models.io import load_model

        self.spec = spec
        self.name = spec.name
        self.model, self.tokenizer = load_model(spec.path)  # ModelFolderError (a ValueError) names the file
        problem = generation_problem(self.model)
        if problem is not None:
            raise ValueError(f"{spec.path}: {problem}")
        self.eos_id = self.tokenizer.token_to_id(EOS_TOKEN)
        self.max_seq_len = self.model.config.max_seq_len
        self._lock = threading.Lock()

    async def complete(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        params = self._params(endpoint, body)
        prompts = _prompts(endpoint, body)
        try:
            results = await asyncio.wait_for(
                anyio.to_thread.run_sync(self._generate, prompts, params, abandon_on_cancel=True), self.spec.timeout)
        except asyncio.TimeoutError:
            raise UpstreamFailure(self.name, "timeout", f"local model {self.name} did not finish within "
                                  f"{self.spec.timeout:g} s", status=504) from None
        except UpstreamFailure:
            raise
        except Exception as exc:  # noqa: BLE001 -- a failing model is reported (and fallen back from), not raised
            raise UpstreamFailure(self.name, "local_error", f"local model {self.name} failed: "
                                  f"{type(exc).__name__}: {str(exc)[:200]}") from None
        usage = {"prompt_tokens": sum(r[1] for r in results), "completion_tokens": sum(r[2] for r in results)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        head = {"id": f"{'chatcmpl' if endpoint == 'chat/completions' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "created": int(time.time()), "model": self.name}
        if endpoint == "chat/completions":
            text, _, _, finish = results[0]
            return {**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}
        return {**head, "object": "text_completion", "usage": usage, "choices": [
            {"index": i, "text": text, "finish_reason": finish} for i, (text, _, _, finish) in enumerate(results)]}

    async def open_stream(self, endpoint: str, body: dict[str, Any]) -> BufferedStream:
        import json

        data = await self.complete(endpoint, body)
        events = []
        for choice in data["choices"]:
            if endpoint == "chat/completions":
                delta = {"role": "assistant", "content": choice["message"]["content"]}
                events.append({"index": choice["index"], "delta": delta, "finish_reason": None})
                last = {"index": choice["index"], "delta": {}, "finish_reason": choice["finish_reason"]}
            else:
                events.append({"index": choice["index"], "text": choice["text"], "finish_reason": None})
                last = {"index": choice["index"], "text": "", "finish_reason": choice["finish_reason"]}
            events.append(last)
        kind = "chat.completion.chunk" if endpoint == "chat/completions" else "text_completion"
        head = {"id": data["id"], "object": kind, "created": data["created"], "model": self.name}
        payloads = [json.dumps({**head, "choices": [c]}) for c in events]
        payloads[-1] = json.dumps({**head, "choices": [events[-1]], "usage": data["usage"]})
        return BufferedStream([*payloads, "[DONE]"])

    async def aclose(self) -> None:
        pass

    def _params(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        def refuse(param: str, message: str) -> UpstreamFailure:
            err = {"error": {"message": message, "type": "invalid_request_error", "param": param,
                             "code": "invalid_value"}}
            return UpstreamFailure(self.name, "status", message, status=400, retryable=False, body=err)

        for key, neutral in UNSUPPORTED.items():
            if body.get(key, neutral) not in (neutral, None):
                raise refuse(key, f"{key}={body[key]!r} is not supported by the local model {self.name}")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_new = body.get(key)
        if max_new is None:
            max_new = self.spec.max_new_tokens
        if not _is_int(max_new) or not 1 <= max_new <= self.spec.max_new_tokens:
            raise refuse(key, f"{key} must be an integer in [1, {self.spec.max_new_tokens}] for the local model "
                         f"{self.name}, got {max_new!r}")
        temperature = body.get("temperature")
        temperature = 1.0 if temperature is None else temperature
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
            raise refuse("temperature", f"temperature must be a number in [0, 2], got {temperature!r}")
        top_k = body.get("top_k")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise refuse("top_k", f"top_k must be an integer >= 1, got {top_k!r}")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise refuse("seed", f"seed must be an integer >= 0, got {seed!r}")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise refuse("stop", f"stop must be a string or a list of non-empty strings, got {stop!r}")
        return {"max_new_tokens": max_new, "temperature": float(temperature), "top_k": top_k, "seed": seed,
                "stop": stop or []}

    def _generate(self, prompts: list[str], params: dict[str, Any]) -> list[tuple[str, int, int, str]]:
        """(text, prompt tokens, completion tokens, finish_reason) per prompt."""
        from routelab.models.decoding import generate

        ids = [enc.ids for enc in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]
        ids = [row if row else ([self.eos_id] if self.eos_id is not None else row) for row in ids]
        max_new = params["max_new_tokens"]
        for row in ids:
            if not row or len(row) + max_new > self.max_seq_len:
                message = (f"the prompt has {len(row)} tokens; with max_tokens={max_new} that exceeds the local "
                           f"model {self.name}'s context of {self.max_seq_len} tokens")
                err = {"error": {"message": message, "type": "invalid_request_error", "param": "messages",
                                 "code": "context_length_exceeded"}}
                raise UpstreamFailure(self.name, "status", message, status=400, retryable=False, body=err)
        with self._lock:
            out = generate(self.model, ids, max_new_tokens=max_new, temperature=params["temperature"],
                           top_k=params["top_k"], seed=params["seed"], eos_id=self.eos_id)
        results = []
        for row, new in zip(ids, out.tokens):
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            finish = "length" if len(new) == max_new else "stop"
            cut = min((i for i in (text.find(s) for s in params["stop"]) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            results.append((text, len(row), len(new), finish))
        return results


def _prompts(endpoint: str, body: dict[str, Any]) -> list[str]:
    if endpoint == "chat/completions":
        from routelab.query.gateway import _content_text

        lines = [f"{m['role']}: {_content_text(m.get('content'))}" for m in body["messages"]]
        return ["\n".join(lines) + "\nassistant:"]
    prompt = body["prompt"]
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
