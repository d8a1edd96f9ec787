"""MMAU and MMSU multiple choice: the released instruction, readers of the published JSON, the official scorers.

Instruction (Fun-Audio-Chat's README, "Instruction format for Audio Understanding tasks"): the question, then
" Choose the correct option from the following options:" and one line per choice, "(A)choice" (no space), typed
with the audio under the default S2T system prompt.

Published formats:
- MMAU (github.com/Sakshi113/MMAU, `mmau-test-mini.json`): a JSON list; each entry has `id`, `audio_id` (a path
  relative to the JSON's folder), `question`, `choices` (a list), `answer` (the choice's text), `task` (sound,
  music, speech), `difficulty` (easy, medium, hard), `category`, `sub-category`. Predictions are the same list
  with `model_output`.
- MMSU (github.com/dingdongwang/MMSU_Bench): entries with `id`, `audio_path`, `question`, `choice_a` .. `choice_d`,
  `answer_gt` (the choice's text), `task_name`, `category`, `sub-category`. Predictions are JSON lines with
  `response`.

Scorers, rule for rule as the official `evaluation.py` (MMAU) and `mmsu_evaluation.py` (MMSU):
- MMAU `string_match`: words are `\\b\\w+\\b` runs of the lower-cased text, as sets; correct when every word of the
  answer is in the prediction and the prediction holds no word of another choice (words shared with the answer
  excepted). An empty prediction is wrong. An entry without `model_output` is skipped (not counted).
- MMSU: the response, stripped and with newlines removed; its first character if it is A-D, else its
  second-to-last character if that is A-D ("The answer is A."); correct when that choice's text equals
  `answer_gt`. A response read neither way is "wrong format" and is left out of the total, as the official
  script does. Where the official script reuses the previous item's letter (an empty or "None" response, a
  variable never reset), we count the item as wrong; `acc_wrong_format_wrong` also counts wrong-format items.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from funaudiochat import fileio
from funaudiochat.errors import FunAudioChatError, InputError

BENCHMARKS = ("mmau", "mmsu")
LETTERS = "ABCDEFGHIJ"
_WORD = re.compile(r"\b\w+\b")


def instruction(question: str, choices: list[str]) -> str:
    """Fun-Audio-Chat's released multiple-choice instruction."""
    lines = [f"({letter}){choice}" for letter, choice in zip(LETTERS, choices)]
    return f"{question} Choose the correct option from the following options:\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------------- scorers

def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def mmau_correct(answer: str, prediction: str, choices: list[str]) -> bool:
    """MMAU's string_match."""
    predicted, expected = _words(prediction), _words(answer)
    if not predicted:
        return False
    others = set()
    for choice in choices:
        words = _words(choice)
        if words != expected:
            others |= words - expected
    return expected <= predicted and predicted.isdisjoint(others)


def mmsu_letter(response: str) -> str | None:
    """The letter MMSU's script reads from a response: the first character, else the second-to-last; None when
    neither is A-D (or the response is empty / "None")."""
    predict = response.strip().replace("\n", "")
    if not predict or predict == "None":
        return None
    if predict[0] in "ABCD":
        return predict[0]
    if len(predict) > 1 and predict[-2] in "ABCD":
        return predict[-2]
    return None


# ------------------------------------------------------------------------------------------------- readers

def _require(entry: dict, names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in entry]
    if missing:
        raise InputError(f"{where}: no {', '.join(map(repr, missing))} field")


def _entries(path: Path) -> list[tuple[int, dict | fileio.LineProblem]]:
    """(position, entry) of a JSON list file or a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as err:
            raise InputError(f"{path}: not valid JSON ({err})") from None
        return [(k + 1, e if isinstance(e, dict) else fileio.LineProblem("bad format", "not a JSON object")) for k, e in
                enumerate(data)]
    return list(fileio.read_jsonl(path))


def mmau_item(entry: dict, folder: Path, where: str) -> dict:
    """A suite item (id, audio, text = the instruction, question, choices, answer, task, ...) from an MMAU entry."""
    _require(entry, ("id", "audio_id", "question", "choices", "answer"), where)
    choices = entry["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise InputError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} options")
    keep = {k: entry[k] for k in ("task", "difficulty", "category", "sub-category") if k in entry}
    return {"id": str(entry["id"]), "audio": str(folder / entry["audio_id"]), "question": entry["question"],
            "choices": [str(c) for c in choices], "answer": str(entry["answer"]), **keep,
            "text": instruction(entry["question"], [str(c) for c in choices])}


def mmsu_item(entry: dict, folder: Path, where: str) -> dict:
    """A suite item from an MMSU entry (choice_a .. choice_d kept, as the scorer reads them)."""
    _require(entry, ("id", "audio_path", "question", "choice_a", "choice_b", "answer_gt"), where)
    choices = [entry.get(f"choice_{c}") for c in "abcd"]
    listed = [str(c) for c in choices if c is not None]
    keep = {k: entry[k] for k in ("task_name", "category", "sub-category") if k in entry}
    return {"id": str(entry["id"]), "audio": str(folder / entry["audio_path"]), "question": entry["question"],
            **{f"choice_{c}": v for c, v in zip("abcd", choices)}, "answer_gt": entry["answer_gt"], **keep,
            "text": instruction(entry["question"], listed)}


def read_published(path: Path, benchmark: str) -> list[dict]:
    """The suite items of a published MMAU / MMSU file (audio paths taken from the file's folder)."""
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    make = mmau_item if benchmark == "mmau" else mmsu_item
    items = []
    for position, entry in _entries(path):
        where = f"{path} entry {position}"
        if isinstance(entry, fileio.LineProblem):
            raise InputError(f"{where}: {entry}")
        items.append(make(entry, Path(path).parent, where))
    if not items:
        raise InputError(f"{path}: no entries")
    return items


# ------------------------------------------------------------------------------------------------- scoring

def score_entry(entry: dict, benchmark: str) -> dict:
    """The record of one prediction entry (raises InputError for one that cannot be scored)."""
    if benchmark == "mmau":
        if "model_output" not in entry:  # the official script skips such an entry
            raise InputError(f"no model_output{': ' + entry['error'] if 'error' in entry else ''}")
        _require(entry, ("answer", "choices"), "entry")
        prediction = entry["model_output"]
        if not isinstance(prediction, str):
            raise InputError("'model_output' is not text")
        return {"answer": entry["answer"], "correct": mmau_correct(entry["answer"], prediction, entry["choices"]),
                "group": {k: entry.get(k) for k in ("task", "difficulty", "sub-category")}}
    if "response" not in entry and "error" in entry:  # a prediction that failed (the runner's record of why)
        raise InputError(f"no response: {entry['error']}")
    _require(entry, ("answer_gt",), "entry")
    if not isinstance(entry.get("response", ""), str):  # the official script skips these ("Error prediction!")
        raise InputError("'response' is not text")
    letter = mmsu_letter(entry.get("response", ""))
    read = letter is not None or not entry.get("response", "").strip() or entry.get("response", "").strip() == "None"
    chosen = entry.get(f"choice_{letter.lower()}") if letter else None
    return {"letter": letter, "wrong_format": not read, "correct": letter is not None and chosen == entry["answer_gt"],
            "group": {k: entry.get(k) for k in ("category", "sub-category")}}


def _accuracy_by(records: list[dict], key: str) -> dict:
    counts = defaultdict(lambda: [0, 0])
    for r in records:
        value = r["group"].get(key)
        if value is not None:
            counts[value][0] += r["correct"]
            counts[value][1] += 1
    return {name: 100.0 * c / n for name, (c, n) in sorted(counts.items())}


def summarize(records: list[dict], benchmark: str) -> dict:
    ok = [r for r in records if "error" not in r]
    summary = {"items": len(records), "scored": len(ok), "failed": len(records) - len(ok)}
    counted = [r for r in ok if not r.get("wrong_format")]
    if counted:
        summary["acc"] = 100.0 * sum(r["correct"] for r in counted) / len(counted)
    if benchmark == "mmau":
        for key in ("task", "difficulty", "sub-category"):
            summary[f"acc_by_{key}"] = _accuracy_by(ok, key)
    else:
        summary["wrong_format"] = len(ok) - len(counted)
        if ok:
            summary["acc_wrong_format_wrong"] = 100.0 * sum(r["correct"] for r in ok) / len(ok)
        for key in ("category", "sub-category"):
            summary[f"acc_by_{key}"] = _accuracy_by(counted, key)
    return summary


def score_lines(lines, benchmark: str) -> tuple[list[dict], dict]:
    """(records, summary) for (position, entry or fileio.LineProblem) pairs; a bad entry is recorded, not fatal."""
    records = []
    for position, entry in lines:
        record = {"line": position}
        if isinstance(entry, fileio.LineProblem):
            record["error"] = str(entry)
        else:
            record["id"] = entry.get("id")
            try:
                record.update(score_entry(entry, benchmark))
            except FunAudioChatError as err:
                record["error"] = str(err)
        records.append(record)
    return records, {"benchmark": benchmark, **summarize(records, benchmark)}


def score_file(path: Path, benchmark: str) -> tuple[list[dict], dict]:
    """Score a predictions file in the published format (MMAU: JSON list with model_output; MMSU: JSON lines with
    response; either may be JSON lines or a JSON list)."""
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    records, summary = score_lines(_entries(Path(path)), benchmark)
    if not records:
        raise InputError(f"{path} holds no entries")
    return records, {"file": str(path), **summary}
