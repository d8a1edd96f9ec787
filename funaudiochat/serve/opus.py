"""Ogg/Opus streams at 24 kHz for the released demo's protocol (SPEC §10.2), through `sphn` (libopus inside).

`sphn` is the package the released server uses (`sphn.OpusStreamWriter(24000)`), so the bytes on the wire are
of the same kind the released web client expects.

- `OpusEncoder.push(samples) -> bytes`: float32 mono samples of any count in, the Ogg pages completed so far out.
  The writer takes whole 40 ms frames (960 samples); the remainder waits for the next push, and `flush()`
  zero-pads it to a frame (as the released encode thread does).
- `OpusDecoder.push(data) -> samples`: Ogg/Opus bytes of any split in, the float32 samples they complete out.
  Bytes that are not Ogg/Opus raise `ProtocolError`; the decoder is unusable afterwards (make a new one).
"""
from __future__ import annotations

import numpy as np

from funaudiochat.errors import ProtocolError

OPUS_RATE = 24000
FRAME = 960  # samples per encoded frame: 40 ms at 24 kHz


class OpusEncoder:
    def __init__(self, sample_rate: int = OPUS_RATE):
        import sphn

        self._writer = sphn.OpusStreamWriter(sample_rate)
        self._pending = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray) -> bytes:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._pending = np.concatenate([self._pending, np.clip(samples, -1.0, 1.0)])
        out = []
        while self._pending.shape[0] >= FRAME:
            frame, self._pending = self._pending[:FRAME], self._pending[FRAME:]
            out.append(self._writer.append_pcm(frame))
        return b"".join(out)

    def flush(self) -> bytes:
        """Encode what is left, zero-padded to a whole frame."""
        if self._pending.shape[0] == 0:
            return b""
        tail = np.zeros(FRAME, np.float32)
        tail[: self._pending.shape[0]] = self._pending
        self._pending = np.zeros(0, np.float32)
        return self._writer.append_pcm(tail)


class OpusDecoder:
    def __init__(self, sample_rate: int = OPUS_RATE):
        import sphn

        self._reader = sphn.OpusStreamReader(sample_rate)
        self.broken = False

    def push(self, data: bytes) -> np.ndarray:
        if self.broken:
            raise ProtocolError("the Ogg/Opus stream is broken; start a new one")
        try:
            pcm = self._reader.append_bytes(bytes(data))
        except Exception as err:  # sphn raises ValueError / RuntimeError on bytes that are not Ogg/Opus
            self.broken = True
            raise ProtocolError(f"audio is not a valid Ogg/Opus stream ({err})") from None
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if not np.isfinite(pcm).all():
            self.broken = True
            raise ProtocolError("the Ogg/Opus stream decoded to NaN or inf samples")
        return pcm
