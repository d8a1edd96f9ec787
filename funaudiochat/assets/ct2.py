"""Read a CTranslate2 `model.bin` (the weights of a converted model) with `struct` and numpy only.

The file is a little-endian container (ASSETS.md §5):
    header:   u32 binary version, string spec name, u32 spec revision, u32 variable count
    string:   u16 length (including a trailing NUL), then the bytes
    variable: name string, u8 rank, rank x u32 dims, u8 dtype, u32 byte count, raw data
    trailer:  u32 alias count, then (alias, target) string pairs

Half-precision weights are widened to float32; a checkpoint loader then sees ordinary fp32 arrays.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from funaudiochat.errors import CheckpointError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
SUPPORTED_VERSIONS = (6,)  # the version CTranslate2 4.x writes (the only one tested)


@dataclass
class CT2Model:
    spec: str                        # e.g. "WhisperSpec"
    revision: int
    variables: dict[str, np.ndarray]  # name -> array (float16 widened to float32)
    aliases: dict[str, str]          # alias -> name of the variable it shares

    def get(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise CheckpointError(f"CTranslate2 {self.spec} has no variable {name!r}")
        return self.variables[name]


class _Cursor:
    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = data, 0, source

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise CheckpointError(f"{self.source}: truncated CTranslate2 file (needed {size} bytes at {self.pos})")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = self.take(n)
        return raw[:-1].decode("utf-8")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CheckpointError(f"{self.source}: truncated CTranslate2 file (needed {n} bytes at {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def read_ct2(path: str | Path) -> CT2Model:
    """Read `model.bin` (or the `model.bin` inside a CTranslate2 model folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise CheckpointError(f"{path}: no CTranslate2 model.bin here")
    cur = _Cursor(path.read_bytes(), str(path))
    (version,) = cur.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{path}: CTranslate2 binary version {version} is not supported "
                              f"(supported: {SUPPORTED_VERSIONS})")
    spec = cur.string()
    (revision,) = cur.unpack("I")
    (count,) = cur.unpack("I")
    variables = {}
    for _ in range(count):
        name = cur.string()
        (rank,) = cur.unpack("B")
        dims = cur.unpack("I" * rank)
        (code,) = cur.unpack("B")
        (n_bytes,) = cur.unpack("I")
        if code not in _DTYPES:
            raise CheckpointError(f"{path}: variable {name!r} has unknown dtype code {code}")
        array = np.frombuffer(cur.take(n_bytes), dtype=_DTYPES[code]).reshape(dims)
        variables[name] = array.astype(np.float32) if array.dtype == np.float16 else array.copy()
    (n_alias,) = cur.unpack("I")
    aliases = dict((cur.string(), cur.string()) for _ in range(n_alias))
    return CT2Model(spec, revision, variables, aliases)
