"""`eval run` on the MMAU / MMSU / judge-scored / speech sample suites and on an imported published MMAU file, with a
judge served over a real socket on 127.0.0.1 that, like `funaudiochat serve`, refuses n > 1 (the client then asks
n=1 three times) and answers one prompt unparseably (that item fails, recorded; the others are scored); then the
judge down: every judged item fails with the reason, the scoring still finishes. The same endpoint, asked to speak,
returns message.audio, which the S2S OpenAI adapter turns into a wav."""
from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys

from helpers import JsonEndpoint, make_tiny_checkpoint, write_wav

from funaudiochat.eval.run import runner
from funaudiochat.eval.run.adapters import OpenAIModel
from funaudiochat.eval.voicebench.judge import JudgeClient


class Judge(JsonEndpoint):
    """An OpenAI-compatible chat endpoint: n > 1 -> HTTP 400; rating prompts -> "4" (but an unparseable sentence
    when the question mentions sleep); QA prompts -> "Yes"."""

    def __init__(self, wav=None):
        self.bodies, self.wav = [], wav
        super().__init__(self.reply)

    def reply(self, path, body):
        self.bodies.append(body)
        prompt = body["messages"][-1]["content"]
        if "modalities" in body:  # a model asked to speak: message.audio as OpenAI sends it
            audio = {"id": "a1", "data": base64.b64encode(self.wav.read_bytes()).decode(), "transcript": "hello there"}
            return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "audio": audio}}]}
        if body.get("n", 1) > 1:
            return 400, {"error": {"message": "only n=1 is supported", "param": "n"}}
        text = "Yes" if "### Reference answer" in prompt else "I'd say it is pretty good" if "asleep" in prompt else "4"
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def _run(*args):
    return subprocess.run([sys.executable, "-m", "funaudiochat.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_new_suites_with_a_judge_and_an_imported_mmau_file(tmp_path):
    dataset = tmp_path / "mmau-data"
    entries = [{"id": f"u{k}", "audio_id": f"./test-mini-audios/u{k}.wav", "question": "Who speaks?",
                "choices": ["Man", "Woman", "Child", "Robot"], "answer": "Man", "task": "speech",
                "difficulty": "easy", "category": "Reasoning", "sub-category": "Speaker"} for k in range(2)]
    for k in range(2):
        write_wav(dataset / "test-mini-audios" / f"u{k}.wav", 0.5, seed=k)
    (dataset / "mmau-mini.json").write_text(json.dumps(entries))

    model = make_tiny_checkpoint(tmp_path / "tiny", "the answer is a b c man woman coffee")
    out, suites_dir = tmp_path / "out", tmp_path / "suites"
    names = ["sample-mmau", "sample-mmsu-bench", "sample-commoneval", "sample-sdqa", "sample-speech"]
    judge = Judge(wav=write_wav(tmp_path / "spoken.wav", 0.8, freq=220.0))
    try:
        spoken = OpenAIModel(judge.url, "m", speech=True).answer(dataset / "test-mini-audios" / "u0.wav", None, None)
        run = _run("run", "--model", model, "--suite", ",".join(names + [f"mmau:{dataset / 'mmau-mini.json'}"]),
                   "--limit", "2", "--max-new-tokens", "4", "--suites-dir", suites_dir, "--out", out,
                   "--judge-url", judge.url, "--judge-model", "judge-x", "--no-progress")
    finally:
        judge.close()
    assert judge.bodies[0]["modalities"] == ["text", "audio"] and spoken.text == "hello there"
    assert len(spoken.wav) == 12800 and spoken.rate == 16000  # the endpoint's wav (0.8 s at 16 kHz) came back
    judge.bodies.pop(0)
    assert run.returncode == 0, run.stderr
    summaries = {s["suite"]: s for s in json.loads((out / "summary.json").read_text())["suites"]}
    assert list(summaries) == names + ["mmau-mmau-mini"]
    assert all(s["items"] == 2 for s in summaries.values())

    # MMAU / MMSU: the published files were written and read back; the model was given the released instruction
    published = json.loads((suites_dir / "sample-mmau" / "mmau.json").read_text())
    assert published[0]["audio_id"] == "./wav/mmau_0.wav" and published[0]["answer"] in published[0]["choices"]
    assert (suites_dir / "sample-mmau" / "wav" / "mmau_1.wav").is_file()  # the beeps of a "sound" item
    assert summaries["sample-mmau"]["value"] is not None and "acc_by_task" in summaries["sample-mmau"]
    assert "wrong_format" in summaries["sample-mmsu-bench"]
    imported = [json.loads(x) for x in (suites_dir / "mmau-mmau-mini" / "items.jsonl").read_text().splitlines()]
    assert imported[0]["audio"] == str(dataset / "test-mini-audios" / "u0.wav")
    assert "Choose the correct option from the following options:\n(A)Man" in imported[0]["text"]

    # the judge: n=3 refused, then n=1 three times per item; the model's own answer is in the prompt
    asked = [b["n"] for b in judge.bodies]
    assert asked.count(3) == 1 and asked.count(1) == 3 * 4  # 2 commoneval + 2 sd-qa items, 3 samples each
    answers = {p["id"]: p["response"] for p in _lines(out / "sample-commoneval" / "predictions.jsonl")}
    assert any(f"### [Response]: {answers['commoneval_0']}\n" in b["messages"][1]["content"] for b in judge.bodies)
    commoneval = summaries["sample-commoneval"]
    assert commoneval["value"] == 4.0 and commoneval["failed"] == 1 and commoneval["ratings"] == 3
    failed = _lines(out / "sample-commoneval" / "records.jsonl")[1]
    assert "not a 1-5 rating" in failed["error"] and "pretty good" in failed["error"]
    assert summaries["sample-sdqa"]["value"] == 100.0 and summaries["sample-sdqa"]["judged"] == 2
    report = (out / "report.md").read_text()
    assert "| sample-commoneval | voicebench:commoneval | gpt | 4.00 / 5 (80.0 %) |" in report

    # an S2T model does not answer the speech suite: each item records why
    assert "sample-speech: skipped: its answers must be spoken (--mode s2s)" in run.stdout
    speech = _lines(out / "sample-speech" / "records.jsonl")
    assert all("must be spoken" in r["error"] for r in speech) and summaries["sample-speech"]["value"] is None

    # the judge down: each judged item fails with the reason, scoring finishes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = runner.score(suites_dir / "sample-sdqa", out / "sample-sdqa",
                        JudgeClient(f"http://127.0.0.1:{port}/v1", "j", retries=0))
    assert down["failed"] == 2 and down["value"] is None
    assert all("cannot reach the judge" in r["error"] for r in _lines(out / "sample-sdqa" / "records.jsonl"))


def test_bad_arguments(tmp_path):
    run = _run("run", "--model", tmp_path, "--suite", f"mmau:{tmp_path / 'none.json'}", "--out", tmp_path / "o")
    assert run.returncode == 1 and "no such file" in run.stderr and "Traceback" not in run.stderr
    run = _run("run", "--model", tmp_path, "--suite", "sample-sdqa", "--judge-url", "http://127.0.0.1:9/v1",
               "--out", tmp_path / "o")
    assert run.returncode == 1 and "--judge-url and --judge-model go together" in run.stderr
    model = make_tiny_checkpoint(tmp_path / "tiny")
    run = _run("run", "--model", model, "--suite", "sample-speech", "--mode", "s2s", "--out", tmp_path / "o")
    assert run.returncode == 1 and "--detokenizer" in run.stderr and "Traceback" not in run.stderr

