"""The gateway serving a local routelab model folder in-process, over real loopback HTTP."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from test_gateway import KeywordRouter, ServerThread, StubUpstream, chat, sse_events

pytestmark = pytest.mark.timeout(120)
decoding = pytest.importorskip("routelab.models.decoding", reason="generation (issue 9) is not in this checkout")

from routelab.data.tokenizer import train_tokenizer  # noqa: E402
from routelab.models import ModelConfig, MoETransformerLM  # noqa: E402
from routelab.models.io import load_model, save_model  # noqa: E402
from routelab.query.gateway import create_app  # noqa: E402
from routelab.query.gateway_config import GatewayConfigError, parse_pool  # noqa: E402

MAX_NEW = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    text = "def add(a, b):\n    return a + b\n\nuser: hello there\nassistant: hi\n" * 20
    tokenizer = train_tokenizer([text], vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, d_ff=32,
                      num_experts=4, max_seq_len=48)
    model = MoETransformerLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so that greedy tokens differ from step to step
        for p in model.parameters():
            p.mul_(4.0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("local") / "model")


def greedy_by_recompute(folder, prompt: str, n: int) -> str:
    """The reference: the whole growing sequence recomputed each step, argmax, stop at <|endoftext|>."""
    model, tokenizer = load_model(folder)
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + new]))[0][0, -1].argmax())
            if token == eos:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def gateway(folder):
    upstream = StubUpstream("B")
    with ServerThread(upstream.app) as up:
        pool = parse_pool({"models": {"tiny": {"path": str(folder), "max_new_tokens": MAX_NEW, "timeout": 60},
                                      # no generation finishes within a microsecond: always times out
                                      "tiny-slow": {"path": str(folder), "timeout": 1e-6},
                                      "weak": {"base_url": f"{up.url}/v1"}},
                           "routers": {"kw": ".", "slow": "."}})
        routers = {"kw": KeywordRouter(("tiny", "weak")), "slow": KeywordRouter(("tiny-slow", "weak"))}
        with ServerThread(create_app(pool, routers)) as server:
            server.upstream = upstream
            yield server


def test_a_local_model_that_times_out_falls_back(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=chat("router-slow-0", "hard"))
    assert r.status_code == 200 and r.json()["model"] == "weak" and r.headers["x-routelab-attempts"] == "2"
    assert r.json()["choices"][0]["message"]["content"] == gateway.upstream.answer("hard")


def test_local_model_answers_completions_chat_and_streams(gateway, folder):
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "def add", "temperature": 0, "max_tokens": 6})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny" and body["choices"][0]["text"] == greedy_by_recompute(folder, "def add", 6)
        assert body["usage"]["completion_tokens"] <= 6
        # A chat request is routed (KeywordRouter sends a hard prompt to its first model, the local one).
        r = c.post("/v1/chat/completions", json=chat("router-kw-0.2", "hard", temperature=0))
        assert r.status_code == 200 and r.headers["x-routelab-model"] == "tiny"
        expected = greedy_by_recompute(folder, "system: be brief\nuser: hard\nassistant:", MAX_NEW)
        assert r.json()["choices"][0]["message"]["content"] == expected
        with c.stream("POST", "/v1/chat/completions", json=chat("tiny", "hard", temperature=0, stream=True)) as s:
            events = sse_events(s)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == expected
        assert all(ch["model"] == "tiny" for ch in chunks) and chunks[-1]["usage"]["prompt_tokens"] > 0
        # A batch of prompts: one choice each, equal to each prompt generated alone.
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": ["def", "return a"], "temperature": 0,
                                           "max_tokens": 4})
        assert [ch["text"] for ch in r.json()["choices"]] == [greedy_by_recompute(folder, p, 4)
                                                                for p in ("def", "return a")]


@pytest.mark.parametrize("extra, param, code", [
    ({"n": 2}, "n", "invalid_value"),
    ({"max_tokens": MAX_NEW + 1}, "max_tokens", "invalid_value"),
    ({"temperature": -1}, "temperature", "invalid_value"),
    ({"top_p": 0.5}, "top_p", "invalid_value"),
    ({"prompt": "x " * 60}, "messages", "context_length_exceeded"),
])
def test_local_model_refuses_what_it_cannot_honour(gateway, extra, param, code):
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "def", **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param and r.json()["error"]["code"] == code


def test_a_folder_that_is_not_a_model_stops_startup(tmp_path):
    pool = parse_pool({"models": {"tiny": {"path": str(tmp_path)}}}, source="pool.yaml")
    with pytest.raises(GatewayConfigError, match=r"^pool.yaml: models.tiny.path: .*config.json"):
        create_app(pool)
