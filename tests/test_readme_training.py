"""The README's training walk-through, run as written: its commands are read from README.md's "### Training" block
(so the README cannot drift from what is tested) and run one by one through the real `funaudiochat` command in a
temporary folder, on a tiny random checkpoint standing in for `checkpoints/mini-base`.

What differs from a user's run, and only this: `source .venv/bin/activate` is replaced by a `funaudiochat` on the
PATH that runs this Python, `recipes/` is a link to the repository's, and `checkpoints/mini-base` is a tiny random
model (tests/helpers.py) whose word-level vocabulary holds the walk-through's words, so that its texts are not
unknown tokens. The recipes and every other command line run unchanged.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_checkpoint

from funaudiochat.model.checkpoint import load_model, read_state_dict
from funaudiochat.train.config import load_recipe
from funaudiochat.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")
STAGES = ("pre_align", "core_cocktail_stage1", "core_cocktail_stage2", "dpo")


def training_block(readme: str) -> str:
    """The first ```bash block after the '### Training' heading of the README."""
    head = readme.find("\n### Training\n")
    assert head >= 0, "README.md has no '### Training' section"
    match = re.search(r"```bash\n(.*?)```", readme[head:], re.S)
    assert match, "the Training section of README.md has no ```bash block"
    return match.group(1)


def split_commands(block: str) -> list[str]:
    """Shell commands of a block, one per line, a here-document kept with its command."""
    commands, lines = [], iter(block.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        command = [line]
        heredoc = HEREDOC.search(line)
        if heredoc:
            for body in lines:
                command.append(body)
                if body.strip() == heredoc.group(1):
                    break
            else:
                raise AssertionError(f"here-document {heredoc.group(1)} is not closed: {line}")
        commands.append("\n".join(command))
    return commands


def fake_venv(root: Path) -> dict:
    """An environment whose PATH finds `funaudiochat` (this Python, this checkout)."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "funaudiochat"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m funaudiochat.cli "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


def test_block_parser_keeps_heredocs_with_their_command():
    block = "# a comment\nsource x\ncat > f <<'EOF'\n{\"a\": 1}\n# not a comment\nEOF\nfunaudiochat train r.yaml\n"
    assert split_commands(block) == ["source x", "cat > f <<'EOF'\n{\"a\": 1}\n# not a comment\nEOF",
                                     "funaudiochat train r.yaml"]
    with pytest.raises(AssertionError, match="not closed"):
        split_commands("cat > f <<'EOF'\nline\n")


def test_every_recipe_input_is_made_by_a_recipe_or_named_in_the_readme():
    """A recipe's starting checkpoint and data files are another recipe's output (RUN_DIR/final) or appear in
    README.md (a command that writes them, or a file the user provides)."""
    recipes = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "tiny").glob("*.yaml"))
    assert len(recipes) >= 9
    loaded = [load_recipe(path) for path in recipes]
    made = {f"{r.run_dir}/final" for r in loaded}
    readme = (REPO / "README.md").read_text()
    for path, r in zip(recipes, loaded):
        for needed in [r.model.checkpoint, *r.data.train]:
            named = re.search(rf"(?<![\w./-]){re.escape(needed)}(?![\w/-]|\.\w)", readme)
            assert needed in made or named, f"{path.relative_to(REPO)}: nothing makes {needed}"


def test_readme_training_walkthrough_runs_as_written(tmp_path):
    block = training_block((REPO / "README.md").read_text())
    commands = split_commands(block)
    assert commands[0].split("#")[0].split() == ["source", ".venv/bin/activate"], commands[0]
    work = tmp_path / "clone"
    work.mkdir()
    (work / "recipes").symlink_to(REPO / "recipes")
    make_tiny_checkpoint(work / "checkpoints" / "mini-base", vocabulary_text=block)
    env = fake_venv(tmp_path)

    outputs = {}
    for command in commands[1:]:
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=work, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, f"{command}\nstdout: {run.stdout}\nstderr: {run.stderr}"
        assert "Traceback" not in run.stderr, run.stderr
        outputs[command] = run.stdout

    # data: every synthesised question and every raw record made it through `data prepare`
    wavs = sorted((work / "data/tiny/wavs").glob("*.wav"))
    assert len(wavs) == 8
    for name, n in (("sft", 8), ("dpo", 4)):
        raw = (work / f"data/tiny/raw_{name}.jsonl").read_text().splitlines()
        prepared = (work / f"data/tiny/{name}.jsonl").read_text().splitlines()
        assert len(raw) == len(prepared) == n, (name, len(raw), len(prepared))
    assert all("chosen" in json.loads(line) for line in (work / "data/tiny/dpo.jsonl").read_text().splitlines())

    # each stage wrote its checkpoint and metrics, and its loss went down
    runs = work / "runs" / "tiny"
    for stage in STAGES:
        assert (runs / stage / "final" / "config.json").is_file(), stage
        assert (runs / stage / "final" / "tokenizer.json").is_file(), stage
        curve = losses(runs / stage)
        assert len(curve) >= 4 and curve[-1] < curve[0], (stage, curve)
    dpo = read_metrics(runs / "dpo")
    assert dpo[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert dpo[-1]["reward_margin"] > 0 and dpo[-1]["reward_accuracy"] > 0.5, dpo[-1]
    assert (runs / "dpo" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # pre-alignment kept the LLM frozen; the merge is the alpha-interpolation of the LLM, the rest from stage 1
    base = read_state_dict(work / "checkpoints" / "mini-base")
    pre, s1 = read_state_dict(runs / "pre_align" / "final"), read_state_dict(runs / "core_cocktail_stage1" / "final")
    merged = read_state_dict(runs / "core_cocktail_merged")
    llm = [k for k in pre if k.startswith("language_model.")]
    assert llm and all(torch.equal(pre[k], base[k]) for k in llm)
    assert any(not torch.equal(pre[k], base[k]) for k in pre if k.startswith("audio_tower."))
    assert merged.keys() == s1.keys()
    for k in merged:
        expect = 0.5 * s1[k] + 0.5 * pre[k] if k.startswith("language_model.") else s1[k]
        torch.testing.assert_close(merged[k], expect, rtol=0, atol=1e-7, msg=k)
    assert any(not torch.equal(s1[k], pre[k]) for k in llm)  # stage 1 trained the LLM, so the merge is not trivial

    # the final checkpoint loads and answers the spoken question
    answer = (work / "runs" / "tiny" / "answer" / "answer.txt").read_text().strip()
    assert answer and answer in outputs[commands[-1]], (answer, outputs[commands[-1]])
    load_model(runs / "dpo" / "final")
