"""One training loop, three ways: 1 process, 2 processes with FSDP2, 2 processes with DDP (torchrun, gloo on CPU).
Same global batch => same losses (within 1e-5 relative) and the same weights. Every run asserts how many processes
took part (each rank logs itself; every metrics row counts the processes of an all-reduce), so a silent fallback to
one process fails. A 2-process run killed with SIGKILL in the middle of a checkpoint save resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from helpers import synthetic_s2s, tiny_recipe, words

from funaudiochat.model.checkpoint import read_state_dict
from funaudiochat.text.tokenizer import AUDIO_TEMPLATE
from funaudiochat.train.data import assistant_token_string
from funaudiochat.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def mixed_data(folder: Path) -> Path:
    """Spoken questions plus typed ones: batches without user audio leave the audio encoder unused on a rank."""
    path = synthetic_s2s(folder, n=8)
    typed = [{"system": words([40]),
              "messages": [{"role": "user", "content": words([100 + i, 101])},
                           {"role": "assistant", "content": AUDIO_TEMPLATE}],
              "audio": [json.dumps({"path": "", "text": words([60 + i, 61]),
                                    "token": assistant_token_string([i, i + 1, 5, 6, 7, 8])})]} for i in range(8)]
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in typed)
    return path


def assert_processes(run_dir: Path, stderr: str, n: int, strategy: str) -> None:
    """`n` processes ran: each logged its rank, and every step's all-reduce counted `n` processes."""
    mode = strategy if n > 1 else "no torchrun"
    for rank in range(n):
        assert f"process {rank} of {n} ({mode})" in stderr, stderr[-3000:]
    assert f"process {n} of" not in stderr
    rows = read_metrics(run_dir)
    assert rows and all(r["processes"] == n for r in rows), rows


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc): torchrun starts each worker in a session of its own, so a
    process-group kill would miss them."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return tree


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def torchrun(procs: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
            "-m", "funaudiochat.cli", "train"]


def test_fsdp2_and_ddp_match_one_process(tmp_path):
    data = mixed_data(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, strategy, procs in (("one", "fsdp", 1), ("fsdp", "fsdp", 2), ("ddp", "ddp", 2)):
        recipe = tiny_recipe(tmp_path, data, dist={"strategy": strategy},
                             train={"steps": 5, "global_batch": 4, "micro_batch": 2,
                                    "activation_checkpointing": name == "fsdp"})
        recipe["run_dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        launch = [sys.executable] if procs == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        done = subprocess.run(launch + ["-m", "funaudiochat.cli", "train", str(path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name)]
        assert_processes(tmp_path / name, done.stderr, procs, strategy)

    assert len(runs["one"]) == 5 and runs["one"][-1] < runs["one"][0]
    for name in ("fsdp", "ddp"):
        assert torch.allclose(torch.tensor(runs[name]), torch.tensor(runs["one"]), rtol=1e-5, atol=0), (name, runs)
        ref, got = read_state_dict(tmp_path / "one/final"), read_state_dict(tmp_path / name / "final")
        assert ref.keys() == got.keys()
        assert all(torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-5) for k in ref), name


def test_torchrun_killed_during_a_checkpoint_save_resumes_exactly(tmp_path):
    """2 processes (FSDP2): SIGKILL to torchrun and both workers while rank 0 is inside the save of step-4 (every
    file written, the folder not yet renamed), then `--resume` with 2 processes: step-2 is used, the half-written
    step-4 is removed, and the run ends with the uninterrupted run's losses and weights, bit for bit."""
    data = mixed_data(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def recipe(name: str) -> Path:
        r = tiny_recipe(tmp_path, data, dist={"strategy": "fsdp"}, checkpoint={"every": 2},
                        train={"steps": 6, "global_batch": 4, "micro_batch": 2, "deterministic": True})
        r["run_dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        return path

    whole = subprocess.Popen(torchrun() + [str(recipe("whole"))], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "inside-save"
    killed = subprocess.Popen(torchrun() + [str(recipe("killed"))], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL,
                              env={**env, "FUNAUDIOCHAT_PAUSE_IN_SAVE": str(marker),
                                   "FUNAUDIOCHAT_PAUSE_AT_STEP": "4", "FUNAUDIOCHAT_PAUSE_SECONDS": "120"})
    deadline = time.time() + 400
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached the save of step 4"
    tree = process_tree(killed.pid)
    assert len(tree) >= 3, tree  # torchrun and its two workers
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    killed.wait()
    deadline = time.time() + 30
    while any(alive(p) for p in tree) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in tree), "a worker survived SIGKILL"
    ckpts = tmp_path / "killed/checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert "step-2" in names and "step-4" not in names, names
    assert any(n.startswith(".step-4.tmp-") for n in names), names  # the killed save's half-written folder

    resumed = subprocess.run(torchrun() + [str(recipe("killed")), "--resume"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-2 (step 2 of 6)" in resumed.stderr
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    assert_processes(tmp_path / "killed", resumed.stderr, 2, "fsdp")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-4", "step-6"]  # leftovers gone, keep_last 2

    ref, got = read_state_dict(tmp_path / "whole/final"), read_state_dict(tmp_path / "killed/final")
    assert ref.keys() == got.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert [r["loss"] for r in read_metrics(tmp_path / "killed")] == [r["loss"] for r in read_metrics(tmp_path / "whole")]
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == list(range(1, 7))
