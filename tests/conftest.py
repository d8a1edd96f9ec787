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
