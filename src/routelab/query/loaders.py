"""Loaders for per-query outcome files, the format detected from the file: `load_outcomes(path, ...) -> Outcomes`.

Formats (see the README section "Routing requests to models"):

- RouterBench's wide CSV: a `prompt` column (often a Python-list literal of turns, parsed with `ast.literal_eval`,
  which only accepts literals — never `eval`), one score column per model, `<model>|total_cost` columns in dollars,
  optional `<model>|model_response`, `eval_name` (category); `oracle_model_to_route_to` and `sample_id` are ignored.
- RouteLLM's per-benchmark CSVs: `prompt`, one True/False column per model, `<model>_response` columns (GSM8K; the
  MMLU subject files `mmlu_<subject>.csv`, subject = category). A `contaminated_prompts.jsonl` beside the file or in
  its parent folder lists prompts (`eval_prompt`) that leaked into RouteLLM's training data; they are excluded.
- RouteLLM's MT-Bench folder: `question.jsonl` + `judgements.jsonl` (GPT-4 judge scores 1-10 per question, turn and
  model; a question's score is the mean over its turns, mapped to [0, 1] by (s - 1) / 9), routed on the first turn,
  contaminated questions excluded.
- JSON (a list) or JSONL records `{"prompt" or "question": str, "scores": {model: score}, "costs": {model: $}?,
  "category"?: str}` (LLMRouter's and RouterDC's releases).

A folder loads every file it holds (MT-Bench when it has `judgements.jsonl`; `responses/*.csv` when present).
Costs missing from the data come from a price table (`prices=`: LLMRouter's `models.json` shape, `{model:
{"input_price": $/M tokens, "output_price": $/M tokens}}`; a `models.json` beside the data file is used when it
prices every model) and estimated token counts; such outcomes carry `costs_estimated=True`.

Malformed rows raise `OutcomeDataError` naming the file and line (or record).
"""

from __future__ import annotations

import ast
import csv
import json
import math
from pathlib import Path

import numpy as np

from routelab.query.outcomes import OutcomeDataError, Outcomes, concat_outcomes

# Characters per token: OpenAI's rule of thumb for English text, used only for price-table estimates.
CHARS_PER_TOKEN = 4.0
# Output tokens assumed per answer when a file has no responses to measure (stated in every report).
DEFAULT_OUTPUT_TOKENS = 256
_MAX_FILE_BYTES = 2 * 1024**3
_CSV_META = {"prompt", "eval_name", "oracle_model_to_route_to", "sample_id", "category", ""}


def load_outcomes(
    path: str | Path | list[str | Path],
    *,
    prices: str | Path | dict | None = None,
    exclude_contaminated: bool = True,
    output_tokens: int = DEFAULT_OUTPUT_TOKENS,
) -> Outcomes:
    """Load one file, a folder, or a list of them (same model pool) into one `Outcomes`.

    `prices`: a price table (path to JSON or dict) for files without costs; when None, a `models.json` beside a
    file is used if it prices every model. `output_tokens`: answer length assumed where responses are unknown.
    """
    if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
        raise ValueError(f"output_tokens must be an integer >= 0, got {output_tokens!r}")
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    table = _read_price_table(Path(prices)) if isinstance(prices, (str, Path)) else prices
    parts = []
    for p in paths:
        for part, responses, folder in _load_any(p, exclude_contaminated):
            parts.append(_with_costs(part, responses, folder, table, output_tokens))
    return concat_outcomes(parts)


def _load_any(path: Path, exclude: bool) -> list[tuple[Outcomes, list[list[str]] | None, Path]]:
    if not path.exists():
        raise OutcomeDataError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "judgements.jsonl").is_file():
            return [(_load_mt_bench(path, exclude), None, path)]
        folder = path / "responses" if (path / "responses").is_dir() else path
        files = sorted(f for f in folder.iterdir() if f.suffix in (".csv", ".json", ".jsonl") and f.is_file()
                       and f.name not in ("models.json", "contaminated_prompts.jsonl", "question.jsonl"))
        if not files:
            raise OutcomeDataError(f"{path}: no outcome files (.csv, .json, .jsonl) in this folder")
        return [item for f in files for item in _load_any(f, exclude)]
    if path.stat().st_size > _MAX_FILE_BYTES:
        raise OutcomeDataError(f"{path}: file larger than {_MAX_FILE_BYTES} bytes")
    if path.name == "judgements.jsonl":
        return [(_load_mt_bench(path.parent, exclude), None, path.parent)]
    if path.suffix == ".csv":
        outcomes, responses = _load_csv(path, exclude)
        return [(outcomes, responses, path.parent)]
    if path.suffix in (".json", ".jsonl"):
        return [(_load_records(path), None, path.parent)]
    raise OutcomeDataError(f"{path}: unknown outcome format (expected .csv, .json, .jsonl or a folder)")


def _contaminated(path: Path) -> tuple[set[str], Path | None]:
    for folder in (path.parent, path.parent.parent):
        f = folder / "contaminated_prompts.jsonl"
        if f.is_file():
            prompts = set()
            for line_no, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    prompts.add(json.loads(line)["eval_prompt"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise OutcomeDataError(f"{f}, line {line_no}: expected a JSON object with 'eval_prompt' ({exc})")
            return prompts, f
    return set(), None


def _parse_prompt(text: str, where: str) -> str:
    """RouterBench stores multi-turn prompts as a Python list literal of strings; join the turns with newlines."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            value = ast.literal_eval(stripped)  # literals only: no names, calls or attribute access can run
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text  # a prompt that merely looks like a list is kept as written
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
    return text


def _parse_score(value: str, where: str, column: str) -> float:
    v = value.strip()
    if v in ("True", "true", "TRUE"):
        return 1.0
    if v in ("False", "false", "FALSE"):
        return 0.0
    try:
        x = float(v)
    except ValueError:
        raise OutcomeDataError(f"{where}: column {column!r} must hold a number or True/False, got {value[:40]!r}")
    if not math.isfinite(x):
        raise OutcomeDataError(f"{where}: column {column!r} must be finite, got {value!r}")
    return x


def _load_csv(path: Path, exclude: bool) -> tuple[Outcomes, list[list[str]] | None]:
    csv.field_size_limit(2**31 - 1)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise OutcomeDataError(f"{path}: empty file") from None
        if "prompt" not in header:
            raise OutcomeDataError(f"{path}, line 1: no 'prompt' column (columns: {header[:8]})")
        names = set(header)
        models = [c for c in header if c not in _CSV_META and "|" not in c and not c.startswith("Unnamed:")
                  and not (c.endswith("_response") and c[: -len("_response")] in names)]
        if not models:
            raise OutcomeDataError(f"{path}, line 1: no model score columns")
        col = {c: i for i, c in enumerate(header)}
        cost_cols = {m: col.get(f"{m}|total_cost") for m in models}
        has_costs = all(i is not None for i in cost_cols.values())
        resp_cols = {m: col.get(f"{m}|model_response", col.get(f"{m}_response")) for m in models}
        has_resp = all(i is not None for i in resp_cols.values())
        category_col = col.get("eval_name", col.get("category"))
        default_category = path.stem[len("mmlu_"):] if path.stem.startswith("mmlu_") else path.stem.split("_")[0]
        bad, contaminated_file = _contaminated(path) if exclude else (set(), None)
        prompts, scores, costs, cats, responses = [], [], [], [], []
        excluded = 0
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                raise OutcomeDataError(f"{where}: {len(row)} fields, the header has {len(header)}")
            prompt = row[col["prompt"]]
            if prompt in bad:
                excluded += 1
                continue
            prompts.append(_parse_prompt(prompt, where))
            scores.append([_parse_score(row[col[m]], where, m) for m in models])
            if has_costs:
                costs.append([_parse_score(row[cost_cols[m]], where, f"{m}|total_cost") for m in models])
            if has_resp:
                responses.append([row[resp_cols[m]] for m in models])
            cats.append(row[category_col] if category_col is not None else default_category)
    if not prompts:
        raise OutcomeDataError(f"{path}: no data rows")
    notes = []
    if excluded:
        notes.append(f"{excluded} prompts of {path.name} excluded as contaminated ({contaminated_file})")
    out = Outcomes(prompts, models, np.array(scores), np.array(costs) if has_costs else None, cats,
                   [path.stem] * len(prompts), notes=tuple(notes))
    return out, (responses if has_resp else None)


def _load_records(path: Path) -> Outcomes:
    text = path.read_text(encoding="utf-8")
    records: list[tuple[str, object]] = []
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}, line {line_no}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise OutcomeDataError(f"{path}, line {line_no}: invalid JSON ({exc.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OutcomeDataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise OutcomeDataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        records = [(f"{path}, record {i}", r) for i, r in enumerate(data)]
    if not records:
        raise OutcomeDataError(f"{path}: no records")
    models: list[str] | None = None
    prompts, scores, costs, cats = [], [], [], []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise OutcomeDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        prompt = rec.get("prompt", rec.get("question"))
        if not isinstance(prompt, str):
            raise OutcomeDataError(f"{where}: needs a string 'prompt' or 'question'")
        sc = rec.get("scores")
        if not isinstance(sc, dict) or not sc:
            raise OutcomeDataError(f"{where}: needs 'scores', an object {{model: score}}")
        if models is None:
            models = list(sc)
        if set(sc) != set(models):
            raise OutcomeDataError(f"{where}: scores cover models {sorted(sc)}, earlier records {sorted(models)}")
        scores.append([_number(sc[m], where, f"scores.{m}") for m in models])
        co = rec.get("costs")
        if co is not None:
            if not isinstance(co, dict) or set(co) != set(models):
                raise OutcomeDataError(f"{where}: 'costs' must give a cost for every model {sorted(models)}")
            costs.append([_number(co[m], where, f"costs.{m}") for m in models])
        prompts.append(prompt)
        cats.append(str(rec.get("category", rec.get("task", path.stem))))
    if costs and len(costs) != len(prompts):
        raise OutcomeDataError(f"{path}: some records have 'costs' and some do not")
    return Outcomes(prompts, models, np.array(scores), np.array(costs) if costs else None, cats,
                    [path.stem] * len(prompts))


def _number(value: object, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OutcomeDataError(f"{where}: {field} must be a finite number, got {value!r}")
    return float(value)


def _load_mt_bench(folder: Path, exclude: bool) -> Outcomes:
    qfile, jfile = folder / "question.jsonl", folder / "judgements.jsonl"
    if not qfile.is_file():
        raise OutcomeDataError(f"{folder}: MT-Bench judgements need question.jsonl beside them")
    questions: dict[int, dict] = {}
    for line_no, line in enumerate(qfile.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                q = json.loads(line)
                questions[int(q["question_id"])] = q
                str(q["turns"][0])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
                raise OutcomeDataError(f"{qfile}, line {line_no}: expected question_id and turns ({exc})") from None
    judged: dict[tuple[int, str], list[float]] = {}
    models: list[str] = []
    for line_no, line in enumerate(jfile.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            j = json.loads(line)
            qid, model, score = int(j["question_id"]), str(j["model"]), j["score"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise OutcomeDataError(f"{jfile}, line {line_no}: expected question_id, model, score ({exc})") from None
        if qid not in questions:
            raise OutcomeDataError(f"{jfile}, line {line_no}: question_id {qid} is not in {qfile.name}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 1 <= score <= 10:
            continue  # the judge failed to give a rating (FastChat writes -1): not a score
        if model not in models:
            models.append(model)
        judged.setdefault((qid, model), []).append(float(score))
    bad, _ = _contaminated(jfile) if exclude else (set(), None)
    prompts, scores, cats = [], [], []
    excluded = 0
    for qid in sorted(questions):
        q = questions[qid]
        if not all((qid, m) in judged for m in models):
            continue
        if q["turns"][0] in bad:
            excluded += 1
            continue
        prompts.append(q["turns"][0])
        scores.append([(np.mean(judged[(qid, m)]) - 1.0) / 9.0 for m in models])
        cats.append(str(q.get("category", "mt_bench")))
    notes = ["MT-Bench judge scores 1-10 averaged over turns and mapped to [0, 1] as (s - 1) / 9"]
    if excluded:
        notes.append(f"{excluded} MT-Bench questions excluded as contaminated")
    return Outcomes(prompts, models, np.array(scores), None, cats, ["mt_bench"] * len(prompts), notes=tuple(notes))


def _read_price_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OutcomeDataError(f"{path}: cannot read the price table ({exc})") from None
    if not isinstance(table, dict):
        raise OutcomeDataError(f"{path}: a price table is a JSON object {{model: {{input_price, output_price}}}}")
    return table


def price_costs(table: dict, models: list[str], prompts: list[str], responses: list[list[str]] | None,
                output_tokens: int) -> np.ndarray:
    """Estimated dollars per query [N, M]: (input tokens x input price + output tokens x output price) / 1e6.

    Tokens are estimated as characters / CHARS_PER_TOKEN; output tokens from the responses when known, else
    `output_tokens` per answer.
    """
    price_in, price_out = np.zeros(len(models)), np.zeros(len(models))
    for j, m in enumerate(models):
        entry = table.get(m)
        if not isinstance(entry, dict):
            raise OutcomeDataError(f"the price table has no entry for model {m!r} (it prices {sorted(table)})")
        for name, arr in (("input_price", price_in), ("output_price", price_out)):
            v = entry.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise OutcomeDataError(f"price table: {m}.{name} must be a number >= 0 ($ per million tokens)")
            arr[j] = v
    tokens_in_N = np.array([len(p) for p in prompts], dtype=np.float64) / CHARS_PER_TOKEN
    if responses is not None:
        tokens_out_NM = np.array([[len(r) for r in row] for row in responses], dtype=np.float64) / CHARS_PER_TOKEN
    else:
        tokens_out_NM = np.full((len(prompts), len(models)), float(output_tokens))
    return (tokens_in_N[:, None] * price_in[None, :] + tokens_out_NM * price_out[None, :]) / 1e6


def _with_costs(part: Outcomes, responses, folder: Path, table: dict | None, output_tokens: int) -> Outcomes:
    if part.costs_NM is not None:
        return part
    source = "the given price table"
    if table is None:
        beside = folder / "models.json"
        if not beside.is_file():
            return part
        candidate = _read_price_table(beside)
        if not all(isinstance(candidate.get(m), dict) and "input_price" in candidate[m] for m in part.model_names):
            return part
        table, source = candidate, str(beside)
    costs = price_costs(table, part.model_names, part.prompts, responses, output_tokens)
    how = "response lengths" if responses is not None else f"{output_tokens} output tokens per answer"
    note = (f"costs ESTIMATED from {source} and token counts (characters / {CHARS_PER_TOKEN:g} for the prompt, "
            f"{how})")
    return Outcomes(part.prompts, part.model_names, part.scores_NM, costs, part.categories, part.sources,
                    costs_estimated=True, notes=part.notes + (note,))
