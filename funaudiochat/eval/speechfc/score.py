"""Score a SpeechFCEval predictions file (the released `predict-{model}-{dataset}.json` JSON-lines format).

Each line holds `dataset_key`, `function` (a JSON string of OpenAI tools), `ground_truth` (a JSON string) and
`predict` (the model's raw text with `<tool_call>` blocks). Every line gets a record (`dataset_key`, `valid`,
`error_type`, `reason`); accuracy = correct / total (ACEBench rounds it to 3 decimals, as its scorer prints it).

Lines the released scorer cannot read (not JSON, no ground truth) or on which it raises are recorded as failures
with the error types `input_error:bad_line` and `scorer_error` (that scorer would stop there), and the run goes on.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from funaudiochat import fileio
from funaudiochat.errors import InputError
from funaudiochat.eval.speechfc import acebench, bfcl
from funaudiochat.eval.speechfc.common import DecodeFailed, Verdict, fail, is_call_list, parse_tool_calls, \
    tools_to_functions

SCORERS = ("bfcl", "acebench")
CATEGORIES = ("simple", "multiple", "parallel")
# SPEC §11: the released compute_metrics_speech_fc.py's table
DATASETS = {
    "SpeechFC-BFCL-Single": ("bfcl", "multiple"),
    "SpeechFC-BFCL-Parallel": ("bfcl", "parallel"),
    "SpeechFC-SmartInteract": ("bfcl", "multiple"),
    "SpeechFC-ACEBench-Single": ("acebench", "multiple"),
    "SpeechFC-ACEBench-Parallel": ("acebench", "multiple"),
}


@dataclass
class Setup:
    scorer: str
    category: str
    model_name: str = ""  # the released BFCL scorer maps "." to "_" in function names for "gpt-4o" models


def dataset_of(path: Path) -> tuple[str, str] | None:
    """(model, dataset) from `predict-{model}-{dataset}.json` (or any name ending in a known dataset name)."""
    stem = Path(path).stem
    for dataset in sorted(DATASETS, key=len, reverse=True):
        if stem.endswith(dataset):
            model = re.sub(r"^predict-", "", stem[: -len(dataset)]).rstrip("-")
            return model, dataset
    return None


def resolve_setup(path: Path, scorer: str | None, category: str | None, model_name: str | None) -> Setup:
    """The scorer and category given, else the dataset table's entry for the dataset the file name says."""
    found = dataset_of(path)
    if scorer is None or category is None:
        if found is None:
            raise InputError(f"cannot tell the dataset from the file name {Path(path).name!r} (known: "
                             f"{', '.join(DATASETS)}); give --scorer and --category")
        default_scorer, default_category = DATASETS[found[1]]
        scorer, category = scorer or default_scorer, category or default_category
    if model_name is None:
        model_name = found[0] if found else ""
    return Setup(scorer, category, model_name)


def _decoded(text):
    return json.loads(text) if isinstance(text, str) else text


def score_item(item: dict, setup: Setup) -> Verdict:
    """The verdict on one prediction line."""
    try:
        ground_truth = _decoded(item["ground_truth"])
        functions = item["function"]
        if isinstance(functions, str):
            functions = tools_to_functions(json.loads(functions))
    except (KeyError, TypeError, ValueError) as err:
        return fail("input_error:bad_line", f"unreadable function/ground_truth: {type(err).__name__}: {err}")
    try:
        calls = parse_tool_calls(item.get("predict", ""))
    except DecodeFailed as err:
        return fail("ast_decoder:decoder_failed", str(err))
    if not is_call_list(calls):
        return fail("ast_decoder:decoder_wrong_output_format", "not a list of {name: {arguments}}")
    try:
        if setup.scorer == "bfcl":
            return bfcl.ast_check(functions, calls, ground_truth, setup.category, "gpt-4o" in setup.model_name)
        return acebench.check_alternatives(functions, calls, ground_truth, setup.category)
    except (acebench.ReleasedScorerCrash, KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
        # the released scorer raises on these items (a schema it cannot read, a function it cannot find ...)
        return fail("scorer_error", f"{type(err).__name__}: {err}")


def score_file(path: Path, setup: Setup) -> tuple[list[dict], dict]:
    """(records, summary) for a predictions file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no predictions file {path}")
    records, summary = score_lines(fileio.read_jsonl(path), setup)
    if not records:
        raise InputError(f"{path} holds no prediction lines")
    return records, {"file": str(path), **summary}


def score_lines(lines, setup: Setup) -> tuple[list[dict], dict]:
    """(records, summary) for (line number, item or fileio.LineProblem) pairs."""
    records = []
    for line_no, item in lines:
        if isinstance(item, fileio.LineProblem):
            verdict, key = fail("input_error:bad_line", f"line {line_no}: {item}"), None
        else:
            verdict, key = score_item(item, setup), item.get("dataset_key")
        records.append({"line": line_no, "dataset_key": key, "valid": verdict.valid,
                        "error_type": verdict.error_type or "correct", "reason": verdict.reason})
    correct = sum(r["valid"] for r in records)
    accuracy = correct / len(records) if records else 0.0
    if setup.scorer == "acebench":
        accuracy = round(accuracy, 3)
    summary = {"scorer": setup.scorer, "category": setup.category, "correct": correct, "total": len(records),
               "accuracy": accuracy, "error_types": dict(Counter(r["error_type"] for r in records).most_common())}
    return records, summary


def write_outputs(out: Path, records: list[dict], summary: dict) -> None:
    out = Path(out)
    fileio.write_text(out / "records.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    fileio.write_text(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
