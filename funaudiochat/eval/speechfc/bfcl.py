"""The BFCL AST checker (python language) as the released SpeechFCEval scorer runs it (`compute_metrics_bfcl.py`).

A ground truth is a list of `{function: {param: [allowed values...]}}`; `""` among the allowed values marks the
parameter optional. Categories: "parallel" (any order, counts equal), "multiple" (as many calls as ground-truth
entries, then the first call is checked), otherwise simple (exactly one call). The rules below keep the released
code's order and quirks (a value of the ground truth's own type is taken for a "variable" and only checked by
membership; a failing nested type check is reported as `type_error:nested` only for a list value; a missing dict key
overrides an earlier bad dict value), because our error types must match it item by item.
"""
from __future__ import annotations

import re

from funaudiochat.eval.speechfc.common import PASS, Verdict, fail, seq, standardize, std_items

TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
         "dict": dict, "any": str, "number": int, "object": dict}
NESTED = ("array", "tuple")  # types whose items are type-checked one level deep


def _answer_type(allowed: list):
    """The type of the first allowed value that is not the optional marker "" (None if there is none)."""
    for answer in allowed:
        if answer != "":
            return type(answer)
    return None


def check_type(param: str, value, allowed: list, expected: type, inner: type | None) -> tuple[Verdict, bool]:
    """(verdict, is_variable). A value of another type than the schema's passes when it has the ground truth's type
    (a "variable"); a list's items are checked against each allowed list until one fits."""
    answer_type = _answer_type(allowed)
    is_variable = answer_type is not None and answer_type != expected
    nested_failed = False
    if type(value) == expected:
        if inner is None:
            return PASS, is_variable
        for option in allowed:
            if type(option) is not list or all(check_type(param, item, option, inner, None)[0].valid
                                                for item in value):
                return PASS, is_variable
        nested_failed = True
    if answer_type is not None and type(value) == answer_type:
        if nested_failed:
            return fail("type_error:nested", f"{param}: items of {value!r} are not {inner.__name__}"), True
        return PASS, True
    return fail("type_error:simple", f"{param}: expected {expected.__name__}, got {type(value).__name__}"), False


def check_string(param: str, value: str, allowed: list) -> Verdict:
    if standardize(value) not in [standardize(a) for a in allowed if type(a) is str]:
        return fail("value_error:string", f"{param}: {value!r} not in {allowed!r}")
    return PASS


def check_list(param: str, value: list, allowed: list) -> Verdict:
    if std_items(value) not in [std_items(option) for option in seq(allowed)]:
        return fail("value_error:list/tuple", f"{param}: {value!r} not in {allowed!r}")
    return PASS


def check_dict(param: str, value: dict, allowed: list) -> Verdict:
    """Key by key against each allowed dict ({key: [allowed values]}); the first dict that fits passes."""
    verdict = fail("dict_checker:unclear", f"{param}: no allowed dict")
    for option in seq(allowed):
        if option == "":
            continue
        verdict, fits = fail("dict_checker:unclear"), True
        for key, item in value.items():
            if key not in option:
                verdict, fits = fail("value_error:dict_key", f"{param}: unexpected key {key!r}"), False
                break
            item_std = standardize(item) if type(item) is str else item
            if item_std not in std_items(option[key]):
                verdict, fits = fail("value_error:dict_value", f"{param}: {key}={item!r} not in {option[key]!r}"), False
                break
        for key, values in option.items():  # runs even after a bad value: a missing key is what gets reported
            if key not in value and "" not in values:
                verdict, fits = fail("value_error:dict_key", f"{param}: missing key {key!r}"), False
                break
        if fits:
            return PASS
    return verdict


def check_list_of_dicts(param: str, value: list, allowed: list) -> Verdict:
    """The dicts in order against each allowed list of dicts."""
    verdict = fail("list_dict_checker:unclear", f"{param}: no allowed list")
    for option in seq(allowed):
        if len(value) != len(option):
            verdict = fail("value_error:list_dict_count", f"{param}: {len(value)} dicts, expected {len(option)}")
            continue
        fits = True
        for index in range(len(value)):
            verdict = check_dict(param, value[index], [option[index]])
            if not verdict.valid:
                fits = False
                break
        if fits:
            return PASS
    return verdict


def check_call(function: dict, call: dict, answer: dict, dots_to_underscores: bool = False) -> Verdict:
    """One call {name: {param: value}} against one ground-truth entry {name: {param: [allowed]}} and its schema."""
    allowed_params = list(answer.values())[0]
    name = function["name"]
    properties = function["parameters"]["properties"]
    required = function["parameters"]["required"]
    if dots_to_underscores:  # the released scorer does this for "gpt-4o" models (OpenAI names allow no dots)
        name = re.sub(r"\.", "_", name)
    if name not in call:
        return fail("simple_function_checker:wrong_func_name", f"function {name!r} not called")
    params = call[name]
    for param in required:
        if param not in params:
            return fail("simple_function_checker:missing_required", f"missing required parameter {param!r}")
    for param, value in params.items():
        if param not in properties or param not in allowed_params:
            return fail("simple_function_checker:unexpected_param", f"unexpected parameter {param!r}")
        type_name = properties[param]["type"]
        if type_name == "object":  # never checked
            continue
        expected = TYPES[type_name]
        inner = TYPES[properties[param]["items"]["type"]] if type_name in NESTED else None
        if type_name == "float" and type(value) == int:
            value = float(value)
        allowed = allowed_params[param]
        verdict, is_variable = check_type(param, value, allowed, expected, inner)
        if not verdict.valid:
            return verdict
        if not is_variable:
            if expected == dict:
                verdict = check_dict(param, value, allowed)
            elif expected == list and inner == dict:
                verdict = check_list_of_dicts(param, value, allowed)
            elif expected == str:
                verdict = check_string(param, value, allowed)
            elif expected == list:
                verdict = check_list(param, value, allowed)
            else:
                verdict = None
            if verdict is not None:
                if not verdict.valid:
                    return verdict
                continue
        if value not in allowed:
            return fail("value_error:others", f"{param}: {value!r} not in {allowed!r}")
    for param, allowed in allowed_params.items():
        if param not in params and "" not in allowed:
            return fail("simple_function_checker:missing_optional", f"parameter {param!r} not given, not optional")
    return PASS


def find_function(functions, name: str):
    """The schema named `name` (exact match) in a list; a single schema (not a list) is returned as is."""
    if type(functions) is list:
        return next((f for f in functions if f["name"] == name), None)
    return functions


def ast_check(functions, calls: list, answers: list, category: str, dots_to_underscores: bool = False) -> Verdict:
    """The BFCL verdict of a parsed prediction for one item."""
    if "parallel" in category:
        if len(calls) != len(answers):
            return fail("parallel_function_checker_no_order:wrong_count", f"{len(calls)} calls for {len(answers)}")
        matched: list[int] = []
        verdict = PASS
        for index in range(len(answers)):
            answer = answers[index]
            function = find_function(functions, list(answer.keys())[0])
            for call_index in range(len(calls)):
                if call_index in matched:
                    continue
                verdict = check_call(function, calls[call_index], answer, dots_to_underscores)
                if verdict.valid:
                    matched.append(call_index)
                    break
            if not verdict.valid:
                return fail("parallel_function_checker_no_order:cannot_find_match",
                            f"no call matches ground-truth call {index} ({verdict.error_type})")
        return PASS
    if "multiple" in category:
        if len(calls) != len(answers):
            return fail("multiple_function_checker:wrong_count", f"{len(calls)} calls for {len(answers)}")
        function = find_function(functions, list(answers[0].keys())[0])
        return check_call(function, calls[0], answers[0], dots_to_underscores)
    if len(calls) != 1:
        return fail("simple_function_checker:wrong_count", f"{len(calls)} calls, expected 1")
    return check_call(functions[0], calls[0], answers[0], dots_to_underscores)
