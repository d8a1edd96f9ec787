"""MMAU / MMSU multiple choice: the released instruction, the published-format readers, and hand-made cases for each
rule of the official scorers (MMAU evaluation.py string_match; MMSU mmsu_evaluation.py letter reading and its
wrong-format exclusion); the expected verdicts are what the official code gives on these inputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from funaudiochat.errors import InputError
from funaudiochat.eval.audio_mcq import instruction, mmau_correct, mmsu_letter, read_published, score_file, \
    score_lines

SOURCE = ["Man", "Woman", "Child", "Robot"]
WHO = ["A child", "A woman", "An adult man", "A teenager"]


def test_released_instruction_format():
    assert instruction("Who speaks?", ["Man", "Woman"]) == \
        "Who speaks? Choose the correct option from the following options:\n(A)Man\n(B)Woman"


@pytest.mark.parametrize("answer,prediction,choices,expected", [
    ("Man", "Man", SOURCE, True),
    ("Man", "It is a man.", SOURCE, True),                 # case and extra words do not matter
    ("Man", "(A) Man", SOURCE, True),                      # the letter is just another word
    ("Man", "A man or a woman", SOURCE, False),            # a word of another choice
    ("Man", "Human voice", SOURCE, False),                 # words, not substrings
    ("Man", "", SOURCE, False),                            # empty prediction
    ("Man", "!!!", SOURCE, False),                         # no word at all
    ("A woman", "woman", WHO, False),                      # every answer word is needed ("a")
    ("A woman", "It is a woman", WHO, True),               # "a" is shared with no wrong choice's own words
    ("An adult man", "an adult man, not a child", WHO, False),
    ("Two", "two two", ["One", "Two", "Three", "Four"], True),
    ("Rising", "rising then falling", ["Rising", "Falling", "Constant"], False),
    ("Dog barking", "dog", ["Dog barking", "Dog growling"], False),   # "barking" missing
    ("Dog barking", "a dog barking", ["Dog barking", "Dog growling"], True),  # "dog" shared, not held against
])
def test_mmau_string_match(answer, prediction, choices, expected):
    assert mmau_correct(answer, prediction, choices) is expected


@pytest.mark.parametrize("response,letter", [
    ("A", "A"), ("B.", "B"), ("C) water", "C"), ("  D  ", "D"),
    ("The answer is A.", "A"),      # second-to-last character
    ("(B)", "B"), ("answer:\nC.", "C"),
    ("As an AI, I think B", "A"),   # the first character wins, as in the official script
    ("option c", None), ("The answer is b.", None), ("(E)", None), ("", None), ("None", None), ("\n", None),
])
def test_mmsu_letter(response, letter):
    assert mmsu_letter(response) == letter


def _mmsu(response, gt="water", **extra):
    return {"id": "x", "response": response, "answer_gt": gt, "choice_a": "fire", "choice_b": "water",
            "choice_c": "air", "choice_d": "earth", "category": "perception", "sub-category": "semantics", **extra}


def test_mmsu_scoring_rules():
    lines = [(1, _mmsu("B")), (2, _mmsu("A")), (3, _mmsu("I cannot tell")), (4, _mmsu("")),
             (5, _mmsu("The answer is B.", category="reasoning")), (6, {"id": "y", "error": "missing audio"})]
    records, summary = score_lines(lines, "mmsu")
    assert [r.get("correct") for r in records] == [True, False, False, False, True, None]
    assert records[2]["wrong_format"] and not records[3]["wrong_format"]
    # wrong format leaves the total (official); an empty response counts as wrong (ours: the official reuses a
    # stale letter there); a failed prediction is recorded
    assert summary["acc"] == pytest.approx(100 * 2 / 4) and summary["wrong_format"] == 1
    assert summary["acc_wrong_format_wrong"] == pytest.approx(100 * 2 / 5) and summary["failed"] == 1
    assert "missing audio" in records[5]["error"]
    assert summary["acc_by_category"] == {"perception": pytest.approx(100 / 3), "reasoning": 100.0}


def test_mmau_scoring_skips_missing_output_and_groups(tmp_path):
    entries = [{"id": str(k), "audio_id": f"./a/{k}.wav", "question": "Who?", "choices": SOURCE, "answer": "Man",
                "task": task, "difficulty": "easy", "sub-category": "Source", "model_output": out}
               for k, (task, out) in enumerate([("sound", "a man"), ("speech", "woman"), ("speech", "Man"),
                                                ("music", None)])]
    del entries[3]["model_output"]  # no output: skipped by the official script, a recorded failure here
    path = tmp_path / "mmau-pred.json"
    path.write_text(json.dumps(entries))
    records, summary = score_file(path, "mmau")
    assert summary["acc"] == pytest.approx(200 / 3) and summary["scored"] == 3 and summary["failed"] == 1
    assert summary["acc_by_task"] == {"sound": 100.0, "speech": 50.0}


def test_readers_of_the_published_formats(tmp_path):
    mmau = tmp_path / "mmau" / "mmau-test-mini.json"
    mmau.parent.mkdir()
    mmau.write_text(json.dumps([{"id": "u1", "audio_id": "./test-mini-audios/u1.wav", "question": "Who?",
                                 "choices": SOURCE, "answer": "Man", "task": "sound", "difficulty": "hard"}]))
    [item] = read_published(mmau, "mmau")
    assert item["audio"] == str(mmau.parent / "test-mini-audios" / "u1.wav") and item["task"] == "sound"
    assert item["text"].endswith("(A)Man\n(B)Woman\n(C)Child\n(D)Robot")
    mmsu = tmp_path / "mmsu.jsonl"
    mmsu.write_text(json.dumps({"id": "s1", "audio_path": "wav/s1.wav", "question": "Q?", "choice_a": "x",
                                "choice_b": "y", "answer_gt": "y", "task_name": "t"}) + "\n")
    [item] = read_published(mmsu, "mmsu")
    assert item["choice_c"] is None and item["text"].endswith("(A)x\n(B)y")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "u1", "question": "Who?"}]))
    with pytest.raises(InputError, match="entry 1: no 'audio_id', 'choices', 'answer' field"):
        read_published(bad, "mmau")


def test_cli_scores_and_reports_bad_entries(tmp_path):
    preds = tmp_path / "mmsu-pred.jsonl"
    preds.write_text(json.dumps(_mmsu("B")) + "\n{broken\n" + json.dumps(_mmsu("C")) + "\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "eval", "mcq", str(preds), "--benchmark", "mmsu",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["acc"] == 50.0 and summary["failed"] == 1 and "entry 2" in run.stdout
    assert len((out / "records.jsonl").read_text().splitlines()) == 3
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "eval", "mcq", str(tmp_path / "none.json"),
                          "--benchmark", "mmau", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "no such file" in run.stderr and "Traceback" not in run.stderr
