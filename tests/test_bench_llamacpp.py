"""bench/llamacpp.py without llama.cpp: its token agreement count, and its one-line errors (bad arguments, no
llama_cpp installed) before anything is loaded. The timing itself needs llama-cpp-python, which is not a dependency."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "llamacpp.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_llamacpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_counts_the_tokens_before_the_first_difference():
    agreement = load_bench().agreement
    assert agreement([5, 6, 7, 8], [5, 6, 7, 8]) == {"equal_prefix": 4, "of": 4, "identical": True}
    # later positions are not compared: a greedy run that departs once continues on another path
    assert agreement([5, 6, 9, 8], [5, 6, 7, 8]) == {"equal_prefix": 2, "of": 4, "identical": False}
    assert agreement([1, 6, 7, 8], [5, 6, 7, 8])["equal_prefix"] == 0
    assert agreement([5, 6], [5, 6, 7, 8]) == {"equal_prefix": 2, "of": 4, "identical": False}


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("option, value, message", [
    ("--threads", 0, "--threads must be >= 1, got 0"),
    ("--rounds", -1, "--rounds must be >= 1, got -1"),
    ("--new-tokens", 1, "--new-tokens must be >= 2"),
])
def test_bad_arguments_get_one_line(tmp_path, option, value, message):
    (tmp_path / "config.json").write_text("{}")
    done = run(tmp_path, option, value)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_a_folder_without_a_checkpoint_is_named(tmp_path):
    done = run(tmp_path / "none")
    assert done.returncode == 2 and "no config.json there" in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama_cpp is installed here")
def test_missing_llama_cpp_says_how_to_install(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    done = run(tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "llama-cpp-python==0.3.36" in done.stderr and "PYTHONPATH" in done.stderr
