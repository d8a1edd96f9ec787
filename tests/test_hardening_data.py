"""Issue 11: bad input to the data, training, merge, plot, eval and check commands gets one clear line (never a
traceback), nothing half-written is left, and nothing passes silently. Every case runs the real `funaudiochat`
command in a subprocess.

    2  check-reference on a training run / on a golden folder without cases      -> exit 1, says what was expected
    3  data synth with an unknown or non-English espeak voice                      -> exit 1, lists the voices
    5  a latin-1 byte in a JSONL (train, data prepare, data synth, eval asr, distill) -> the line number; skip mode
                                                                                    skips only that line
    8  train with out-of-range recipe values                                       -> every field and its range,
                                                                                    before the model loads
    9  a full disk under plot, merge, data synth, train checkpoints                -> "no space left on DEVICE
                                                                                    (PATH)", no temporary left
    12 merge with a bad STAGE1 names STAGE1 (not OUT.tmp); `train R --resume k=v` works
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import error_line as cli_error_line
from helpers import fill, make_tiny_tokenizer, synthetic_s2s, tiny_recipe

REPO = Path(__file__).resolve().parents[1]
LATIN1 = '{"text": "caf\xe9 au lait"}'.encode("latin-1")  # one byte (0xe9) that is not UTF-8


def cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", *map(str, args)], capture_output=True,
                         text=True, cwd=cwd, env=env, timeout=600)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def error_line(run: subprocess.CompletedProcess, command: str) -> str:
    """The run failed with exactly one `funaudiochat COMMAND: error: ...` line; returns that line."""
    return cli_error_line(run, f"funaudiochat {command}")


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files a failed write may have left (fileio temp names, .tmp, .partial)."""
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name or ".partial" in p.name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real tiny training run (2 steps) started as `train RECIPE --resume OVERRIDES` (item 12), on data with one
    latin-1 line (item 5: under data.on_error=skip only that line is skipped)."""
    tmp = tmp_path_factory.mktemp("run")
    data = synthetic_s2s(tmp / "data", n=4)
    with open(data, "ab") as f:
        f.write(LATIN1 + b"\n")
    recipe = tiny_recipe(tmp, data, checkpoint={"every": 1})
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = cli("train", tmp / "recipe.yaml", "--resume", "train.steps=2", f"run_dir={tmp / 'run'}")
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "run"


# ----------------------------------------------------------------------------------------------- item 12, item 5

def test_train_resume_flag_before_overrides_and_a_latin1_line_is_skipped_alone(run_dir):
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["steps"] == 2
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["read"] == 5 and report["kept"] == 4
    (problem,) = report["problems"]
    assert problem["source"].endswith("train.jsonl:5") and problem["kind"] == "not utf-8"
    assert "byte 0xe9" in problem["message"]


def test_train_on_error_reject_names_the_latin1_line(run_dir, tmp_path):
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["run_dir"] = str(tmp_path / "rejected")
    recipe["data"]["on_error"] = "reject"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    line = error_line(cli("train", tmp_path / "r.yaml"), "train")
    assert "train.jsonl:5: not UTF-8 text (byte 0xe9 at column 14)" in line


# ------------------------------------------------------------------------------------------------------- item 5

def test_data_prepare_latin1_line_skip_and_reject(tmp_path):
    tok = tmp_path / "tok.json"
    make_tiny_tokenizer(tok)
    good = json.dumps({"turns": [{"role": "user", "text": "w70"},
                                 {"role": "assistant", "text": "w71", "speech_tokens": [5, 6, 7]}]}).encode()
    src = tmp_path / "in.jsonl"
    src.write_bytes(good + b"\n" + LATIN1 + b"\n" + good + b"\n")
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    args = ["data", "prepare", src, out, "--tokenizer", tok, "--report", report, "--no-progress"]
    run = cli(*args, "--on-error", "skip")
    assert run.returncode == 0, run.stderr
    assert len(out.read_text().splitlines()) == 2
    (problem,) = json.loads(report.read_text())["problems"]
    assert problem["source"] == f"{src}:2" and problem["kind"] == "not utf-8"
    out.unlink()
    line = error_line(cli(*args, "--on-error", "reject"), "data prepare")
    assert f"{src}:2: not UTF-8 text (byte 0xe9" in line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_data_synth_latin1_line(tmp_path, suffix):
    src = tmp_path / f"in{suffix}"
    first = b'{"text": "Hello."}' if suffix == ".jsonl" else b"Hello."
    src.write_bytes(first + b"\n" + LATIN1 + b"\n")
    line = error_line(cli("data", "synth", src, "--out-dir", tmp_path / "wavs", "--voice", "espeak:en-us",
                          "--no-progress"), "data synth")
    assert f"{src}:2: not UTF-8 text (byte 0xe9" in line
    assert not list((tmp_path / "wavs").glob("*.wav")) if (tmp_path / "wavs").exists() else True


def test_eval_asr_manifest_latin1_line(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(b'{"path": "a.wav", "text": "hi"}\n' + LATIN1 + b"\n")
    line = error_line(cli("eval", "asr", manifest), "eval asr")
    assert f"{manifest}:2: not UTF-8 text (byte 0xe9" in line


def test_data_distill_prompt_file_latin1_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "Hi?"}\n\n' + '{"prompt": "caf\xe9?"}'.encode("latin-1") + b"\n")
    line = error_line(cli("data", "distill", prompts, "--out", tmp_path / "out.jsonl"), "data distill")
    assert f"{prompts}:3: not UTF-8 text (byte 0xe9" in line


# ------------------------------------------------------------------------------------------------------- item 3

def test_data_synth_unknown_voice_lists_the_voices_and_synthesises_nothing(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("Hello there.\n", encoding="utf-8")
    out = tmp_path / "wavs"
    line = error_line(cli("data", "synth", lines, "--out-dir", out, "--voice", "espeak:klingon"), "data synth")
    assert "espeak-ng voice 'klingon' speaks piqd, not English" in line
    assert "English espeak voices: en, " in line and "en-us" in line
    line = error_line(cli("data", "synth", lines, "--out-dir", out, "--voice", "espeak:en-us+zz"), "data synth")
    assert "unknown espeak-ng variant 'zz'; variants: " in line and "f3" in line
    # a bad voice on line 2 stops the run before line 1 is synthesised
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_text('{"text": "One."}\n{"text": "Two.", "voice": "espeak:klingon"}\n', encoding="utf-8")
    line = error_line(cli("data", "synth", jsonl, "--out-dir", out, "--voice", "espeak:en-us"), "data synth")
    assert f"{jsonl}:2" in line and "klingon" in line
    assert not out.exists() or not list(out.iterdir())


# ------------------------------------------------------------------------------------------------------- item 8

def test_train_out_of_range_values_name_field_and_range_before_loading(tmp_path):
    data = synthetic_s2s(tmp_path / "data", n=2)
    recipe = tiny_recipe(tmp_path, data)
    recipe["run_dir"] = str(tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = cli("train", tmp_path / "r.yaml", "optim.lr=-1", "optim.betas=[0.9, 1.5]", "train.seed=-3",
              "optim.min_lr=.nan", "dpo.beta=0", "data.max_len=0", "train.global_batch=3", "model.preset=huge")
    error_line(run, "train")  # "invalid recipe:", then one indented line per problem
    for expected in ("optim.lr: must be a finite number in (0, inf), got -1.0",
                     "optim.betas[1]: must be a finite number in [0, 1), got 1.5",
                     "train.seed: must be a finite number in [0, 4.29497e+09), got -3",
                     "optim.min_lr: must be a finite number in [0, inf), got nan",
                     "dpo.beta: must be a finite number in (0, inf), got 0.0",
                     "data.max_len: must be a finite number in [1, inf), got 0",
                     "train.global_batch: must be a multiple of train.micro_batch (2), got 3",
                     "model.preset: unknown preset 'huge' (known: fun_audio_chat_8b, tiny)"):
        assert expected in run.stderr, run.stderr
    assert not (tmp_path / "run").exists()  # nothing was set up
    run = cli("train", tmp_path / "r.yaml", f"data.train={tmp_path / 'nope.jsonl'}")
    assert f"data.train[0]: {tmp_path / 'nope.jsonl'}: no such file" in run.stderr and run.returncode == 1
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------- item 2

def test_check_reference_refuses_a_training_run_and_a_folder_without_cases(run_dir, tmp_path):
    line = error_line(cli("check-reference", run_dir), "check-reference")
    assert f"{run_dir} is a training run folder (checkpoints/step-N), not a golden reference directory" in line
    assert "a golden directory holds model/config.json with golden.json and case folders" in line
    golden = tmp_path / "golden"
    (golden / "model").mkdir(parents=True)
    for f in (run_dir / "final").iterdir():
        (golden / "model" / f.name).write_bytes(f.read_bytes())
    (golden / "golden.json").write_text("{}")
    run = cli("check-reference", golden)
    assert run.returncode == 1 and "no cases found" in run.stdout and "all cases pass" not in run.stdout
    (golden / "golden.json").write_text("{not json")  # an unreadable golden folder is a failure, not a traceback
    run = cli("check-reference", golden)
    assert run.returncode == 1 and f"FAIL {golden}: cannot replay it (JSONDecodeError" in run.stdout


# ------------------------------------------------------------------------------------------------------ item 12

def test_merge_with_a_bad_stage1_names_it_and_leaves_nothing(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    for f in (run_dir / "final").iterdir():
        (stage1 / f.name).write_bytes(f.read_bytes())
    state = load_file(str(stage1 / "model.safetensors"))
    del state["audio_tower.output_matching.weight"]
    save_file(state, str(stage1 / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "merged"
    line = error_line(cli("merge", run_dir / "final", stage1, out), "merge")
    assert f"{stage1} (STAGE1, with its config.json) does not fit the model" in line
    assert "audio_tower.output_matching.weight" in line and ".tmp" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1"]


# ------------------------------------------------------------------------------------------------------- item 9

def no_space(line: str, path: Path, disk: Path) -> None:
    assert f"no space left on tmpfs mounted at {disk}" in line and f"({path}" in line, line


def test_disk_full_plot(run_dir, small_disk):
    fill(small_disk, 8 * 1024)
    out = small_disk / "loss.png"
    no_space(error_line(cli("plot", run_dir, "--out", out), "plot"), out, small_disk)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_disk_full_merge(run_dir, small_disk):
    fill(small_disk, 64 * 1024)
    out = small_disk / "merged"
    no_space(error_line(cli("merge", run_dir / "final", run_dir / "final", out), "merge"), out, small_disk)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_disk_full_data_synth(small_disk, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("This sentence is long enough to need more space than the disk has left.\nSecond.\n")
    fill(small_disk, 16 * 1024)
    out = small_disk / "wavs"
    run = cli("data", "synth", lines, "--out-dir", out, "--voice", "espeak:en-us", "--no-progress")
    no_space(error_line(run, "data synth"), out / "utt000001.wav", small_disk)
    assert list(out.iterdir()) == []  # no wav, no temporary, no journal


def test_disk_full_train_checkpoint(run_dir, small_disk, tmp_path):
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["run_dir"] = str(small_disk / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = cli("train", tmp_path / "r.yaml")  # the tiny model's checkpoint (~3 MB) does not fit in 1 MiB
    no_space(error_line(run, "train"), small_disk / "run/checkpoints/step-1", small_disk)
    assert leftovers(small_disk) == [] and not (small_disk / "run/checkpoints/step-1").exists()
