"""One training loop, three ways: 1 process, 2 processes with FSDP2, 2 processes with DDP (torchrun, gloo on CPU).
Same global batch => same losses (within 1e-5 relative) and the same weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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

    assert len(runs["one"]) == 5 and runs["one"][-1] < runs["one"][0]
    for name in ("fsdp", "ddp"):
        assert torch.allclose(torch.tensor(runs[name]), torch.tensor(runs["one"]), rtol=1e-5, atol=0), (name, runs)
        ref, got = read_state_dict(tmp_path / "one/final"), read_state_dict(tmp_path / name / "final")
        assert ref.keys() == got.keys()
        assert all(torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-5) for k in ref), name
