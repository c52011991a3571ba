"""evaluate() and `routelab query-eval`: splits, the oracle bound, the report folder, and CLI errors."""

import json

import numpy as np
import pytest
from query_cases import one_blas_thread, three_model_table, two_model_table  # noqa: F401

from routelab.cli import main
from routelab.query import evaluate
from routelab.query.evaluation import kfold_splits, parse_router_specs

pytestmark = pytest.mark.usefixtures("one_blas_thread")
FAST = ["random", "oracle", "knn", "cluster:clusters=4", "cascade", "sw_ranking", "linucb"]


def test_grouped_kfold_keeps_each_group_in_one_fold():
    groups = [f"g{i % 7}" for i in range(100)]
    folds = kfold_splits(100, 3, seed=0, groups=groups)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    owner = {}
    for f, idx in enumerate(folds):
        for i in idx:
            assert owner.setdefault(groups[i], f) == f
    assert kfold_splits(100, 3, seed=0, groups=groups)[0].tolist() == folds[0].tolist()  # fixed seed
    with pytest.raises(ValueError, match="at least as many groups as folds"):
        kfold_splits(10, 5, 0, ["a", "b"] * 5)


def test_router_specs():
    specs = parse_router_specs(["knn:k=5", "cascade:judge_error=0.1+k=3", "mlp"])
    assert [(s.name, s.options) for s in specs] == [("knn", {"k": 5}), ("cascade", {"judge_error": 0.1, "k": 3}),
                                                   ("mlp", {})]
    with pytest.raises(ValueError, match="must be key=value"):
        parse_router_specs(["knn:k"])


def test_evaluate_three_models_oracle_bounds_every_router():
    res = evaluate(three_model_table(160, 0), three_model_table(100, 1), routers=FAST, sweep_points=21,
                   log=lambda m: None)
    oracle = res["routers"]["oracle"]
    assert oracle["upper_bound"] and not res["routers"]["knn"]["upper_bound"]
    for label, r in res["routers"].items():
        assert r["max_quality"] <= oracle["max_quality"] + 1e-12, label
        assert r["aiq"] <= oracle["aiq"] + 1e-12, label
        assert len(r["curve"]["cost"]) == 21
    # the learned routers beat the best single model here (specialists by topic); random does not
    assert res["routers"]["knn"]["meets_best_single"] and not res["routers"]["random"]["meets_best_single"]
    assert res["routers"]["knn"]["gap_closed_max"] > 0.5
    assert res["oracle_quality"] == pytest.approx(three_model_table(100, 1).scores_NM.max(1).mean())
    replay = res["routers"]["linucb"]["replay"]
    assert replay["final_regret_per_query"] < replay["random_regret_per_query"]


def test_evaluate_two_models_cross_validation():
    data = two_model_table(300, 0)
    res = evaluate(data=data, folds=3, group_by=None, routers=["random", "knn", "oracle"], log=lambda m: None)
    assert res["cost_unit"] == "share of calls to the strong model"
    knn, rnd = res["routers"]["knn"], res["routers"]["random"]
    assert len(knn["apgr_per_fold"]) == 3
    assert knn["apgr"] > rnd["apgr"] + 0.15
    assert knn["cpt50"] < rnd["cpt50"]
    assert abs(rnd["apgr"] - 0.5) < 0.15
    # every test prompt is routed once per sweep point, pooled over folds: share points evenly spaced
    np.testing.assert_allclose(knn["curve"]["share_strong"][::10], [0, 0.25, 0.5, 0.75, 1.0], atol=0.05)


def _write_jsonl(path, outcomes):
    with open(path, "w") as f:
        for i, p in enumerate(outcomes.prompts):
            rec = {"prompt": p, "scores": dict(zip(outcomes.model_names, outcomes.scores_NM[i].tolist())),
                   "category": outcomes.categories[i]}
            if outcomes.costs_NM is not None:
                rec["costs"] = dict(zip(outcomes.model_names, outcomes.costs_NM[i].tolist()))
            f.write(json.dumps(rec) + "\n")
    return str(path)


def test_query_eval_cli_writes_the_report(tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", three_model_table(200, 0))
    test = _write_jsonl(tmp_path / "test.jsonl", three_model_table(100, 1))
    out = tmp_path / "report"
    code = main(["query-eval", "--data", train, "--test", test, "--routers", "random,oracle,knn,cascade",
                 "--sweep-points", "11", "--out", str(out)])
    assert code == 0
    report = (out / "report.md").read_text()
    for text in ("oracle (UPPER BOUND)", "AIQ", "Metric definitions", "RouterBench", "## Per category", "math"):
        assert text in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["routers"]) == {"random", "oracle", "knn", "cascade"}
    for png in ("curves.png", "model_share.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # rerunning into its own report folder is allowed
    assert main(["query-eval", "--data", train, "--test", test, "--routers", "random", "--sweep-points", "3",
                 "--out", str(out)]) == 0


def test_query_eval_cli_errors(tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", three_model_table(40, 0))
    assert main(["query-eval", "--data", train, "--routers", "bogus", "--out", str(tmp_path / "o")]) == 2
    assert "unknown router 'bogus'; valid names: cascade" in capsys.readouterr().err
    assert main(["query-eval", "--data", train, "--routers", "knn:k=0", "--out", str(tmp_path / "o")]) == 2
    assert "k must be an integer >= 1" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["query-eval", "--data", train, "--out", str(foreign)]) == 2
    assert "not a query-eval report folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "scores": {"m": 1}}\n{oops\n')
    assert main(["query-eval", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl, line 2: invalid JSON" in capsys.readouterr().err
    nocost = tmp_path / "nocost.jsonl"
    nocost.write_text("".join(json.dumps({"prompt": f"p{i}", "scores": {"a": 1, "b": 0, "c": 1}}) + "\n"
                              for i in range(10)))
    assert main(["query-eval", "--data", str(nocost), "--folds", "2", "--out", str(tmp_path / "o")]) == 2
    assert "have no costs: give a price table" in capsys.readouterr().err
