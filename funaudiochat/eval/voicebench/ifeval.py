"""VoiceBench's ifeval subset: Google's IFEval instruction checks, strict and loose, prompt and instruction level.

An item is `{"prompt", "response", "instruction_id_list": [...], "kwargs": [{...}, ...]}` (VoiceBench's format).
Each instruction id maps to a check below, written from the rules of Google's `instruction_following_eval` as
VoiceBench ships it (`src/evaluator/instruction_following_eval/instructions.py`). Falsy kwargs are dropped as there.
Strict: the response as given. Loose: any of 8 variants passes (first line, last line or both removed; `*` removed).

Differences from the reference (docs/eval.md):
- sentences (`number_sentences`) and words (`capital_word_frequency`) are found by `punkt.py`, Punkt's rules with
  its english abbreviation / sentence-starter / collocation tables, instead of NLTK's trained Punkt model and
  Treebank tokenizer; they differ only where Punkt consults its orthographic statistics (docs/eval.md);
- language detection (`response_language`, `english_capital`, `english_lowercase`) uses the same langdetect library,
  seeded so that a run repeats (unseeded, as in the reference, it may differ between runs on short texts);
- an instruction argument the reference would draw at random when missing is an error here.
"""
from __future__ import annotations

import collections
import json
import re

from funaudiochat.errors import InputError
from funaudiochat.eval.voicebench.punkt import count_sentences, word_tokens as _word_tokens

LESS, AT_LEAST = "less than", "at least"
_SPEAKER_TAGS = ("<1>", "<2>", "<3>")


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _detect_language(text: str) -> str | None:
    """ISO code by langdetect (seeded); None when it cannot tell (the reference then counts the check as passed)."""
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None


def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation == LESS:
        return count < threshold
    if relation == AT_LEAST:
        return count >= threshold
    raise InputError(f"relation must be {LESS!r} or {AT_LEAST!r}, got {relation!r}")


def _need(args: dict, *names: str):
    missing = [n for n in names if args.get(n) is None]
    if missing:
        raise InputError(f"instruction argument(s) missing: {', '.join(missing)}")
    return [args[n] for n in names]


# ------------------------------------------------------------------------------------------------ the checks

def _paragraphs_first_word(value: str, args: dict) -> bool:
    num_paragraphs, nth, first_word = _need(args, "num_paragraphs", "nth_paragraph", "first_word")
    paragraphs = re.split(r"\n\n", value)
    count = sum(1 for p in paragraphs if p.strip())
    if nth > count or not paragraphs[nth - 1].strip():
        return False
    word = paragraphs[nth - 1].strip().split()[0].strip().lstrip("'").lstrip('"')
    found = ""
    for letter in word:
        if letter in {".", ",", "?", "!", "'", '"'}:
            break
        found += letter.lower()
    return count == num_paragraphs and found == first_word.lower()


def _paragraphs(value: str, args: dict) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", value)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == _need(args, "num_paragraphs")[0]


def _postscript(value: str, args: dict) -> bool:
    marker = _need(args, "postscript_marker")[0].strip()
    patterns = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}
    pattern = patterns.get(marker, r"\s*" + marker.lower() + r".*$")
    return bool(re.findall(pattern, value.lower(), flags=re.MULTILINE))


def _highlights(value: str, args: dict) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", value) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= _need(args, "num_highlights")[0]


def _sections(value: str, args: dict) -> bool:
    splitter, number = _need(args, "section_spliter", "num_sections")
    return len(re.split(r"\s?" + splitter.strip() + r"\s?\d+\s?", value)) - 1 >= number


def _json(value: str, args: dict) -> bool:
    value = value.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(prefix)
    try:
        json.loads(value.removesuffix("```").strip())
    except ValueError:
        return False
    return True


def _two_responses(value: str, args: dict) -> bool:
    parts = value.split("******")
    kept = []
    for index, part in enumerate(parts):
        if not part.strip():
            if index not in (0, len(parts) - 1):
                return False
        else:
            kept.append(part)
    return len(kept) == 2 and kept[0].strip() != kept[1].strip()


def _letters(value: str, args: dict) -> bool:
    letter, frequency = _need(args, "letter", "let_frequency")
    count = collections.Counter(value.lower())[letter.strip().lower()]
    return count < frequency if args.get("let_relation") == LESS else count >= frequency  # any other relation: >=


def _language(value: str, args: dict) -> bool:
    found = _detect_language(value)
    return found is None or found == _need(args, "language")[0]


def _all_case(value: str, upper: bool) -> bool:
    if not (value.isupper() if upper else value.islower()):
        return False
    found = _detect_language(value)
    return found is None or found == "en"


CHECKS = {
    "keywords:existence": lambda v, a: all(re.search(k, v, flags=re.IGNORECASE) for k in _need(a, "keywords")[0]),
    "keywords:frequency": lambda v, a: _compare(len(re.findall(_need(a, "keyword")[0].strip(), v, re.IGNORECASE)),
                                                *_need(a, "relation", "frequency")),
    "keywords:forbidden_words": lambda v, a: not any(re.search(r"\b" + w + r"\b", v, flags=re.IGNORECASE)
                                                     for w in _need(a, "forbidden_words")[0]),
    "keywords:letter_frequency": _letters,
    "language:response_language": _language,
    "length_constraints:number_sentences": lambda v, a: _compare(count_sentences(v), *_need(a, "relation",
                                                                                            "num_sentences")),
    "length_constraints:number_paragraphs": _paragraphs,
    "length_constraints:number_words": lambda v, a: _compare(count_words(v), *_need(a, "relation", "num_words")),
    "length_constraints:nth_paragraph_first_word": _paragraphs_first_word,
    "detectable_content:number_placeholders": lambda v, a: len(re.findall(r"\[.*?\]", v))
    >= _need(a, "num_placeholders")[0],
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": lambda v, a: (
        len(re.findall(r"^\s*\*[^\*].*$", v, flags=re.MULTILINE)) + len(re.findall(r"^\s*-.*$", v, flags=re.MULTILINE))
        == _need(a, "num_bullets")[0]),
    "detectable_format:constrained_response": lambda v, a: any(
        option in v.strip() for option in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:json_format": _json,
    "detectable_format:title": lambda v, a: any(t.lstrip("<").rstrip(">").strip()
                                                for t in re.findall(r"<<[^\n]+>>", v)),
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": lambda v, a: v.strip().lower().startswith(
        _need(a, "prompt_to_repeat")[0].strip().lower()),
    "startend:end_checker": lambda v, a: v.strip().strip('"').lower().endswith(
        _need(a, "end_phrase")[0].strip().lower()),
    "change_case:capital_word_frequency": lambda v, a: _compare(sum(w.isupper() for w in _word_tokens(v)),
                                                                *_need(a, "capital_relation", "capital_frequency")),
    "change_case:english_capital": lambda v, a: _all_case(v, upper=True),
    "change_case:english_lowercase": lambda v, a: _all_case(v, upper=False),
    "punctuation:no_comma": lambda v, a: not re.search(r",", v),
    "startend:quotation": lambda v, a: len(v.strip()) > 1 and v.strip()[0] == '"' and v.strip()[-1] == '"',
}


def clean_response(response: str) -> str:
    """VoiceBench strips a leading speaker tag and a trailing `<|user|>` before checking."""
    if response.startswith(_SPEAKER_TAGS):
        response = response[3:].strip()
    if response.endswith("<|user|>"):
        response = response[:-8].strip()
    return response


def loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def follows(instruction_id: str, args: dict, response: str, loose: bool) -> bool:
    if instruction_id not in CHECKS:
        raise InputError(f"unknown IFEval instruction {instruction_id!r}")
    args = {k: v for k, v in (args or {}).items() if v}
    check = CHECKS[instruction_id]
    candidates = loose_variants(response) if loose else [response]
    return any(c.strip() and check(c, args) for c in candidates)


def score_item(item: dict) -> dict:
    """{"strict": [bool per instruction], "loose": [...]} for one VoiceBench ifeval item."""
    response = clean_response(item["response"])
    ids, kwargs = item["instruction_id_list"], item["kwargs"]
    return {mode: [follows(i, kwargs[n], response, loose=mode == "loose") for n, i in enumerate(ids)]
            for mode in ("strict", "loose")}


def summarize(results: list[dict]) -> dict:
    """Prompt-level (all instructions followed) and instruction-level accuracy, strict and loose, and their mean."""
    out = {}
    for mode in ("strict", "loose"):
        lists = [r[mode] for r in results]
        out[f"{mode}-prompt"] = sum(all(x) for x in lists) / len(lists)
        out[f"{mode}-instruction"] = sum(map(sum, lists)) / sum(map(len, lists))
    out["final"] = sum(out.values()) / 4
    return out
