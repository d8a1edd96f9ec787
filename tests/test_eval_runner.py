"""`eval run` / `eval merge` end to end on a tiny random checkpoint: sample suites spoken with our synthesis,
resume after an interrupt without redoing work, shards + merge give the one-run summary, report with a chart."""
from __future__ import annotations

import base64
import http.server
import json
import socket
import subprocess
import sys
import threading

from helpers import make_tiny_checkpoint, write_wav

from funaudiochat.eval.run import runner, suites
from funaudiochat.eval.run.adapters import LocalModel, OpenAIModel
from funaudiochat.eval.speechfc.common import parse_tool_calls

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

    def answer_batch(self, requests):
        self.asked += [audio.name for audio, _, _ in requests]
        self.batches = getattr(self, "batches", 0) + 1
        return self.inner.answer_batch(requests)


def test_resume_missing_audio_and_shards(tmp_path):
    model = CountingModel(make_tiny_checkpoint(tmp_path / "tiny", "the answer is a b c"))
    suite = suites.build("sample-mmsu", tmp_path / "suites", limit=4)
    one = tmp_path / "one"
    assert runner.predict(suite, model, one, progress=False, batch_size=3) == 4
    batched = {line["id"]: line["response"] for line in _lines(one / "predictions.jsonl")}
    alone = {item["id"]: model.inner.answer(suite / item["audio"], item.get("text"), None)
             for item in suites.read_items(suite)}
    assert batched == alone and model.batches == 1  # a batched row answers as the item alone does (3 + 1 alone)
    model.asked.clear()
    preds = one / "predictions.jsonl"
    # an interrupt in the middle of writing the last line: that item alone is redone
    text = preds.read_text()
    preds.write_text(text[: text.rindex("{") + 5])
    assert runner.predict(suite, model, one, progress=False) == 1 and model.asked == ["mmsu_3.wav"]
    assert runner.predict(suite, model, one, progress=False) == 0 and len(model.asked) == 1
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


def test_openai_adapter_audio_in_tool_calls_out(tmp_path):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            message = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]}
            reply = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    wav = write_wav(tmp_path / "q.wav", 0.5)
    try:
        text = OpenAIModel(f"http://127.0.0.1:{server.server_address[1]}/v1", "m").answer(wav, "hi", [{"type": "x"}])
    finally:
        server.shutdown()
        server.server_close()
    part = seen[0]["messages"][0]["content"][0]
    assert part["type"] == "input_audio" and base64.b64decode(part["input_audio"]["data"]) == wav.read_bytes()
    assert seen[0]["messages"][0]["content"][1] == {"type": "text", "text": "hi"} and seen[0]["tools"] == [{"type": "x"}]
    assert parse_tool_calls(text) == [{"get_weather": {"city": "Paris"}}]

    with socket.socket() as s:  # nothing listens here: each item's failure is recorded, the run goes on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    suite = tmp_path / "suite"
    (suite / "wav").mkdir(parents=True)
    write_wav(suite / "wav" / "a.wav", 0.5)
    (suite / "items.jsonl").write_text(json.dumps({"id": "a", "audio": "wav/a.wav"}) + "\n" +
                                       json.dumps({"id": "b", "audio": "wav/b.wav"}) + "\n")
    runner.predict(suite, OpenAIModel(f"http://127.0.0.1:{port}/v1", "m", timeout=5), tmp_path / "o", progress=False)
    errors = [line["error"] for line in _lines(tmp_path / "o" / "predictions.jsonl")]
    assert "cannot reach" in errors[0] and "missing audio" in errors[1]
