"""Query routers: registry, the knob contract, each router's defining property, save/load, calibration, and the
offline WordLlama encoder."""

import socket

import numpy as np
import pytest
from query_cases import one_blas_thread, three_model_table, two_model_table  # noqa: F401

import routelab
from routelab.query import QueryRouter, calibrate, create_router, list_routers, load_router
from routelab.query.encoders import create_encoder

pytestmark = pytest.mark.usefixtures("one_blas_thread")

# fewer epochs than the defaults: the synthetic tables are learned in far fewer
FAST = {"mf": {"epochs": 60}, "mlp": {"epochs": 120}}
ALL = ["cascade", "cluster", "knn", "linucb", "mf", "mlp", "oracle", "random", "single", "sw_ranking"]
LEARNED = ["cascade", "cluster", "knn", "linucb", "mf", "mlp", "sw_ranking"]


@pytest.fixture(scope="module")
def table3():
    return three_model_table(300, seed=0), three_model_table(200, seed=1)


@pytest.fixture(scope="module")
def table2():
    return two_model_table(300, seed=0), two_model_table(200, seed=1)


@pytest.fixture(scope="module")
def enc3(table3):
    return create_encoder("tfidf").fit(table3[0].prompts)


@pytest.fixture(scope="module")
def enc2(table2):
    return create_encoder("tfidf").fit(table2[0].prompts)


def _fit(name, train, enc, **options):
    router = create_router(name, **{**FAST.get(name, {}), **options})
    return router.fit(train, encoder=enc if router.uses_encoder else None)


@pytest.fixture(scope="module")
def fitted3(table3, enc3):
    train, test = table3
    enc = enc3
    routers = {}
    for name in ALL:
        r = create_router(name, **FAST.get(name, {}))
        r.fit(train, encoder=enc if r.uses_encoder else None)
        if r.needs_test_labels:
            r.observe(test)
        routers[name] = r
    return routers


def _quality(outcomes, choice):
    return outcomes.scores_NM[np.arange(outcomes.num_prompts), choice].mean()


def test_registry_is_apart_from_the_token_routers():
    assert list_routers() == ALL
    with pytest.raises(ValueError, match="valid names: cascade, cluster"):
        create_router("nope")
    with pytest.raises(ValueError, match="no option 'kk'; options: k, encoder, seed"):
        create_router("knn", kk=3)
    with pytest.raises(ValueError, match="encoder must be one of 'tfidf', 'wordllama'"):
        create_router("knn", encoder="bert")
    from routelab.routing.registry import _ROUTERS as token_routers

    assert not any(issubclass(cls, QueryRouter) for cls in token_routers.values())
    assert "sw_ranking" not in routelab.list_routers()


@pytest.mark.parametrize("name", LEARNED)
def test_each_router_beats_random_on_a_learnable_table(name, fitted3, table3):
    _, test = table3
    router = fitted3[name]
    knob = {"threshold": 0.5} if router.knob_name == "threshold" else {"willingness_to_pay": 0.0}
    q_router = _quality(test, router.route(test.prompts, **knob))
    q_random = np.mean([_quality(test, create_router("random", seed=s).fit(table3[0]).route(test.prompts))
                        for s in range(5)])
    # the topic decides the best model: small on A, medium on B (0.9 each); random gets about 0.53
    assert q_router > q_random + 0.15, (name, q_router, q_random)


def test_oracle_is_the_upper_bound_and_single_is_constant(fitted3, table3):
    _, test = table3
    best = test.scores_NM.max(axis=1).mean()
    assert _quality(test, fitted3["oracle"].route(test.prompts)) == pytest.approx(best)
    for name in LEARNED:
        r = fitted3[name]
        knob = {"threshold": 0.5} if r.knob_name == "threshold" else {}
        assert _quality(test, r.route(test.prompts, **knob)) <= best + 1e-12
    single = fitted3["single"]
    assert set(single.route(test.prompts, willingness_to_pay=1e9).tolist()) == {2}  # "large": best mean score


def test_willingness_to_pay_trades_quality_for_cost(fitted3, table3):
    _, test = table3
    knn = fitted3["knn"]
    cheap = knn.route(test.prompts, willingness_to_pay=1e9)
    assert (cheap == 0).all()  # a huge λ buys the cheapest model
    c0 = knn.cost_M[knn.route(test.prompts, willingness_to_pay=0.0)].mean()
    c1 = knn.cost_M[knn.route(test.prompts, willingness_to_pay=2000.0)].mean()
    assert c1 <= c0


def test_knn_predicts_the_mean_of_the_k_nearest_training_prompts(table3, enc3):
    train, test = table3
    router = _fit("knn", train, enc3, k=7)
    x_train = router.encoder.encode(train.prompts).astype(np.float64)
    x_test = router.encoder.encode(test.prompts[:10]).astype(np.float64)
    for i in range(10):  # a plain loop: sort every training prompt by cosine similarity
        sims = [float(x_test[i] @ x_train[j]) for j in range(len(x_train))]
        nearest = sorted(range(len(sims)), key=lambda j: -sims[j])[:7]
        kth, next_ = sims[nearest[-1]], sorted(sims, reverse=True)[7]
        if kth - next_ > 1e-6:  # ties at the k-th neighbour may be broken either way
            np.testing.assert_allclose(router.predict([test.prompts[i]])[0], train.scores_NM[nearest].mean(0),
                                       atol=1e-9)


def test_cascade_charges_every_call_and_answers_with_the_last(table3, enc3):
    train, test = table3
    # a perfect judge (error 0): stop at the first chain model that is right
    router = _fit("cascade", train, enc3, chain=["small", "large"], judge_error=0.0)
    router.observe(test)
    calls = router.calls(test.prompts, threshold=0.5)
    choice = router.route(test.prompts, threshold=0.5)
    small_right = test.scores_NM[:, 0] >= 0.5
    np.testing.assert_array_equal(calls[:, 0], True)
    np.testing.assert_array_equal(calls[:, 2], ~small_right)
    np.testing.assert_array_equal(calls[:, 1], False)
    np.testing.assert_array_equal(choice, np.where(small_right, 0, 2))
    with pytest.raises(ValueError, match="knob is threshold"):
        router.route(test.prompts, willingness_to_pay=1.0)
    # the default chain is the training Pareto front, cheapest first: a model stays only if it beats every cheaper one
    mean = train.scores_NM.mean(axis=0)
    expected = [0] + ([1] if mean[1] > mean[0] else []) + ([2] if mean[2] > max(mean[:2]) else [])
    assert _fit("cascade", train, enc3)._order.tolist() == expected
    noisy = _fit("cascade", train, enc3, chain=["small", "large"], judge_error=1.0)
    noisy.observe(test)
    assert (noisy.calls(test.prompts, threshold=0.5)[:, 2] != calls[:, 2]).any()


def test_linucb_learns_only_from_the_chosen_model(table3, enc3):
    train, test = table3
    a = _fit("linucb", train, enc3)
    b = _fit("linucb", train, enc3)
    x = a.embed(test.prompts)
    rep_a = a.replay(x, test.scores_NM, test.costs_NM)
    # rewrite every score the router did not observe: its choices cannot change
    other = np.where(np.arange(3)[None, :] == rep_a["choices"][:, None], test.scores_NM, 1 - test.scores_NM)
    rep_b = b.replay(x, other, test.costs_NM)
    np.testing.assert_array_equal(rep_a["choices"], rep_b["choices"])
    regret = rep_a["cumulative_regret"]
    assert (np.diff(regret) >= -1e-12).all()
    rng = np.random.default_rng(0)
    random_regret = (test.scores_NM.max(1) - test.scores_NM[np.arange(200), rng.integers(0, 3, 200)]).sum()
    assert regret[-1] < 0.6 * random_regret


@pytest.mark.parametrize("name", ALL)
def test_save_load_gives_identical_predictions(name, fitted3, table3, tmp_path):
    _, test = table3
    router = fitted3[name]
    router.save(tmp_path / name)
    assert not list((tmp_path / name).glob("*.pkl"))
    loaded = load_router(tmp_path / name)
    if loaded.needs_test_labels and name != "oracle":
        loaded.observe(test)
    assert (loaded.name, loaded.model_names, loaded.knob_name) == (router.name, router.model_names, router.knob_name)
    np.testing.assert_array_equal(loaded.predict(test.prompts), router.predict(test.prompts))
    for value in (0.0, 0.3, 0.7):
        knob = {router.knob_name: value if router.knob_name == "threshold" else value * 3000}
        np.testing.assert_array_equal(loaded.route(test.prompts, **knob), router.route(test.prompts, **knob))
    if name not in ("oracle",):  # the saved folder encodes new text on its own
        assert loaded.route(["a sonnet about the sea"], **{loaded.knob_name: 0.5}).shape == (1,)


def test_save_refuses_a_foreign_folder(fitted3, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        fitted3["knn"].save(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ALL)
def test_two_model_threshold_knob(name, table2, enc2):
    train, test = table2
    router = _fit(name, train, enc2)
    if router.needs_test_labels:
        router.observe(test)
    assert router.knob_name == "threshold"
    assert router.strong == 1
    all_strong = router.route(test.prompts, threshold=0.0)
    if name != "cascade":
        assert (all_strong == 1).all() or name == "single"
    with pytest.raises(ValueError, match="threshold must be a number >= 0.0 and <= 1.0"):
        router.route(test.prompts, threshold=1.5)


@pytest.mark.parametrize("name", ["knn", "mf", "sw_ranking", "random"])
def test_calibrate_hits_the_target_share(name, table2, enc2):
    train, test = table2
    router = _fit(name, train, enc2)
    for share in (0.2, 0.5, 0.8):
        tau = calibrate(router, test, share)
        got = (router.route(test.prompts, threshold=tau) == router.strong).mean()
        assert abs(got - share) <= 0.1, (name, share, got)


def test_calibrate_willingness_to_pay(fitted3, table3):
    _, test = table3
    router = fitted3["random"]  # at λ = 0 it sends a third to the strongest model; more λ, fewer
    top = (router.route(test.prompts, willingness_to_pay=0.0) == router.strong).mean()
    for target in (top / 2, top / 4):
        lam = calibrate(router, test, target)
        got = (router.route(test.prompts, willingness_to_pay=lam) == router.strong).mean()
        assert abs(got - target) <= 0.05, (target, got)
    assert calibrate(router, test, min(1.0, top + 0.2)) == 0.0  # out of reach: the closest, λ = 0


def test_wordllama_loads_offline_without_a_socket(monkeypatch):
    import routelab.query.encoders as encoders

    def no_network(*args, **kwargs):
        raise AssertionError("the wordllama encoder tried to open a network connection")

    monkeypatch.setattr(encoders, "_WORDLLAMA", None)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    enc = create_encoder("wordllama")
    x = enc.encode(["a sonnet about the sea", "solve the integral", "a sonnet about the sea"])
    assert x.shape == (3, 256) and np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(x[0], x[2])
    assert x[0] @ x[1] < 0.999


def test_router_on_wordllama_beats_random(table3):
    train, test = table3
    router = create_router("knn", encoder="wordllama").fit(train)
    assert _quality(test, router.route(test.prompts)) > 0.75
