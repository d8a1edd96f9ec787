"""What the BFCL and ACEBench checkers share: the verdict type, string standardisation, the prediction parser.

The released SpeechFCEval scorer (Fun-Audio-Chat `evaluate/SpeechFCEval/utils`) is the reference: every rule here
reproduces its behaviour, quirks included, so our verdicts and error types match it item by item (docs/eval.md).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

OK_TYPE = ""  # the error type of a passing check; an item that passes is recorded as "correct"


@dataclass(frozen=True)
class Verdict:
    valid: bool
    error_type: str = OK_TYPE
    reason: str = ""


PASS = Verdict(True)


def fail(error_type: str, reason: str = "") -> Verdict:
    return Verdict(False, error_type, reason)


_STANDARDISE = re.compile(r"[ ,./\-_*^]")


def standardize(text: str) -> str:
    """Drop spaces and `,./-_*^`, lower-case, and turn ' into " (so "April 1, 2024" == "april 1 2024")."""
    return _STANDARDISE.sub("", text).lower().replace("'", '"')


_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


class DecodeFailed(Exception):
    """The prediction text could not be turned into calls (the official `ast_decoder:decoder_failed`)."""


def parse_tool_calls(predict) -> list[dict]:
    """`<tool_call>{"name": N, "arguments": A}</tool_call>` blocks -> [{N: A}, ...].

    As in the released scorer: a literal backslash-n inside a block becomes a space before `json.loads`, blocks that
    are not JSON are skipped, a block without "name"/"arguments" fails the whole prediction, an argument list holding
    one object is unwrapped, and any other non-object arguments fail it.
    """
    try:
        blocks = _TOOL_CALL.findall(predict)
    except TypeError as err:  # "predict" is not a string
        raise DecodeFailed(f"prediction is not text: {predict!r}") from err
    decoded = []
    for block in blocks:
        try:
            decoded.append(json.loads(block.strip().replace("\\n", " ")))
        except (ValueError, RecursionError):
            continue
    calls = []
    for block in decoded:
        try:
            name, arguments = block["name"], block["arguments"]
            if isinstance(arguments, list) and len(arguments) == 1 and isinstance(arguments[0], dict):
                arguments = arguments[0]
            if not isinstance(arguments, dict):
                raise DecodeFailed(f"arguments of {name!r} are not an object: {arguments!r}")
            calls.append({name: arguments})
        except (KeyError, TypeError) as err:  # no name/arguments, or an unhashable name
            raise DecodeFailed(f"tool call without a usable name and arguments: {block!r}") from err
    return calls


def is_call_list(calls) -> bool:
    """[{name: {param: value}}, ...] with exactly one name per call and an object of arguments."""
    return isinstance(calls, list) and all(
        type(call) is dict and len(call) == 1 and type(next(iter(call.values()))) is dict for call in calls)


def tools_to_functions(tools: list) -> list[dict]:
    """OpenAI tools [{type, function: {name, description, parameters}}] -> [{name, description, parameters}]."""
    return [{"name": t["function"]["name"], "description": t["function"]["description"],
             "parameters": t["function"]["parameters"]} for t in tools]


def seq(values) -> list:
    """`values[0..len-1]` by index, as the released checkers read an allowed list (a string gives its characters)."""
    return [values[i] for i in range(len(values))]


def std_items(values) -> list:
    """Each string of `values` standardised, other items kept (read by index like the released code)."""
    return [standardize(v) if type(v) is str else v for v in seq(values)]
