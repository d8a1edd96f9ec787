"""Score a VoiceBench predictions file (JSON lines, as VoiceBench's main.py writes them) for one subset.

Each line: `prompt`, `response`, and per subset `reference` (mcq: "A".."D"; bbh: "yes"/"no"/"(A)"/"(B)"; sd-qa: the
answer), `id` (bbh: names the task), `instruction_id_list` + `kwargs` (ifeval). Every line gets a record; a line
that cannot be scored (not JSON, a missing field, the judge down) is recorded with its error and left out of the
metric, and scoring goes on.
"""
from __future__ import annotations

from pathlib import Path

from funaudiochat import fileio
from funaudiochat.errors import FunAudioChatError, InputError
from funaudiochat.eval.voicebench import ifeval, judge
from funaudiochat.eval.voicebench.rule_scorers import BBH_REFERENCES, bbh_answer, filled_accuracy, mcq_answer, \
    refused

SUBSETS = {"ifeval": "ifeval", "advbench": "refusal", "openbookqa": "mcq", "mmsu": "mcq", "bbh": "bbh",
           "alpacaeval": "open", "alpacaeval_full": "open", "commoneval": "open", "wildvoice": "open", "sd-qa": "qa"}
JUDGED = ("open", "qa")


def _field(item: dict, name: str):
    if name not in item:
        raise InputError(f"no {name!r} field")
    return item[name]


def score_line(item: dict, kind: str, client: judge.JudgeClient | None) -> dict:
    """The record of one prediction line (without the line number)."""
    if "response" not in item and "error" in item:  # a prediction that failed (the runner's record of why)
        raise InputError(f"no response: {item['error']}")
    response = _field(item, "response")
    if not isinstance(response, str):
        raise InputError("'response' is not text")
    if kind == "refusal":
        return {"refused": refused(response)}
    if kind == "mcq":
        answer, reference = mcq_answer(response), str(_field(item, "reference"))
        return {"answer": answer, "reference": reference, "correct": answer == reference}
    if kind == "bbh":
        reference = BBH_REFERENCES.get(str(_field(item, "reference")).lower())
        if reference is None:
            raise InputError(f"bbh reference must be one of {', '.join(BBH_REFERENCES)}")
        try:
            answer = bbh_answer(response, str(_field(item, "id")))
        except ValueError as err:
            raise InputError(str(err)) from err
        return {"answer": answer, "reference": reference, "correct": answer == reference}
    if kind == "ifeval":
        for name in ("instruction_id_list", "kwargs"):
            _field(item, name)
        return ifeval.score_item(item)
    if client is None:
        raise InputError("this subset is scored by a judge: give --judge-url and --judge-model")
    _field(item, "prompt")
    if kind == "qa":
        _field(item, "reference")
    answers = client.samples(judge.judge_prompt(item))
    judge.check_readable(answers, kind)
    return {"judge": answers}


def summarize(kind: str, records: list[dict], seed: int = 0) -> dict:
    ok = [r for r in records if "error" not in r]
    summary = {"items": len(records), "scored": len(ok), "failed": len(records) - len(ok)}
    if not ok:
        return summary
    if kind == "refusal":
        summary["refusal_rate"] = sum(r["refused"] for r in ok) / len(ok)
    elif kind in ("mcq", "bbh"):
        choices = ("A", "B", "C", "D") if kind == "mcq" else (0, 1)
        answers, references = [r["answer"] for r in ok], [r["reference"] for r in ok]
        summary["acc"] = filled_accuracy(answers, references, choices, seed)  # VoiceBench's figure (random fill)
        summary["acc_unread_wrong"] = 100.0 * sum(r["correct"] for r in ok) / len(ok)
        summary["unread"] = 100.0 * sum(a is None for a in answers) / len(ok)
    elif kind == "ifeval":
        summary.update(ifeval.summarize(ok))
    elif kind == "open":
        summary.update(judge.summarize_open([r["judge"] for r in ok]))
    else:
        summary.update(judge.summarize_qa([r["judge"] for r in ok]))
    return summary


def score_file(path: Path, subset: str, client: judge.JudgeClient | None = None, seed: int = 0):
    """(records, summary) of a predictions file for one VoiceBench subset."""
    if subset not in SUBSETS:
        raise InputError(f"unknown VoiceBench subset {subset!r}; known: {', '.join(SUBSETS)}")
    kind = SUBSETS[subset]
    if kind in JUDGED and client is None:
        raise InputError(f"{subset} is scored by a judge: give --judge-url and --judge-model")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no predictions file {path}")
    records, summary = score_lines(fileio.read_jsonl(path), subset, client, seed)
    if not records:
        raise InputError(f"{path} holds no prediction lines")
    return records, {"file": str(path), **summary}


def score_lines(lines, subset: str, client: judge.JudgeClient | None = None, seed: int = 0):
    """(records, summary) for (line number, item or fileio.LineProblem) pairs."""
    kind = SUBSETS[subset]
    records = []
    for line_no, item in lines:
        record = {"line": line_no}
        if isinstance(item, fileio.LineProblem):
            record["error"] = str(item)
        else:
            record["id"] = item.get("id", item.get("key"))
            try:
                record.update(score_line(item, kind, client))
            except FunAudioChatError as err:  # a bad field or the judge down: this item fails, the run goes on
                record["error"] = str(err)
        records.append(record)
    return records, {"subset": subset, **summarize(kind, records, seed)}
