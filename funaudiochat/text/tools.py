"""Speech function calling: the tools system prompt and the `<tool_call>` parser (SPEC.md §4, §11).

Tools are OpenAI-style definitions ({"type": "function", "function": {name, description, parameters}}); bare
{name, description, parameters} objects are accepted and wrapped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from funaudiochat.errors import InputError
from funaudiochat.text.chat import S2T_PROMPT

TOOLS_TEMPLATE = """
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def normalize_tools(tools) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise InputError("tools must be a non-empty JSON list of function definitions")
    out = []
    for i, t in enumerate(tools):
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict):
            fn = t["function"]
        elif isinstance(t, dict) and "name" in t:
            fn, t = t, {"type": "function", "function": t}
        else:
            raise InputError(f"tool {i}: expected {{'type': 'function', 'function': {{'name': ...}}}}, got {t!r}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputError(f"tool {i}: the function needs a non-empty 'name'")
        out.append(t)
    return out


def tools_system_prompt(tools, base: str = S2T_PROMPT) -> str:
    """The released FUNCTION_CALLING_PROMPT: one JSON tool definition per line inside <tools>."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in normalize_tools(tools))
    return base + TOOLS_TEMPLATE.format(tools=lines)


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ParsedToolCalls:
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one message per malformed block
    text: str = ""  # the reply with the <tool_call> blocks removed


def parse_tool_calls(reply: str) -> ParsedToolCalls:
    """Every `<tool_call>{...}</tool_call>` block -> ToolCall; malformed blocks are reported, never raised."""
    result = ParsedToolCalls(text=_CALL.sub("", reply).strip())
    for n, match in enumerate(_CALL.finditer(reply), start=1):
        body = match.group(1)
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            try:  # the released scorer replaces literal newlines before parsing
                obj = json.loads(body.replace("\n", " "))
            except json.JSONDecodeError as err:
                result.errors.append(f"tool call {n}: invalid JSON ({err.msg} at char {err.pos}): {body[:80]!r}")
                continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            result.errors.append(f"tool call {n}: expected an object with a string 'name', got {body[:80]!r}")
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models emit the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                result.errors.append(f"tool call {n} ({obj['name']}): 'arguments' is a string that is not JSON")
                continue
        if not isinstance(args, dict):
            result.errors.append(f"tool call {n} ({obj['name']}): 'arguments' must be an object, got {args!r}")
            continue
        result.calls.append(ToolCall(obj["name"], args))
    unclosed = reply.count("<tool_call>") - reply.count("</tool_call>")
    if unclosed > 0:
        result.errors.append(f"{unclosed} <tool_call> block(s) not closed by </tool_call>")
    return result
