"""SpeechFCEval scorers: our BFCL and ACEBench checkers against verdicts of the released scorer.

Every expected error type in CASES was obtained by running the released scorer (FunAudioLLM/Fun-Audio-Chat,
evaluate/SpeechFCEval/utils/compute_metrics_{bfcl,acebench}.py, its per-item loop) on that very case; "scorer_error"
marks the cases on which the released scorer raises instead of giving a verdict. docs/eval.md has the agreement on
the released predictions (578/578 items) and on a randomised differential run.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from funaudiochat.eval.speechfc.common import is_call_list, parse_tool_calls, standardize
from funaudiochat.eval.speechfc.score import Setup, resolve_setup, score_file, score_item


def tool(name, properties, required=()):
    return {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": {
        "type": "dict", "properties": properties, "required": list(required)}}}


def call(name, **arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


S, I, F = {"type": "string"}, {"type": "integer"}, {"type": "float"}
BOOK = tool("book", {"city": S, "nights": I, "price": F, "tags": {"type": "array", "items": S},
                     "opts": {"type": "dict"}, "guests": {"type": "array", "items": {"type": "dict"}},
                     "note": S, "extra": {"type": "object"}}, required=["city", "nights"])
BOOK_GT = [{"book": {"city": ["Paris", "paris, fr"], "nights": [2], "price": [99.5, ""], "tags": [["quiet", "view"]],
                     "opts": [{"bed": ["king"], "floor": [3, ""]}, ""], "guests": [[{"name": ["Ann"]}], ""],
                     "note": ["", "late"]}}]
OK_TAGS = {"tags": ["quiet", "view"]}
HYPOT = tool("math.hypot", {"x": I, "y": I}, required=["x", "y"])
HYPOT_GT = [{"math.hypot": {"x": [3], "y": [4]}}]
ROOM = tool("room", {"size": I}, required=["size"])
ROOM_GT = [{"room": {"size": [1]}}]

# (case, scorer, category, model name, tools, ground truth, prediction text, released scorer's error type)
BFCL_CASES = [
    ("correct", "multiple", "m", [BOOK], BOOK_GT, call("book", city="PARIS", nights=2, **OK_TAGS) + "<|im_end|>",
     "correct"),
    ("string standardised", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris FR", nights=2, price=99.5,
                                                                    note="Late", **OK_TAGS), "correct"),
    ("value_error:string", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Lyon", nights=2, **OK_TAGS),
     "value_error:string"),
    ("value_error:others", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=3, **OK_TAGS),
     "value_error:others"),
    ("int taken as float", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=2, price=99, **OK_TAGS),
     "value_error:others"),
    ("type_error:simple", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights="2", **OK_TAGS),
     "type_error:simple"),
    ("type_error:nested", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=2, tags=["quiet", 5]),
     "type_error:nested"),
    ("value_error:list/tuple", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=2,
                                                                       tags=["view", "quiet"]), "value_error:list/tuple"),
    ("value_error:dict_value", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=2,
                                                                       opts={"bed": "queen"}, **OK_TAGS),
     "value_error:dict_value"),
    ("value_error:dict_key", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=2,
                                                                     opts={"bed": "king", "view": "sea"}, **OK_TAGS),
     "value_error:dict_key"),
    ("dict ok", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=2, opts={"bed": "King"}, **OK_TAGS),
     "correct"),
    ("value_error:list_dict_count", "multiple", "m", [BOOK], BOOK_GT, call(
        "book", city="Paris", nights=2, guests=[{"name": "Ann"}, {"name": "Bob"}], **OK_TAGS),
     "value_error:list_dict_count"),
    ("list of dicts ok", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=2, guests=[{"name": "ann"}],
                                                                **OK_TAGS), "correct"),
    ("object never checked", "multiple", "m", [BOOK], [{"book": {**BOOK_GT[0]["book"], "extra": [""]}}],
     call("book", city="Paris", nights=2, extra=[1, 2], **OK_TAGS), "correct"),
    ("dict_checker:unclear", "multiple", "m", [BOOK], [{"book": {**BOOK_GT[0]["book"], "opts": [""]}}],
     call("book", city="Paris", nights=2, opts={"bed": "king"}, **OK_TAGS), "dict_checker:unclear"),
    ("missing_required", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", **OK_TAGS),
     "simple_function_checker:missing_required"),
    ("unexpected_param", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=2, color="red",
                                                                 **OK_TAGS), "simple_function_checker:unexpected_param"),
    ("missing_optional", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=2),
     "simple_function_checker:missing_optional"),
    ("wrong_func_name", "multiple", "m", [BOOK], BOOK_GT, call("book_hotel", city="Paris", nights=2, **OK_TAGS),
     "simple_function_checker:wrong_func_name"),
    ("variable of the ground truth's type", "multiple", "m", [BOOK], [{"book": {**BOOK_GT[0]["book"],
                                                                               "nights": ["n_nights"]}}],
     call("book", city="Paris", nights="n_nights", **OK_TAGS), "correct"),
    ("multiple wrong_count", "multiple", "m", [BOOK], BOOK_GT, call("book", city="Paris", nights=2, **OK_TAGS) * 2,
     "multiple_function_checker:wrong_count"),
    ("no tool call", "multiple", "m", [BOOK], BOOK_GT, "I cannot book that.<|im_end|>",
     "multiple_function_checker:wrong_count"),
    ("decoder_failed: no arguments", "multiple", "m", [BOOK], BOOK_GT, '<tool_call>{"name": "book"}</tool_call>',
     "ast_decoder:decoder_failed"),
    ("decoder_failed: string arguments", "multiple", "m", [BOOK], BOOK_GT,
     '<tool_call>{"name": "book", "arguments": "{}"}</tool_call>', "ast_decoder:decoder_failed"),
    ("bad JSON block skipped, one-object list unwrapped", "multiple", "m", [BOOK], BOOK_GT,
     '<tool_call>{"name": "book", oops}</tool_call><tool_call>{"name": "book", "arguments": [{"city": "paris",\\n'
     '"nights": 2, "tags": ["quiet", "view"]}]}</tool_call>', "correct"),
    ("simple correct", "simple", "m", [HYPOT], HYPOT_GT, call("math.hypot", x=3, y=4), "correct"),
    ("simple wrong_count", "simple", "m", [HYPOT], HYPOT_GT, call("math.hypot", x=3, y=4) * 2,
     "simple_function_checker:wrong_count"),
    ("gpt-4o names: dots become underscores", "simple", "gpt-4o-mini", [HYPOT], HYPOT_GT, call("math_hypot", x=3, y=4),
     "correct"),
    ("other models keep the dots", "simple", "m", [HYPOT], HYPOT_GT, call("math_hypot", x=3, y=4),
     "simple_function_checker:wrong_func_name"),
    ("parallel in any order", "parallel", "m", [HYPOT, ROOM], HYPOT_GT + ROOM_GT,
     call("room", size=1) + call("math.hypot", x=3, y=4), "correct"),
    ("parallel wrong_count", "parallel", "m", [HYPOT, ROOM], HYPOT_GT + ROOM_GT, call("room", size=1),
     "parallel_function_checker_no_order:wrong_count"),
    ("parallel cannot_find_match", "parallel", "m", [HYPOT, ROOM], HYPOT_GT + ROOM_GT,
     call("room", size=2) + call("math.hypot", x=3, y=4), "parallel_function_checker_no_order:cannot_find_match"),
    ("unknown schema type", "multiple", "m", [tool("v", {"a": {"type": "vector"}}, ["a"])], [{"v": {"a": [1]}}],
     call("v", a=1), "scorer_error"),
    ("function missing from the tools", "multiple", "m", [ROOM], HYPOT_GT, call("math.hypot", x=3, y=4),
     "scorer_error"),
]

Q = tool("search", {"query": S, "limit": I, "filters": {"type": "object"}, "ids": {"type": "list(string)"},
                    "people": {"type": "array", "items": {"type": "dict"}}, "stops": {"type": "objectArray"},
                    "live": {"type": "boolean"}}, required=["query"])
Q_GT = {"search": {"query": "cheap flights", "limit": 5, "filters": {"from": "NYC", "to": {"city": "Paris"}},
                   "ids": ["a1", "b2"], "people": [{"name": "Ann"}], "stops": [], "live": True}}
OPEN = tool("open", {"url": S}, required=["url"])
WEB = tool("web_search", {"q": S}, required=["q"])
ACE_CASES = [
    ("correct: substring, numbers unchecked, 'true' is a bool", "multiple", [Q], Q_GT,
     call("search", query="Find CHEAP flights now", limit=7, live="true"), "correct"),
    ("value_error:string", "multiple", [Q], Q_GT, call("search", query="flights"), "value_error:string"),
    ("agent categories need equality", "agent_multiple", [Q], Q_GT, call("search", query="find cheap flights"),
     "value_error:string"),
    ("type_error", "multiple", [Q], Q_GT, call("search", query="cheap flights", limit="5"), "type_error"),
    ("lack_args", "multiple", [Q], Q_GT, call("search", limit=5), "lack_args"),
    ("addition_args", "multiple", [Q], Q_GT, call("search", query="cheap flights", sort="price"), "addition_args"),
    ("dict: nested and substring values", "multiple", [Q], Q_GT,
     call("search", query="cheap flights", filters={"from": "nyc jfk", "to": {"city": "paris"}}), "correct"),
    ("value_error: dict keys", "multiple", [Q], Q_GT, call("search", query="cheap flights", filters={"from": "NYC"}),
     "value_error"),
    ("value_error: nested dict value", "multiple", [Q], Q_GT,
     call("search", query="cheap flights", filters={"from": "NYC", "to": {"city": "Rome"}}), "value_error"),
    ("value_error:list/tuple", "multiple", [Q], Q_GT, call("search", query="cheap flights", ids=["b2", "a1"]),
     "value_error:list/tuple"),
    ("value_error:list_dict_count", "multiple", [Q], Q_GT, call("search", query="cheap flights", people=[]),
     "value_error:list_dict_count"),
    ("value_error:dict_items", "multiple", [Q], {"search": {**Q_GT["search"], "stops": [{"at": "LHR"}, {"at": "CDG"}]}},
     call("search", query="cheap flights", stops=[{"at": "LHR"}]), "value_error:dict_items"),
    ("objectArray with items: the released code raises", "multiple", [Q], {"search": {**Q_GT["search"],
                                                                                      "stops": [{"at": "LHR"}]}},
     call("search", query="cheap flights", stops=[{"at": "LHR"}]), "scorer_error"),
    ("wrong functions number", "multiple", [Q], Q_GT, call("search", query="cheap flights") * 2,
     "wrong functions number"),
    ("function_mismatch", "multiple", [Q, OPEN], Q_GT, call("open", url="x"), "function_mismatch"),
    ("wrong_param: empty arguments", "multiple", [Q], Q_GT, call("search"), "wrong_param"),
    ("simple_function_checker:unclear", "multiple", [Q, OPEN], {"search": Q_GT["search"], "open": {"url": "a.com"}},
     call("search", query="dogs") + call("open", url="a.com"), "simple_function_checker:unclear"),
    ("two calls of one function (f_1, f_2)", "multiple", [OPEN], {"open_1": {"url": "a.com"}, "open_2": {"url": "b.com"}},
     call("open", url="https://b.com") + call("open", url="a.com"), "correct"),
    ("wrong_function_name: the schema is found by substring", "multiple", [OPEN, Q, WEB], {"web_search": {"q": "x"}},
     call("web_search", q="x"), "wrong_function_name"),
    ("alternatives: the second passes", "multiple", [OPEN], [{"open": {"url": "a.com"}}, {"open": {"url": "b.com"}}],
     call("open", url="b.com"), "correct"),
    ("alternatives: the first one's error", "multiple", [OPEN, Q], [{"open": {"url": "a.com"}}, {"search": {"query": "q"}}],
     call("open", url="c.com"), "value_error:string"),
    ("decoder_failed", "multiple", [OPEN], {"open": {"url": "a.com"}}, '<tool_call>{"arguments": {}}</tool_call>',
     "ast_decoder:decoder_failed"),
]


def _item(tools, ground_truth, predict, key="k0"):
    return {"utterance": "u", "dataset_key": key, "function": json.dumps(tools), "ground_truth": json.dumps(ground_truth),
            "predict": predict}


@pytest.mark.parametrize("case", BFCL_CASES, ids=[c[0] for c in BFCL_CASES])
def test_bfcl_matches_released_scorer(case):
    _, category, model, tools, ground_truth, predict, expected = case
    verdict = score_item(_item(tools, ground_truth, predict), Setup("bfcl", category, model))
    assert (verdict.error_type or "correct") == expected, verdict.reason
    assert verdict.valid == (expected == "correct")


@pytest.mark.parametrize("case", ACE_CASES, ids=[c[0] for c in ACE_CASES])
def test_acebench_matches_released_scorer(case):
    _, category, tools, ground_truth, predict, expected = case
    verdict = score_item(_item(tools, ground_truth, predict), Setup("acebench", category))
    assert (verdict.error_type or "correct") == expected, verdict.reason
    assert verdict.valid == (expected == "correct")


def test_parse_and_standardize():
    assert parse_tool_calls('x<tool_call> {"name": "f", "arguments": {"a": "1\\n2"}} </tool_call>') == [{"f": {"a": "1 2"}}]
    assert parse_tool_calls("<tool_call>{not json}</tool_call>") == []
    assert is_call_list([{"f": {}}, {"g": {"a": 1}}]) and not is_call_list([{"f": 1}]) and not is_call_list({"f": {}})
    assert standardize("New-York, N.Y. 'a'") == 'newyorkny"a"'


def test_dataset_table_from_file_name(tmp_path):
    setup = resolve_setup(tmp_path / "predict-gpt-4o-SpeechFC-ACEBench-Parallel.json", None, None, None)
    assert (setup.scorer, setup.category, setup.model_name) == ("acebench", "multiple", "gpt-4o")
    setup = resolve_setup(tmp_path / "predict-m-SpeechFC-BFCL-Parallel.json", None, "multiple", None)
    assert (setup.scorer, setup.category) == ("bfcl", "multiple")


def test_acebench_accuracy_rounded_and_bad_lines_recorded(tmp_path):
    lines = [json.dumps(_item([OPEN], {"open": {"url": "a.com"}}, call("open", url=url), key=f"k{i}"))
             for i, url in enumerate(["a.com", "b.com", "www.a.com"])]
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(lines[:2] + ["{broken", json.dumps({"dataset_key": "k9"})] + lines[2:]) + "\n")
    records, summary = score_file(path, Setup("acebench", "multiple"))
    assert [r["error_type"] for r in records] == ["correct", "value_error:string", "input_error:bad_line",
                                                  "input_error:bad_line", "correct"]
    assert (summary["correct"], summary["total"], summary["accuracy"]) == (2, 5, 0.4)
    path.write_text("\n".join(lines) + "\n")
    assert score_file(path, Setup("acebench", "multiple"))[1]["accuracy"] == 0.667  # 2/3 rounded as ACEBench does


def test_cli_writes_records_and_summary(tmp_path):
    preds = tmp_path / "predict-mymodel-SpeechFC-BFCL-Single.json"
    cases = [c for c in BFCL_CASES if c[1] == "multiple" and c[2] == "m"][:6]
    preds.write_text("".join(json.dumps(_item(c[3], c[4], c[5], key=f"case{i}")) + "\n" for i, c in enumerate(cases)))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "eval", "speechfc", str(preds), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [(r["dataset_key"], r["error_type"]) for r in records] == [(f"case{i}", c[6]) for i, c in enumerate(cases)]
    summary = json.loads((out / "summary.json").read_text())
    correct = sum(c[6] == "correct" for c in cases)
    assert (summary["correct"], summary["total"]) == (correct, len(cases))
    assert summary["accuracy"] == pytest.approx(correct / len(cases))
    assert "bfcl/multiple" in run.stdout

    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "eval", "speechfc", str(tmp_path / "x.jsonl"),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "error: cannot tell the dataset" in run.stderr and "Traceback" not in run.stderr
