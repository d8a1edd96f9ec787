"""Read a GGUF file (llama.cpp's model format): metadata and tensors, dequantized to float32.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count; metadata as
(string key, u32 value type, value); tensor infos as (string name, u32 n_dims, n_dims x u64 dims, u32 ggml type,
u64 offset); then the tensor data, aligned to `general.alignment` (default 32). Strings are u64 length + UTF-8.

The gguf package's own `GGUFReader` builds one object per array element (about 100k for a tokenizer vocabulary)
and takes seconds; this reader parses the metadata in one pass and leaves the tensor bytes memory-mapped.
Dequantization is `gguf.quants.dequantize`. GGUF dims run fastest-first, so a tensor of dims (576, 49152) is a
numpy / torch array of shape [49152, 576].
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from funaudiochat.errors import CheckpointError

_MAGIC = b"GGUF"
# value type -> struct format of scalars (8 string, 9 array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    ggml_type: int          # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # numpy order (slowest first)
    raw: np.ndarray         # the stored bytes, uint8, memory-mapped

    def dequantize(self) -> np.ndarray:
        """float32 array of `shape`."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(self.ggml_type)
        rows = self.raw.reshape(int(np.prod(self.shape[:-1], dtype=np.int64)), -1)
        out = np.asarray(dequantize(rows, qtype), dtype=np.float32).reshape(self.shape)
        return out if out.flags.writeable else out.copy()  # F32 tensors are views of the read-only map


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, GGUFTensor]

    def meta(self, key: str):
        """A required metadata value."""
        if key not in self.metadata:
            raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}")
        return self.metadata[key]


class _Reader:
    def __init__(self, buf: memoryview, source: Path):
        self.buf, self.pos, self.source = buf, 0, source

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.source}: truncated GGUF file (needed {n} bytes at {self.pos})")

    def scalar(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        self.need(size)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.scalar("Q")
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALARS and item_type != 7:  # numbers: one numpy read
                dtype = np.dtype("<" + _SCALARS[item_type])
                self.need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            return [self.value(item_type) for _ in range(count)]
        raise CheckpointError(f"{self.source}: unknown GGUF value type {vtype} at byte {self.pos}")


def read_gguf(path: str | Path) -> GGUFFile:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(data)
    if bytes(buf[:4]) != _MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
    r = _Reader(buf, path)
    r.pos = 4
    version = r.scalar("I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_meta = r.scalar("Q"), r.scalar("Q")
    metadata = {}
    for _ in range(n_meta):
        key = r.string()
        metadata[key] = r.value(r.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.scalar("Q") for _ in range(r.scalar("I"))]
        infos.append((name, dims, r.scalar("I"), r.scalar("Q")))
    align = int(metadata.get("general.alignment", 32))
    start = -(-r.pos // align) * align
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from err
        n = int(np.prod(dims, dtype=np.int64))
        n_bytes = n // block * type_size
        begin = start + offset
        if begin + n_bytes > len(data):
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        tensors[name] = GGUFTensor(name, ggml_type, tuple(reversed(dims)), data[begin:begin + n_bytes])
    return GGUFFile(path, version, metadata, tensors)
