"""`routelab serve` routing with a real query router: fitted on a small synthetic outcome table, saved to disk,
named in pool.yaml and loaded by the server the way users run it."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from test_gateway import ServerThread, StubUpstream, chat, read_log

pytestmark = pytest.mark.timeout(120)
query = pytest.importorskip("routelab.query")
if not hasattr(query, "load_router"):
    pytest.skip("the query routers (issue 14) are not in this checkout", allow_module_level=True)

from routelab.query.gateway import build_app  # noqa: E402

MATH = ["solve the integral of x squared", "compute the derivative of sine x", "solve for x in 3x plus 2 equals 8",
        "integrate the polynomial x cubed", "find the derivative of the exponential"]
POEMS = ["write a poem about the sea", "write a short poem on autumn leaves", "compose a poem about the moon",
         "write a poem for a birthday", "a haiku poem about rain"]
MODELS = ["math-pro", "poet-pro", "cheap"]


def outcomes():
    """math-pro answers every math prompt, poet-pro every poem, cheap half of everything; cheap costs 1% of them."""
    prompts = [f"{p} please" for p in MATH + POEMS] * 2
    scores = np.array([[1.0, 0.0, 0.5]] * len(MATH) + [[0.0, 1.0, 0.5]] * len(POEMS))
    scores = np.concatenate([scores, scores])
    costs = np.tile([1.0, 1.0, 0.01], (len(prompts), 1))
    return query.Outcomes(prompts=prompts, model_names=MODELS, scores_NM=scores, costs_NM=costs)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real-router")
    router = query.create_router("knn", k=3, encoder="tfidf").fit(outcomes())
    router.save(tmp / "routers" / "knn")
    upstream = StubUpstream("U")
    with ServerThread(upstream.app) as up:
        models = "".join(f"  {m}: {{base_url: '{up.url}/v1', model: upstream-{m}}}\n" for m in MODELS)
        (tmp / "pool.yaml").write_text(f"models:\n{models}routers:\n  knn: routers/knn\ndefault: router-knn-0\n"
                                       "log: routing.jsonl\n")
        with ServerThread(build_app(tmp / "pool.yaml")) as server:
            yield server, upstream, tmp


@pytest.mark.parametrize("text, model, expected", [
    ("please solve the integral of x squared", "router-knn-0", "math-pro"),
    ("write a poem about the autumn sea", "auto", "poet-pro"),          # default: router-knn-0
    ("write a poem about the autumn sea", "router-knn-2", "cheap"),     # 2 $ of quality per $: cheap wins
])
def test_a_saved_router_loaded_by_the_server_routes_requests(served, text, model, expected):
    server, upstream, tmp = served
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=chat(model, text))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == expected and upstream.requests[-1]["model"] == f"upstream-{expected}"
    record = [x for x in read_log(tmp / "routing.jsonl") if x["request_id"] == r.headers["x-request-id"]][0]
    router = query.load_router(tmp / "routers" / "knn")
    assert record["predicted_scores"] == pytest.approx(dict(zip(MODELS, router.predict([text])[0])), abs=1e-6)
    assert json.dumps(record)  # the record is plain JSON
