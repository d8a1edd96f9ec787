"""`funaudiochat data distill`: prompt files, filters on synthetic answers, and a short real run on SmolLM2 (greedy,
few tokens) through the CLI, resumed a second time."""
from __future__ import annotations

import json

import pytest

from funaudiochat.cli import main as cli_main
from funaudiochat.data.distill import (TOOL_FAMILY, DistillPrompt, Filters, builtin_prompts, families,
                                       output_paths, read_prompts, reject_reason)
from funaudiochat.errors import InputError

FAMILIES = {"facts", "arithmetic", "definitions", "howto", "chitchat", "tools", "style", "emotional"}


def ask(prompt="What is 6 times 7?", family="custom", expected=()):
    return DistillPrompt("x", prompt, family, tuple(expected))


@pytest.mark.parametrize("answer,finished,prompt,reason", [
    ("The answer is 42.", True, ask(expected=["42"]), None),
    ("   ", True, ask(), "empty"),
    ("The answer is forty", False, ask(), "unfinished"),
    ("Yes.", True, ask(), "too_short"),
    (" ".join(["word"] * 10 + [f"w{i}" for i in range(200)]), True, ask(), "too_long"),
    ("I'm sorry, but I cannot help with that request.", True, ask(), "refusal"),
    ("As an AI, I have no feelings, but thanks for asking.", True, ask(), "refusal"),
    ("I can't imagine how hard that must be. Take your time.", True, ask(), None),
    ("It is big and it is red and it is big and it is red and it is big and it is red.", True, ask(), "repetition"),
    ("Paris is lovely. I like it a lot. Paris is lovely. I like it a lot.", True, ask(), "repetition"),
    ("The answer is 420.", True, ask(expected=["42"]), "wrong_answer"),
    ("The answer is 1,042.", True, ask(expected=["1042"]), None),
    ("90 + 84 = 174. Now subtract: 90 - 174 = 10. So, the answer is 10.", True, ask(expected=["174"]), "wrong_answer"),
    ("Seven days make a week.", True, ask(expected=["7", "seven"]), None),
    ("A million cats.", True, ask(expected=["lion"]), "wrong_answer"),
    ('<tool_call>\n{"name": "set_timer", "arguments": {"seconds": 600}}\n</tool_call>', True,
     ask("Set a timer for ten minutes.", TOOL_FAMILY), None),
    ('<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>', True, ask(family=TOOL_FAMILY),
     "bad_tool_call"),
    ("Sure, the timer is set.", True, ask(family=TOOL_FAMILY), "bad_tool_call"),
])
def test_filters(answer, finished, prompt, reason):
    assert reject_reason(prompt, answer, finished, Filters()) == reason


def test_unfinished_answers_can_be_kept():
    assert reject_reason(ask(), "The answer is", False, Filters(drop_unfinished=False)) is None


def test_builtin_families():
    assert set(families()) == FAMILIES
    prompts = builtin_prompts("all")
    by_family = {f: [p for p in prompts if p.family == f] for f in FAMILIES}
    assert all(len(v) >= 20 for v in by_family.values()), {f: len(v) for f, v in by_family.items()}
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.expected for p in by_family["arithmetic"] + by_family["facts"])
    assert [p.id for p in builtin_prompts("facts,style")] == [p.id for p in by_family["facts"] + by_family["style"]]
    with pytest.raises(InputError, match="unknown prompt families"):
        builtin_prompts("facts,poetry")


def test_read_prompt_files(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("# a comment\nWhat is rain?\n\nWhy is the sky blue?\n")
    a = read_prompts(txt)
    assert [(p.prompt, p.family) for p in a] == [("What is rain?", "mine"), ("Why is the sky blue?", "mine")]
    assert [p.id for p in read_prompts(txt)] == [p.id for p in a]  # stable ids: resuming finds them
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"prompt": "2+2?", "expected": "4", "family": "math"}\n{"prompt": "Hi", "id": "h1"}\n')
    b = read_prompts(jsonl)
    assert (b[0].family, b[0].expected, b[1].id, b[1].family) == ("math", ("4",), "h1", "q")
    jsonl.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(InputError, match=r"q.jsonl:2"):
        read_prompts(jsonl)


def test_distill_cli_on_smollm2_resumes(tmp_path, mini_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is the capital of France?", "expected": ["Paris"], "family": "facts"},
        {"prompt": "What is the capital of Japan?", "expected": ["Berlin"], "family": "facts"},  # wrong on purpose
        {"prompt": "Explain in detail how a car engine works.", "family": "howto"},  # needs more than 12 tokens
    ]) + "\n")
    out = tmp_path / "qa.jsonl"
    args = ["data", "distill", str(prompts), "--model", str(mini_dir), "--out", str(out), "--greedy",
            "--max-new-tokens", "12", "--batch-size", "2", "--no-progress"]
    assert cli_main(args) == 0
    kept_path, rejected_path, report_path = output_paths(out)
    kept = [json.loads(line) for line in kept_path.read_text().splitlines()]
    rejected = [json.loads(line) for line in rejected_path.read_text().splitlines()]
    report = json.loads(report_path.read_text())
    assert [r["prompt"] for r in kept] == ["What is the capital of France?"]
    assert "Paris" in kept[0]["answer"] and kept[0]["finished"]
    reasons = {r["prompt"]: r["reason"] for r in rejected}
    assert reasons["What is the capital of Japan?"] == "wrong_answer"
    assert reasons["Explain in detail how a car engine works."] == "unfinished" and len(reasons) == 2
    assert (report["processed"], report["kept"], sum(report["rejected"].values())) == (3, 1, 2)
    assert report["new_tokens"] == sum(r["new_tokens"] for r in kept + rejected) > 0

    before = kept_path.read_text(), rejected_path.read_text()
    assert cli_main(args) == 0  # resume: everything is answered already
    assert (kept_path.read_text(), rejected_path.read_text()) == before
    report = json.loads(report_path.read_text())
    assert (report["already_done"], report["processed"]) == (3, 0)


def test_greedy_answers_do_not_depend_on_the_batch(tmp_path, mini_dir):
    """Greedy distillation batches continuously (rows join and leave between steps): with three rows sharing steps,
    every answer is the one the prompt gets alone."""
    from funaudiochat.data.cli_distill import load
    from funaudiochat.data.distill import DistillSettings, Distiller

    engine, tok = load(mini_dir)
    prompts = [DistillPrompt(f"p{i}", q, "custom") for i, q in enumerate(
        ["What is the capital of France?", "Name a fruit that is yellow.", "Explain in detail how a car engine works."])]
    answers = {}
    for rows in (1, 3):
        out = tmp_path / f"rows{rows}.jsonl"
        settings = DistillSettings(batch_size=rows, max_new_tokens=10, greedy=True)
        Distiller(engine, tok, settings).run(prompts, out, progress=False)
        kept, rejected, _ = output_paths(out)
        lines = kept.read_text().splitlines() + rejected.read_text().splitlines()
        answers[rows] = {r["id"]: (r["answer"], r["new_tokens"]) for r in map(json.loads, lines)}
    assert len(answers[1]) == 3 and answers[3] == answers[1]
    assert len({a for a, _ in answers[1].values()}) == 3  # three different answers, not one copied


def test_distill_cli_needs_prompts(tmp_path, capsys):
    assert cli_main(["data", "distill", "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "no prompts" in capsys.readouterr().err
