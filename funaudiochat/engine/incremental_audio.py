"""Incremental audio encoding: a user's audio turned into the LLM's 5 Hz vectors chunk by chunk while they speak.

The continuous encoder attends inside chunks of W = 2·n_window mel frames (SPEC §3.1: 200 frames = 2 s for the
released model), its convolutions see only their chunk, and neither its 2-frame pooling (50 -> 25 Hz) nor the
adapter's groups of k = 5 frames (25 -> 5 Hz) straddle a chunk boundary when W is a multiple of 4k. So the vectors of
a chunk depend on that chunk's mel frames alone, and a chunk is encoded (mel + encoder + adapter) as soon as the
window of its last mel frame (200 samples past the frame's centre) has arrived. At the end of speech only the last,
partial chunk remains. The result is what `build_prompt` + `FunAudioChatModel.encode_audio` give for the whole clip
(tests/test_incremental_audio.py, to float32 rounding).

The whole-clip dependency: the Whisper log-mel floors every value at the clip's largest value - 8 (log10 units). A
chunk is encoded with the floor of the running maximum; when the maximum rises, the chunks holding values under the
new floor (only those change) are encoded again, at the next `add` (while the user still speaks) or at `finish` when
the rise came from the last samples. `tolerance` > 0 keeps chunks whose floor lies less than `tolerance` below the
final one (an approximation: their quietest values stay floored a little lower than the whole clip's); 0, the
default, always gives the whole clip's result.

A clip shorter than one chunk is all last chunk: encoded at `finish`. The mini model's encoder attends over 30 s
(W = 3000): there only clips longer than 30 s are encoded ahead, and none with its word reader (which reads the
whole clip). Where W is not a multiple of 4k nothing is done ahead and `finish` returns no vectors (the caller
encodes the clip as usual).

Shape legend: M mel bins, W mel frames per chunk, G 5 Hz groups, D LLM width.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from funaudiochat.audio.io import load_audio
from funaudiochat.audio.mel import HOP, N_FFT, SAMPLE_RATE, floor_and_scale, log_mel_frames
from funaudiochat.engine.inputs import user_audio
from funaudiochat.engine.prompt import speech_token_count
from funaudiochat.errors import InputError

_HALF = N_FFT // 2
_CLIP = 30 * SAMPLE_RATE  # build_prompt pads each audio's features to whole 30 s windows


class _Chunk:
    """One chunk: its unfloored log-mel [M, W], the floor it was encoded with, its vectors [W/(4k), D]."""

    def __init__(self, raw: torch.Tensor):
        self.raw, self.low = raw, raw.min()
        self.floor: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None


class IncrementalAudio:
    """One user turn's audio, fed piece by piece with `add(samples)` (16 kHz mono), closed by `finish()`.

    model: a FunAudioChatModel (its encoder and adapter are used, on their own device and dtype).
    `encoded_seconds` / `recomputed_chunks` say how much work was done ahead and how much was redone.
    """

    def __init__(self, model, tolerance: float = 0.0):
        a = model.cfg.audio_config
        self.encoder, self.adapter = model.continuous_audio_tower, model.audio_tower
        self.mode = a.continuous_features_mode
        self.n_mels, self.k, self.width = a.num_mel_bins, a.group_size, self.encoder.chunk
        # a word reader (the mini) reads the whole clip's words at the end: nothing is encoded ahead
        self.streaming = self.width % (4 * self.k) == 0 and getattr(model, "word_reader", None) is None
        self.device, self.dtype = self.encoder.proj.weight.device, self.encoder.proj.weight.dtype
        self.tolerance = float(tolerance)
        self._pieces: list[np.ndarray] = []  # every sample so far, as it came
        self.n_samples = 0
        self._tail = torch.zeros(0)  # the samples from `_tail_start` on: what the next frames read (float32, CPU)
        self._tail_start = 0
        self._frames = 0  # final log-mel frames computed so far
        self._pending = torch.zeros(self.n_mels, 0, device=self.device)  # those after the last chunk cut, unfloored
        self._peak = torch.tensor(-math.inf, device=self.device)  # the largest log-mel value so far
        self._chunks: list[_Chunk] = []
        self.recomputed_chunks = 0  # chunks encoded again after the running maximum rose (at `add` or `finish`)
        self.finish_recomputed = 0  # of which at `finish`: work left on the critical path
        self.finished = False
        self.listener = None  # called after an `add` that encoded chunks (ChatSession: prefill them ahead)

    @property
    def encoded_seconds(self) -> float:
        return len(self._chunks) * self.width * HOP / SAMPLE_RATE

    # ------------------------------------------------------------------ while the user speaks
    @torch.no_grad()
    def add(self, samples) -> None:
        """Append 16 kHz mono samples (numpy or torch, 1-D); encode every chunk they complete."""
        if self.finished:
            raise InputError("this audio is finished; start a new IncrementalAudio for the next turn")
        if isinstance(samples, (np.ndarray, torch.Tensor)) and samples.ndim == 1 and samples.shape[0] == 0:
            return  # nothing arrived
        piece = load_audio(samples, SAMPLE_RATE, source_rate=SAMPLE_RATE, name="audio piece")
        self._pieces.append(piece)
        self.n_samples += piece.shape[0]
        if not self.streaming:
            return  # encoded at finish
        self._tail = torch.cat([self._tail, torch.from_numpy(piece)])
        s = self.n_samples
        ready = (s - _HALF) // HOP + 1 if s > _HALF else 0  # frame t reads samples up to 160 t + 200
        if ready > self._frames:
            self._extend(self._padded(ready), ready)
        before = (len(self._chunks), self.recomputed_chunks)
        self._cut(self._frames)
        self._refresh(self._peak - 8.0)
        if self.listener is not None and (len(self._chunks), self.recomputed_chunks) != before:
            self.listener()

    def ready_groups(self) -> torch.Tensor | None:
        """The 5 Hz vectors of the complete chunks so far [G, D] (final unless the maximum rises again: then
        `recomputed_chunks` grows), or None before the first chunk."""
        return torch.cat([c.groups for c in self._chunks]) if self._chunks else None

    def _cut(self, n_frames: int) -> None:
        """Start a chunk for every complete chunk of the first `n_frames` frames not cut yet."""
        while (len(self._chunks) + 1) * self.width <= n_frames:
            self._chunks.append(_Chunk(self._pending[:, :self.width]))
            self._pending = self._pending[:, self.width:]

    def _padded(self, stop: int, total: int | None = None) -> torch.Tensor:
        """The reflect-padded signal that the frames from `_frames` to `stop` read: the samples so far, or, with
        `total`, the clip zero-padded to `total` samples and reflected at its end (as the whole-clip front-end pads
        it). Samples no later frame reads are dropped from `_tail`."""
        lo, hi = HOP * self._frames - _HALF, HOP * (stop - 1) + N_FFT - _HALF  # in sample coordinates
        wav, start = self._tail, self._tail_start
        if total is not None:
            wav = torch.cat([wav, wav.new_zeros(total - self.n_samples)])
            wav = torch.cat([wav, wav[-_HALF - 1:-1].flip(0)])
        head = wav[1:1 - lo].flip(0) if lo < 0 else wav[:0]  # frames 0 and 1 start in the reflected head
        padded = torch.cat([head, wav[max(lo, 0) - start:hi - start]]).to(self.device)
        keep = max(0, HOP * stop - _HALF)  # the first sample the next frame reads (>= 240 samples before the end)
        self._tail, self._tail_start = self._tail[keep - start:], keep
        return padded

    def _extend(self, padded: torch.Tensor, stop: int) -> None:
        new = log_mel_frames(padded, self.n_mels)[:, :stop - self._frames]
        self._pending = torch.cat([self._pending, new], dim=1)
        self._frames = stop
        self._peak = torch.maximum(self._peak, new.max())

    def _refresh(self, floor: torch.Tensor) -> None:
        """(Re-)encode the chunks whose features differ under `floor`: new ones, and those holding values under it
        that were encoded with a lower floor (more than `tolerance` lower)."""
        for chunk in self._chunks:
            if chunk.groups is not None:
                if bool(chunk.floor == floor) or not bool(chunk.low < floor):
                    continue
                if float(floor - chunk.floor) <= self.tolerance:
                    continue
                self.recomputed_chunks += 1
            chunk.floor, chunk.groups = floor, self._groups(self._encode(chunk.raw, floor))

    # ------------------------------------------------------------------ the model's parts
    def _encode(self, raw: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        """Unfloored log-mel [M, c] of one chunk -> its encoder frames at 25 Hz after ln_post and proj [c', D]."""
        features = floor_and_scale(raw, floor + 8.0).to(self.dtype)[None]  # [1, M, c]
        frames = self.encoder.encode_frames(features, torch.tensor([raw.shape[1]], device=self.device))[0]
        frames = frames[: 2 * (frames.shape[0] // 2)]  # pooling pairs; an odd last frame is dropped, as whole
        if frames.shape[0] == 0:
            return frames.new_zeros(0, self.encoder.cfg.output_dim)
        return self.encoder.pool_project(frames)

    def _groups(self, frames: torch.Tensor) -> torch.Tensor:
        """25 Hz frames [5 G, D] -> the adapter's continuous 5 Hz vectors [G, D]."""
        return self.adapter.group_continuous(frames[None])[0]

    # ------------------------------------------------------------------ end of speech
    @torch.no_grad()
    def finish(self) -> tuple[np.ndarray, torch.Tensor | None]:
        """End of speech -> (the whole clip, validated as a user turn's audio; its 5 Hz vectors [G, D], or None
        when this model's chunks cannot be encoded apart: then the caller encodes the clip as usual)."""
        if self.finished:
            raise InputError("this audio is already finished")
        whole = np.concatenate(self._pieces) if self._pieces else np.zeros(0, np.float32)
        wav = user_audio(whole)  # the same checks as a whole clip (length)
        self.finished = True
        if not self.streaming:
            return wav, None
        s = self.n_samples
        total = _CLIP * max(1, math.ceil(s / _CLIP))
        touched = min(total // HOP, (s + _HALF) // HOP + 1)  # frames past this see only zero padding
        if touched > self._frames:  # the last frames, zero padded as the whole clip is: final now
            self._extend(self._padded(touched, total), touched)
        n_valid = -(-s // HOP)  # the feature mask's length: ceil(S / 160) frames go to the encoder
        self._cut(n_valid)
        floor = self._peak - 8.0
        self._refresh(floor)
        n_groups = -(-speech_token_count(s) // self.k)
        start = len(self._chunks) * self.width
        parts = [c.groups for c in self._chunks]
        rows = n_groups * self.k - start // 4  # 25 Hz frames of the tail that fill its groups
        if rows > 0:
            tail = self._encode(self._pending[:, :n_valid - start], floor) if n_valid > start else \
                parts[0].new_zeros(0, parts[0].shape[1])
            tail = F.pad(tail[:rows], (0, 0, 0, max(0, rows - tail.shape[0])))  # zeros past the audio, as whole
            parts.append(self._groups(tail))
        groups = torch.cat(parts)[:n_groups]
        if self.mode == "add":  # user audio's discrete part: the embedding of pad ids, the same for every group
            ids = torch.full((1, self.k), self.adapter.embed_tokens.padding_idx, device=self.device)
            groups = groups + self.adapter.output_matching(self.adapter.group_mean(self.adapter.embed_tokens(ids)))[0]
        return wav, groups
