"""Shared test fixtures.

Tests that read the reference data in `../shared/` (golden outputs, bench configs) use `shared_dir`.
In a user's clone without `../shared` they skip with a reason; in CI (`CI=true`) a missing folder fails.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`-n 2`, README's test command) each worker is one process of two on two cores: one torch
# thread each, or four threads would fight over two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _find_shared() -> Path | None:
    env = os.environ.get("FUNAUDIOCHAT_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared", REPO / "shared"]:
        if (cand / "golden").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    found = _find_shared()
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("../shared (golden reference data) is missing, and CI=true forbids skipping")
        pytest.skip("../shared with the golden reference data is not present in this clone")
    return found


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models: extra threads only add overhead (and noise to timing-free but thread-sensitive sums)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory):
    """`funaudiochat assets smollm2 DIR` (SmolLM2 + Whisper tiny.en from pip packages), converted once per session."""
    from funaudiochat.cli import main as cli_main

    root = tmp_path_factory.getbasetemp() / "smollm2-mini"
    if not (root / "model.safetensors").exists():
        assert cli_main(["assets", "smollm2", str(root)]) == 0
    return root


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (a disk that fills up), unmounted afterwards. Needs root (CI runs as root); skips otherwise."""
    import subprocess

    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
