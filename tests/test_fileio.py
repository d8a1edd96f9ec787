"""funaudiochat.fileio: atomic writes (temp name, rename), nothing left behind on failure, one-line disk-full error."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from funaudiochat.errors import StorageError
from funaudiochat.fileio import atomic_path, write_bytes, write_text


def test_atomic_file_replaces_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_failure_inside_keeps_old_target_and_removes_temp(tmp_path):
    target = tmp_path / "out.bin"
    write_bytes(target, b"complete")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_directory_replaces_a_non_empty_folder(tmp_path):
    target = tmp_path / "ckpt"
    for content in ("one", "two"):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "weights").write_text(content)
    assert (target / "weights").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("writer", ["bytes", "soundfile", "safetensors"])
def test_disk_full_is_one_storage_error_and_nothing_is_left(small_disk, writer):
    """The three ways a full disk surfaces: OSError(ENOSPC), libsndfile's 'System error', SafetensorError."""
    target = small_disk / ("out.wav" if writer == "soundfile" else "out")
    with pytest.raises(StorageError) as info:
        if writer == "bytes":
            write_bytes(target, b"x" * (2 << 20))
        elif writer == "soundfile":
            with atomic_path(target) as tmp:
                sf.write(tmp, np.zeros(1_000_000, dtype=np.float32), 16000, format="WAV")
        else:
            with atomic_path(target, directory=True) as tmp:
                save_file({"w": torch.zeros(1_000_000)}, str(tmp / "model.safetensors"))
    msg = str(info.value)
    assert msg.startswith("no space left on tmpfs mounted at ") and str(target) in msg and "\n" not in msg
    assert list(small_disk.iterdir()) == []
