"""Outcome loaders: the shared real files (counts and accuracies from the data's README), and small hand-written files
of each format, including malformed rows."""

import json
from pathlib import Path

import numpy as np
import pytest

from routelab.query import OutcomeDataError, load_outcomes

REQUESTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "requests"


@pytest.fixture
def requests_data() -> Path:
    if not (REQUESTS / "README.md").is_file():
        pytest.skip(f"shared request-routing data not found at {REQUESTS} (it lives beside the repository)")
    return REQUESTS


def test_llmrouter_dcrouter(requests_data):
    train = load_outcomes(requests_data / "llmrouter-dcrouter" / "train.json")
    test = load_outcomes(requests_data / "llmrouter-dcrouter" / "test.json")
    assert (train.num_prompts, test.num_prompts, test.num_models) == (5608, 500, 9)
    # the data README: on test.json the oracle scores 0.743 and the best single model 0.563
    assert test.scores_NM.max(axis=1).mean() == pytest.approx(0.743, abs=5e-4)
    assert test.scores_NM.mean(axis=0).max() == pytest.approx(0.563, abs=5e-4)
    # no costs in the file: estimated from models.json beside it, and flagged
    assert test.costs_estimated and test.costs_NM is not None
    assert any("ESTIMATED" in n for n in test.notes)
    j = test.model_names.index("gemma-2-9b-it")
    prompt_tokens = len(test.prompts[0]) / 4
    assert test.costs_NM[0, j] == pytest.approx((prompt_tokens * 0.10 + 256 * 0.10) / 1e6)


def test_routellm_gsm8k_mmlu_mt_bench(requests_data):
    gsm = load_outcomes(requests_data / "routellm" / "gsm8k" / "gsm8k_responses.csv")
    assert gsm.num_prompts == 1319 - 12  # 12 contaminated prompts excluded
    assert gsm.costs_NM is None and gsm.model_names[gsm.strongest_model()] == "gpt-4-1106-preview"
    assert gsm.scores_NM.mean(axis=0)[gsm.strongest_model()] == pytest.approx(0.857, abs=5e-3)
    mmlu = load_outcomes(requests_data / "routellm" / "mmlu")
    assert mmlu.num_prompts == 14042 - 5 and len(set(mmlu.categories)) == 57
    assert "abstract_algebra" in mmlu.categories
    np.testing.assert_allclose(np.sort(mmlu.scores_NM.mean(axis=0)), [0.681, 0.806], atol=5e-3)
    mt = load_outcomes(requests_data / "routellm" / "mt_bench")
    assert mt.num_prompts == 80 - 8
    assert mt.scores_NM.min() >= 0.0 and mt.scores_NM.max() <= 1.0
    assert "writing" in mt.categories


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


ROUTERBENCH = (
    "sample_id,prompt,eval_name,model_a,model_b,model_a|model_response,model_b|model_response,"
    "model_a|total_cost,model_b|total_cost,oracle_model_to_route_to\n"
    "s1,\"['What is 2+2?', 'And 3+3?']\",math,1.0,0.0,four,five,0.001,0.01,model_a\n"
    "s2,\"__import__('os').system('echo pwned')\",hack,0,1,x,y,0.002,0.02,model_b\n"
    "s3,\"[1, 2] is a list\",misc,0.5,0.25,x,y,0.003,0.03,model_a\n"
)


def test_routerbench_wide_csv(tmp_path):
    out = load_outcomes(_write(tmp_path / "rb.csv", ROUTERBENCH))
    assert out.model_names == ["model_a", "model_b"]
    assert out.prompts[0] == "What is 2+2?\nAnd 3+3?"  # a Python-list literal of turns, parsed safely
    assert out.prompts[1] == "__import__('os').system('echo pwned')"  # not a literal: kept as text, never run
    assert out.prompts[2] == "[1, 2] is a list"
    np.testing.assert_array_equal(out.scores_NM, [[1, 0], [0, 1], [0.5, 0.25]])
    np.testing.assert_array_equal(out.costs_NM, [[0.001, 0.01], [0.002, 0.02], [0.003, 0.03]])
    assert out.categories == ["math", "hack", "misc"] and not out.costs_estimated


def test_malformed_csv_names_file_and_line(tmp_path):
    bad = ROUTERBENCH.replace("misc,0.5,0.25", "misc,high,0.25")
    with pytest.raises(OutcomeDataError, match=r"bad\.csv, line 4: column 'model_a' must hold a number"):
        load_outcomes(_write(tmp_path / "bad.csv", bad))
    short = ROUTERBENCH + "s4,only three,fields\n"
    with pytest.raises(OutcomeDataError, match=r"line 5: 3 fields, the header has 10"):
        load_outcomes(_write(tmp_path / "short.csv", short))
    with pytest.raises(OutcomeDataError, match="no 'prompt' column"):
        load_outcomes(_write(tmp_path / "noprompt.csv", "question,a,b\nq,1,0\n"))


def test_routellm_csv_with_contaminated_prompts(tmp_path):
    _write(tmp_path / "mmlu_anatomy.csv", "prompt,weak,strong,weak_response,strong_response\n"
           "\"Q1\nA. x\",True,True,r,r\nQ2,False,True,r,r\nQ3,True,False,r,r\n")
    _write(tmp_path / "contaminated_prompts.jsonl", json.dumps({"train_prompt": "q", "eval_prompt": "Q2"}) + "\n")
    out = load_outcomes(tmp_path / "mmlu_anatomy.csv")
    assert out.prompts == ["Q1\nA. x", "Q3"] and out.categories == ["anatomy", "anatomy"]
    np.testing.assert_array_equal(out.scores_NM, [[1, 1], [1, 0]])
    assert any("1 prompts of mmlu_anatomy.csv excluded" in n for n in out.notes)
    assert load_outcomes(tmp_path / "mmlu_anatomy.csv", exclude_contaminated=False).num_prompts == 3
    # with a price table the responses' lengths give the output tokens
    prices = {"weak": {"input_price": 1.0, "output_price": 2.0}, "strong": {"input_price": 10.0, "output_price": 20.0}}
    priced = load_outcomes(tmp_path / "mmlu_anatomy.csv", prices=prices)
    assert priced.costs_estimated
    assert priced.costs_NM[1, 1] == pytest.approx((2 / 4 * 10.0 + 1 / 4 * 20.0) / 1e6)


def test_json_and_jsonl_records(tmp_path):
    recs = [{"question": "a?", "scores": {"m1": 1, "m2": 0.5}, "costs": {"m1": 0.1, "m2": 0.2}, "category": "x"},
            {"prompt": "b?", "scores": {"m2": 1, "m1": 0}, "costs": {"m1": 0.3, "m2": 0.4}}]
    out = load_outcomes(_write(tmp_path / "d.json", json.dumps(recs)))
    np.testing.assert_array_equal(out.scores_NM, [[1, 0.5], [0, 1]])
    np.testing.assert_array_equal(out.costs_NM, [[0.1, 0.2], [0.3, 0.4]])
    assert out.categories == ["x", "d"] and not out.costs_estimated
    lines = "\n".join(json.dumps(r) for r in recs) + "\n{not json\n"
    with pytest.raises(OutcomeDataError, match=r"d\.jsonl, line 3: invalid JSON"):
        load_outcomes(_write(tmp_path / "d.jsonl", lines))
    with pytest.raises(OutcomeDataError, match=r"record 1: needs 'scores'"):
        load_outcomes(_write(tmp_path / "e.json", json.dumps([recs[0], {"prompt": "c"}])))
    with pytest.raises(OutcomeDataError, match=r"record 1: scores cover models"):
        load_outcomes(_write(tmp_path / "f.json", json.dumps([recs[0], {"prompt": "c", "scores": {"m1": 1}}])))
    with pytest.raises(OutcomeDataError, match=r"record 0: scores.m1 must be a finite number"):
        load_outcomes(_write(tmp_path / "g.json", json.dumps([{"prompt": "c", "scores": {"m1": "1"}}])))
    # without costs and without a price table: no costs, and evaluation of > 2 models will ask for prices
    no_cost = load_outcomes(_write(tmp_path / "h.jsonl", json.dumps({"prompt": "p", "scores": {"a": 1}}) + "\n"))
    assert no_cost.costs_NM is None and not no_cost.costs_estimated


def test_price_table_estimate_hand_computed(tmp_path):
    recs = [{"prompt": "x" * 40, "scores": {"a": 1, "b": 0}}]
    _write(tmp_path / "models.json", json.dumps({"a": {"input_price": 2.0, "output_price": 4.0},
                                                 "b": {"input_price": 1.0, "output_price": 1.0}}))
    out = load_outcomes(_write(tmp_path / "d.json", json.dumps(recs)), output_tokens=100)
    # 40 characters = 10 tokens in; 100 tokens out
    np.testing.assert_allclose(out.costs_NM, [[(10 * 2 + 100 * 4) / 1e6, (10 * 1 + 100 * 1) / 1e6]])
    assert out.costs_estimated
    with pytest.raises(OutcomeDataError, match="no entry for model 'b'"):
        load_outcomes(tmp_path / "d.json", prices={"a": {"input_price": 1, "output_price": 1}})


def test_mt_bench_folder(tmp_path):
    q = [{"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
         {"question_id": 2, "category": "math", "turns": ["2+2?", "3+3?"]}]
    j = [{"question_id": 1, "model": "big", "score": 10, "turn": 1}, {"question_id": 1, "model": "big", "score": 8,
                                                                       "turn": 2},
         {"question_id": 1, "model": "small", "score": 1, "turn": 1}, {"question_id": 1, "model": "small",
                                                                        "score": -1, "turn": 2},
         {"question_id": 2, "model": "big", "score": 7, "turn": 1}, {"question_id": 2, "model": "small", "score": 4,
                                                                      "turn": 1}]
    _write(tmp_path / "question.jsonl", "\n".join(json.dumps(x) for x in q))
    _write(tmp_path / "judgements.jsonl", "\n".join(json.dumps(x) for x in j))
    _write(tmp_path / "contaminated_prompts.jsonl", json.dumps({"eval_prompt": "2+2?"}))
    out = load_outcomes(tmp_path)
    assert out.prompts == ["Write a poem."] and out.categories == ["writing"]
    # turns averaged, a failed rating (-1) skipped, (s - 1) / 9
    np.testing.assert_allclose(out.scores_NM, [[(9 - 1) / 9, 0.0]])
    assert load_outcomes(tmp_path / "judgements.jsonl", exclude_contaminated=False).num_prompts == 2
    _write(tmp_path / "judgements.jsonl", json.dumps({"question_id": 9, "model": "big", "score": 3}))
    with pytest.raises(OutcomeDataError, match=r"judgements\.jsonl, line 1: question_id 9 is not in"):
        load_outcomes(tmp_path)


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(OutcomeDataError, match="no such file"):
        load_outcomes(tmp_path / "nope.csv")
    with pytest.raises(OutcomeDataError, match="unknown outcome format"):
        load_outcomes(_write(tmp_path / "x.txt", "hi"))
    with pytest.raises(ValueError, match="output_tokens must be an integer >= 0"):
        load_outcomes(tmp_path, output_tokens=-1)
