"""Issue 11, the gaps found when auditing it (docs/errors.md): its classes of bad input at the entry points added
after it (`serve`, `eval run`, `eval voicebench`, `assets quantize`, bench/generate.py, the checkpoint / adapter /
eval-journal writers) and two of its cases that had no test (an infer answer whose files cannot be written; a full
disk under a writer that bypasses fileio). The same one-line errors as `infer` gives, before anything loads; on a
full disk one "no space left on DEVICE" line and nothing half-written."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from funaudiochat.errors import InputError, StorageError
from funaudiochat.eval.run import runner
from funaudiochat.fileio import atomic_path
from funaudiochat.model import lora
from funaudiochat.model.checkpoint import save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.serve import cli as serve_cli
from tests.helpers import error_line, fill, make_tiny_tokenizer, write_wav

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "funaudiochat.cli"]


def _model() -> FunAudioChatModel:
    torch.manual_seed(0)
    return FunAudioChatModel(tiny()).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(_model(), folder)
    make_tiny_tokenizer(folder)
    return folder


def run(*args, script=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, script, *map(str, args)] if script else CLI + list(map(str, args))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in done.stderr, done.stderr
    return done


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------- item 6 (devices) and runtime flags
def test_serve_eval_run_and_bench_check_the_device_before_loading(ckpt, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = error_line(run("serve", "--model", ckpt, "--port", port, "--device", "banana"), "funaudiochat serve")
    assert "--device 'banana' is not a device name; this machine has: cpu" in line
    out, suites_dir = tmp_path / "eval", tmp_path / "suites"
    line = error_line(run("eval", "run", "--model", ckpt, "--device", "banana", "--out", out, "--suites-dir",
                          suites_dir), "funaudiochat eval run")
    assert "--device 'banana' is not a device name" in line
    assert not out.exists() and not suites_dir.exists()  # refused before any suite was built or model loaded
    # bench/generate.py: an argparse error line (exit 2), before the config is read or a model built
    line = error_line(run("no-such-config.json", "--device", "banana", script="bench/generate.py"), "generate.py",
                      code=2)
    assert "--device 'banana' is not a device name" in line
    if torch.version.cuda is None:  # the README's device on the CPU build of torch
        line = error_line(run("serve", "--model", ckpt, "--port", port, "--device", "cuda"), "funaudiochat serve")
        assert "CPU-only build" in line and "pip install torch==" in line


@pytest.mark.parametrize("option, value, message", [
    ("--threads", "0", "--threads must be >= 1, got 0"),  # was silently ignored
    ("--threads", "-1", "--threads must be >= 1, got -1"),  # was torch's RuntimeError
    ("--max-seq-len", "0", "--max-seq-len must be >= 1, got 0"),  # was accepted: every request then failed
    ("--detokenizer", "/no/such/folder", "--detokenizer /no/such/folder: no such folder"),
    ("--conversation-cache-mb", "nan", "--conversation-cache-mb must be a finite number >= 0"),  # was int(nan)'s error
    ("--conversation-cache-mb", "inf", "--conversation-cache-mb must be a finite number >= 0"),
    ("--conversation-cache-mb", "-1", "--conversation-cache-mb must be a finite number >= 0"),
    ("--max-conversations", "-1", "--max-conversations >= 0"),
    ("--warm-up", "s2s,tts", "--warm-up: unknown kind"),
])
def test_serve_checks_the_runtime_flags_as_infer_does(tmp_path, option, value, message):
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    with pytest.raises(InputError, match=message):
        serve_cli.build_context(parser.parse_args(["--model", str(tmp_path / "none"), option, value]))


# --------------------------------------------------------------------------- item 5 (a latin-1 byte) in scored files
def test_eval_scoring_counts_a_latin1_line_as_one_failed_item(tmp_path):
    preds = tmp_path / "openbookqa.jsonl"
    preds.write_bytes(b'{"prompt": "q", "response": "The answer is B.", "reference": "B"}\n'
                      + '{"prompt": "q", "response": "caf\xe9", "reference": "A"}\n'.encode("latin-1"))
    done = run("eval", "voicebench", preds, "--subset", "openbookqa", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "line 2: not UTF-8 text (byte 0xe9 at column 33)" in done.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["items"], summary["scored"], summary["failed"], summary["acc"]) == (2, 1, 1, 100.0)


# --------------------------------------------------------------------------- item 7 (outputs checked before the work)
def test_eval_asr_refuses_a_folder_as_its_report_before_transcribing(tmp_path):
    write_wav(tmp_path / "a.wav", 0.5)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"path": "a.wav", "text": "hello"}\n', encoding="utf-8")
    (tmp_path / "report").mkdir()
    line = error_line(run("eval", "asr", manifest, "--out", tmp_path / "report"), "funaudiochat eval asr")
    assert f"--out {tmp_path / 'report'}: is a folder; name a file" in line


def test_merge_never_replaces_an_input_a_file_or_another_folder(ckpt, tmp_path):
    """`merge BASE STAGE1 OUT` replaced whatever OUT was, after the work: STAGE1 itself, or a file."""
    weights = (ckpt / "model.safetensors").read_bytes()
    line = error_line(run("merge", ckpt, ckpt, ckpt), "funaudiochat merge")
    assert f"OUT {ckpt} is BASE: writing there would replace an input" in line
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    line = error_line(run("merge", ckpt, ckpt, notes), "funaudiochat merge")
    assert "exists and is not an empty folder" in line
    assert notes.read_text() == "mine\n" and (ckpt / "model.safetensors").read_bytes() == weights
    with pytest.raises(StorageError, match="exists and is not a folder"):  # fileio's own guard, for every writer
        with atomic_path(notes, directory=True):
            pass
    assert notes.read_text() == "mine\n"


def test_eval_merge_tells_a_damaged_run_record_from_a_missing_one(tmp_path):
    (tmp_path / "run.json").write_text('{"model": "m", "suites": ')  # torn by an interrupt
    line = error_line(run("eval", "merge", tmp_path), "funaudiochat eval merge")
    assert f"{tmp_path / 'run.json'}: not a readable run record" in line and "no run.json" not in line


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path):
    """fileio makes the target's folder: a file in its place (or no permission) was a raw FileExistsError."""
    preds = tmp_path / "openbookqa.jsonl"
    preds.write_text('{"prompt": "q", "response": "B", "reference": "B"}\n', encoding="utf-8")
    (tmp_path / "out").write_text("not a folder\n")
    line = error_line(run("eval", "voicebench", preds, "--subset", "openbookqa", "--out", tmp_path / "out"),
                      "funaudiochat eval voicebench")
    assert f"cannot make the folder {tmp_path / 'out'} (File exists)" in line
    assert (tmp_path / "out").read_text() == "not a folder\n"


# --------------------------------------------------------------------------- item 9 (a full disk) at newer writers
def test_assets_quantize_on_a_full_disk_leaves_no_half_checkpoint(ckpt, small_disk):
    fill(small_disk, 64 * 1024)  # the int8 tiny model (~0.6 MB) does not fit
    out = small_disk / "int8"
    line = error_line(run("assets", "quantize", ckpt, out), "funaudiochat assets quantize")
    assert f"no space left on tmpfs mounted at {small_disk}" in line and f"({out}" in line, line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no OUT with a config.json and no weights


def test_infer_keeps_a_finished_answer_when_its_files_cannot_be_written(ckpt, small_disk):
    """Item 7's other half: the disk fills up between the check of --out and the write: the answer is on stdout,
    the one error line says so, and no temporary file is left."""
    out = small_disk / "answer"
    out.mkdir()  # an existing (empty) folder passes the check before generating
    fill(small_disk, 0)
    done = run("infer", "--model", ckpt, "--text", "w40 w41", "--mode", "s2t", "--max-new-tokens", "4", "--out", out)
    line = error_line(done, "funaudiochat infer")
    assert "no space left on tmpfs" in line and line.endswith("(the answer text is printed above)"), line
    assert len(done.stdout.split()) >= 1 and list(out.iterdir()) == []


def test_checkpoint_and_adapter_writers_on_a_full_disk(small_disk):
    """save_model (assets smollm2 / mini write through it) and LoRA factor files: one StorageError, no temporary."""
    fill(small_disk, 64 * 1024)
    with pytest.raises(StorageError, match=f"no space left on tmpfs mounted at {small_disk}"):
        save_model(_model(), small_disk / "model")
    with pytest.raises(StorageError, match="no space left on tmpfs"):
        lora.save({"x.lora_A": torch.zeros(256, 1024), "x.lora_B": torch.zeros(1024, 256)}, small_disk / "a.safetensors")
    assert temporaries(small_disk) == [] and not (small_disk / "model" / "model.safetensors").exists()


def test_eval_prediction_journal_on_a_full_disk(small_disk):
    fill(small_disk, 16 * 1024)
    path = small_disk / "predictions.jsonl"
    with pytest.raises(StorageError, match=f"no space left on tmpfs mounted at {small_disk} \\({path}\\)"):
        runner._append(path, {"id": "q1", "response": "x" * 200_000})


# a command module (add_arguments / main) that writes with plain open(), as no writer of the package should
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path)


def main(args: argparse.Namespace) -> int:
    with open(args.path, "wb") as f:
        f.write(b"\0" * (2 << 20))
    return 0


def test_a_full_disk_under_any_command_is_one_line(small_disk, monkeypatch, capsys):
    """The CLI's safety net for a writer that bypasses fileio: one error line naming the device, exit 1."""
    from funaudiochat import cli

    monkeypatch.setitem(cli.COMMANDS, "plain-writer", (__name__, "writes 2 MiB with open()"))
    target = small_disk / "big.bin"
    assert cli.main(["plain-writer", str(target)]) == 1
    err = capsys.readouterr().err  # a failed write() names no file: the line cannot either
    assert err == "funaudiochat plain-writer: error: no space left on the device; free some space and run it again\n"
