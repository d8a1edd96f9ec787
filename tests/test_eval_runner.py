"""`eval run` / `eval merge` end to end on a tiny random checkpoint: sample suites spoken with our synthesis,
resume after an interrupt without redoing work, shards + merge give the one-run summary, report with a chart."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import make_tiny_checkpoint

from funaudiochat.eval.run import runner, suites
from funaudiochat.eval.run.adapters import LocalModel

SUITES = "sample-mmsu,sample-bfcl,sample-asr"


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "funaudiochat.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_end_to_end_with_report(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "tiny", "the answer is a b c get_weather Paris")
    out = tmp_path / "out"
    run = _run("run", "--model", model, "--suites-dir", tmp_path / "suites", "--max-new-tokens", "6", "--no-progress",
               "--suite", SUITES, "--limit", "2", "--out", out)
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [s["suite"] for s in summary["suites"]] == SUITES.split(",")
    assert all(s["value"] is not None and s["items"] == 2 for s in summary["suites"])
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sample-bfcl | speechfc:bfcl:multiple | accuracy |" in (out / "report.md").read_text()
    records = _lines(out / "sample-bfcl" / "records.jsonl")
    assert len(records) == 2 and all(r["error_type"] for r in records)


class CountingModel:
    """Wraps the local engine and counts the items it answers."""

    def __init__(self, model_dir):
        self.inner, self.asked = LocalModel(model_dir, max_new_tokens=6), []
        self.label = "tiny"

    def answer(self, audio, text, tools):
        self.asked.append(audio.name)
        return self.inner.answer(audio, text, tools)


def test_resume_missing_audio_and_shards(tmp_path):
    model = CountingModel(make_tiny_checkpoint(tmp_path / "tiny", "the answer is a b c"))
    suite = suites.build("sample-mmsu", tmp_path / "suites", limit=4)
    one = tmp_path / "one"
    assert runner.predict(suite, model, one, progress=False) == 4
    preds = one / "predictions.jsonl"
    # an interrupt in the middle of writing the last line: that item alone is redone
    text = preds.read_text()
    preds.write_text(text[: text.rindex("{") + 5])
    assert runner.predict(suite, model, one, progress=False) == 1 and model.asked[-1] == "mmsu_3.wav"
    assert runner.predict(suite, model, one, progress=False) == 0 and len(model.asked) == 5
    single = runner.score(suite, one)

    shards = tmp_path / "shards"
    (suite / "wav" / "mmsu_2.wav").unlink()  # missing audio: a recorded failure, the others go on
    for index in range(2):
        runner.predict(suite, model, shards, shard=(index, 2), progress=False)
    assert "missing audio" in _lines(shards / "predictions.shard-0-of-2.jsonl")[1]["error"]
    runner.merge(shards)
    merged = runner.score(suite, shards)
    assert merged["failed"] == 1 and merged["scored"] == 3
    suites.build("sample-mmsu", tmp_path / "suites", limit=4)  # rebuilds the missing wav only
    runner.predict(suite, model, shards, shard=(0, 2), progress=False)
    assert runner.predict(suite, model, shards, shard=(0, 2), progress=False) == 0
    runner.merge(shards)
    merged = runner.score(suite, shards)
    keep = ("acc", "acc_unread_wrong", "unread", "items", "scored", "failed", "value")
    assert {k: merged[k] for k in keep} == {k: single[k] for k in keep}


def test_bad_input(tmp_path):
    run = _run("run", "--model", tmp_path / "nope", "--suite", "sample-mmsu", "--out", tmp_path / "o")
    assert run.returncode == 1 and "not a checkpoint folder" in run.stderr and "Traceback" not in run.stderr
    run = _run("run", "--model", tmp_path, "--suite", "sample-nothing", "--out", tmp_path / "o")
    assert run.returncode == 1 and "unknown suite 'sample-nothing'" in run.stderr
    run = _run("run", "--model", tmp_path, "--shard", "2/2", "--out", tmp_path / "o")
    assert run.returncode == 1 and "--shard" in run.stderr
    run = _run("merge", tmp_path / "o2")
    assert run.returncode == 1 and "run.json" in run.stderr
