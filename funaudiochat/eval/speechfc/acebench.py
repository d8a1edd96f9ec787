"""ACEBench's `normal_checker` as the released SpeechFCEval scorer runs it (`compute_metrics_acebench.py`).

A ground truth is `{function[_k]: {param: value}}` (one value, not a list of allowed ones), or a list of such dicts
taken as alternatives. The rules keep the released code's order and quirks, because our error types must match it
item by item. Worth knowing when reading scores:
- strings pass when the standardised ground truth is a *substring* of the standardised value ("agent" categories
  need equality); dict values likewise compare `str(expected)` as a substring of `str(value)`;
- numbers and booleans are only type-checked, never compared with the ground truth;
- a parameter whose schema type differs from the ground truth's type is a "variable": any value of either type passes;
- a schema whose properties equal the ground-truth arguments accepts any call with arguments.
"""
from __future__ import annotations

import re
from collections import Counter

from funaudiochat.eval.speechfc.common import PASS, Verdict, fail, seq, standardize, std_items

TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
         "dict": dict, "any": str, "list": list, "object": dict, "objectArray": list, "list(string)": list,
         "list(enum)": list, "int": int, "enum": enumerate, "number": int}
# "enum" maps to a type no JSON value has, so an enum value passes only as a "variable" of the ground truth's type
NESTED = ("array", "tuple", "list(string)", "list(enum)", "object", "objectArray")


class ReleasedScorerCrash(Exception):
    """An input on which the released scorer raises (so it gives no verdict); we record it as a scorer error."""


def _bool_word(value):
    """"true"/"false" count as booleans in type and dict checks."""
    if value == "true":
        return True
    if value == "false":
        return False
    return value


def check_type(param: str, value, answer, expected, inner) -> tuple[Verdict, bool]:
    """(verdict, is_variable) of one value against the schema type and the ground-truth value."""
    answer_type = type(answer) if answer != "" else None
    is_variable = answer_type is not None and answer_type != expected
    value = _bool_word(value)
    nested_failed = False
    if type(value) == expected:
        if inner is None:
            return PASS, is_variable
        for option in answer:  # the items of the ground-truth value; only list items constrain the value's items
            if type(option) is not list or all(check_type(param, item, option, inner, None)[0].valid
                                                for item in value):
                return PASS, is_variable
        nested_failed = True
    if answer_type is not None and (type(value) == answer_type or answer == value):
        return (fail("type_error", f"{param}: nested items of {value!r}") if nested_failed else PASS), True
    return fail("type_error", f"{param}: expected {getattr(expected, '__name__', expected)}, "
                              f"got {type(value).__name__}"), False


def check_string(param: str, value: str, answer: str, category: str) -> Verdict:
    got, want = standardize(value), standardize(answer)
    if (got != want) if "agent" in category else (want not in got):
        return fail("value_error:string", f"{param}: expected {answer!r}, got {value!r}")
    return PASS


def check_list(param: str, value: list, answer) -> Verdict:
    if std_items(value) != std_items(answer):
        return fail("value_error:list/tuple", f"{param}: expected {answer!r}, got {value!r}")
    return PASS


def check_dict(param: str, value, answer) -> Verdict:
    """Same keys; nested dicts recursively; other values by `str(expected) in str(value)` after standardising."""
    if not isinstance(value, dict):
        return fail("value_error", f"{param}: {value!r} is not an object")
    if len(list(value.keys())) != len(list(answer.keys())):
        return fail("value_error", f"{param}: keys {list(value)} vs {list(answer)}")
    verdict = PASS
    for key, item in value.items():
        item = _bool_word(item)
        if key not in answer:
            return fail("value_error", f"{param}: unexpected key {key!r}")
        expected = answer[key]
        if isinstance(expected, dict):
            verdict = check_dict(param, item, expected)
            if not verdict.valid:
                return verdict
            continue
        got = standardize(item) if type(item) is str else item
        want = standardize(expected) if type(expected) is str else expected
        if str(want) not in str(got):
            return fail("value_error", f"{param}: {key}={item!r}, expected {expected!r}")
    return verdict


def check_list_of_dicts(param: str, value: list, answer: list) -> Verdict:
    if len(value) != len(answer):
        return fail("value_error:list_dict_count", f"{param}: {len(value)} objects, expected {len(answer)}")
    verdict = PASS
    for index in range(len(value)):
        verdict = check_dict(param, value[index], answer[index])
        if not verdict.valid:
            return verdict
    return verdict


def _item_type(schema: dict) -> str:
    """The item type of a nested parameter; without "items", guessed from the type's name as the released code does."""
    try:
        return schema["items"]["type"]
    except Exception:
        if "string" in schema["type"]:
            return "string"
        return "enum" if "enum" in schema["type"] else "dict"


def check_call(function: dict, call: dict, answer: dict, category: str) -> Verdict:
    """One call {name: {param: value}} against one ground-truth call {name: {param: value}} and its schema."""
    expected_params = list(answer.values())[0]
    if list(call.values())[0] == {} and function["parameters"] == {}:
        return PASS
    if list(call.values())[0] == {} or function["parameters"] == {}:
        return fail("wrong_param", "arguments given to a function without parameters, or none given")
    if expected_params == function["parameters"]["properties"]:
        return PASS
    if expected_params == {}:
        return fail("wrong_param", "the ground truth has no arguments")
    name = function["name"]
    if name not in call:
        return fail("wrong_function_name", f"expected {name!r}, got {list(call.keys())[0]!r}")
    params = call[name]
    properties = function["parameters"]["properties"]
    for param in function["parameters"]["required"]:
        if param not in params:
            return fail("lack_args", f"lack required_params: {param}")
    for param, value in params.items():
        if param not in properties or param not in expected_params:
            return fail("addition_args", f"addition params: {param}")
        type_name = properties[param]["type"]
        expected = TYPES[type_name]
        inner = TYPES[_item_type(properties[param])] if type_name in NESTED else None
        if type_name == "float" and type(value) == int:
            value = float(value)
        target = expected_params[param]
        verdict, is_variable = check_type(param, value, target, expected, inner)
        if not verdict.valid:
            return verdict
        if is_variable:
            continue
        if expected == dict:
            verdict = check_dict(param, value, target)
        elif expected == list and inner == dict:
            if type_name == "objectArray":
                if len(value) != len(target):
                    return fail("value_error:dict_items", f"{param}: {len(value)} objects, expected {len(target)}")
                if len(value):
                    # the released code calls its dict checker with an argument missing here and raises
                    raise ReleasedScorerCrash(f"objectArray parameter {param!r} with items")
            verdict = check_list_of_dicts(param, value, target)
        elif expected == str:
            verdict = check_string(param, value, target, category)
        elif expected == list:
            verdict = check_list(param, value, target)
        if not verdict.valid:
            return verdict
    return PASS


def find_function(functions, name: str):
    """The first schema whose name is a substring of `name` (so "f" also finds "f_1", and "get" finds "get_x")."""
    if type(functions) is list:
        return next((f for f in functions if f["name"] in name), None)
    return functions


def normal_check(functions, calls: list, answer: dict, category: str) -> Verdict:
    """The verdict of a parsed prediction against one ground-truth alternative."""
    if len(calls) != len(answer):
        return fail("wrong functions number", f"{len(calls)} calls, expected {len(answer)}")
    names = list(answer.keys())
    answers = [{key: value} for key, value in answer.items()]
    if len(answers) > 1:  # several calls of one function are keyed f_1, f_2 ...
        answers = [{re.sub(r"_\d+$", "", key): value} for key, value in answer.items()]
    called = Counter(name for call in calls for name in call.keys())
    wanted = Counter(name for entry in answers for name in entry.keys())
    for name in called:
        if name not in wanted:
            return fail("function_mismatch", f"{name} is not in the ground truth")
    for name in wanted:
        if name not in called:
            return fail("function_mismatch", f"{name} was not called")
    for name, count in called.items():
        if count != wanted[name]:
            return fail("function_mismatch", f"{name} called {count} times, expected {wanted[name]}")
    verdict = PASS
    for index, entry in enumerate(answers):
        function = find_function(functions, names[index])
        wanted_name = list(entry.keys())[0]
        for call in calls:
            if list(call.keys())[0] == wanted_name:
                verdict = check_call(function, call, entry, category)
                if verdict.valid:
                    break
            else:  # a call of another function overwrites an earlier failure (as in the released loop)
                verdict = fail("simple_function_checker:unclear", f"no call of {wanted_name} passes")
        if not verdict.valid:
            return verdict
    return verdict


def check_alternatives(functions, calls: list, ground_truth, category: str) -> Verdict:
    """Correct if any alternative passes; otherwise the first alternative's error."""
    alternatives = ground_truth if type(ground_truth) is list else [ground_truth]
    if not alternatives:
        raise ReleasedScorerCrash("empty list of ground-truth alternatives")
    first = None
    for alternative in alternatives:
        verdict = normal_check(functions, calls, alternative, category)
        if verdict.valid:
            return verdict
        first = first or verdict
    return first
