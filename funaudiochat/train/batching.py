"""Deterministic batching: length-bucketed global batches, their split over processes and micro-steps, packing,
and collation into the model's training inputs.

The order of samples depends only on (seed, epoch), never on the number of processes: step s of a run is global
batch `s % batches_per_epoch` of epoch `s // batches_per_epoch`. So the data position is the step counter, and a
run resumed with another world size still sees the same global batches.

Shape legend: B rows, L row length, A audios in the batch (row-major order of appearance), N speech tokens,
T transcript tokens, F audios with continuous features, M mel bins, Tm mel frames.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from funaudiochat.audio.io import load_audio
from funaudiochat.audio.mel import WhisperFrontend
from funaudiochat.config import FunAudioChatConfig
from funaudiochat.errors import InputError
from funaudiochat.train.data import Sample


class EpochPlan:
    """Global batches (arrays of sample indices) of every epoch: shuffle, sort by length inside windows of
    `bucket_batches` global batches, cut, shuffle the batches. The last incomplete global batch is dropped."""

    def __init__(self, lengths: list[int], global_batch: int, seed: int, bucket_batches: int = 16):
        if len(lengths) < global_batch:
            raise InputError(f"the data has {len(lengths)} usable records, fewer than one global batch "
                             f"(train.global_batch={global_batch})")
        self.lengths = np.asarray(lengths)
        self.global_batch, self.seed, self.bucket_batches = global_batch, seed, bucket_batches
        self.batches_per_epoch = len(lengths) // global_batch
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def epoch(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._plan(epoch))
        return self._cache[1]

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.batches_per_epoch * self.global_batch]
        window = self.bucket_batches * self.global_batch
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def step(self, step: int) -> np.ndarray:
        """Sample indices of the global batch at optimizer step `step` (0-based)."""
        return self.epoch(step // self.batches_per_epoch)[step % self.batches_per_epoch]

    def fingerprint(self) -> str:
        """Identifies the data a checkpoint was trained on (record count and lengths)."""
        return f"{len(self.lengths)}-{hashlib.sha1(self.lengths.astype(np.int64).tobytes()).hexdigest()[:12]}"


def split_global_batch(indices: np.ndarray, lengths: np.ndarray, rank: int, world: int,
                       accum: int) -> list[np.ndarray]:
    """This process's `accum` micro-batches of a global batch. Samples, longest first, go round-robin to the
    world*accum slots (slot = micro * world + rank), so processes get similar lengths and the split is the same
    whatever mix of processes and accumulation makes up the global batch."""
    order = indices[np.argsort(-lengths[indices], kind="stable")]
    slots = world * accum
    return [order[m * world + rank::slots] for m in range(accum)]


def pack(samples: list, max_len: int) -> list[list]:
    """First-fit decreasing: rows of at most `max_len` tokens, each a list of samples."""
    rows: list[list] = []
    room: list[int] = []
    for s in sorted(samples, key=len, reverse=True):
        for i, free in enumerate(room):
            if len(s) <= free:
                rows[i].append(s)
                room[i] -= len(s)
                break
        else:
            rows.append([s])
            room.append(max_len - len(s))
    return rows


@dataclass
class Batch:
    """The model's training inputs plus counts for loss normalisation and throughput."""

    input_ids: torch.Tensor                         # [B, L]
    attention_mask: torch.Tensor                    # [B, L] 1/0, or segment ids 1, 2, ... when packed
    position_ids: torch.Tensor                      # [B, L] restart at 0 for every sample, 0 on padding
    labels: torch.Tensor                            # [B, L]
    speech_ids: torch.Tensor | None = None          # [A, N]
    speech_attention_mask: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None            # [A, T]
    text_attention_mask: torch.Tensor | None = None  # [A] bool
    feature_exist_mask: torch.Tensor | None = None  # [A] bool
    input_features: torch.Tensor | None = None      # [F, M, Tm]
    feature_attention_mask: torch.Tensor | None = None  # [F, Tm]
    n_text_targets: int = 0
    n_speech_targets: int = 0
    n_tokens: int = 0                               # non-padding tokens
    owners: torch.Tensor | None = None              # [B, L] each position's sample (its index in the collated
    #   list), -1 on padding
    teacher: Batch | None = None                    # distillation: the typed twins, owned by their samples' indices

    MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels", "speech_ids", "speech_attention_mask",
                    "text_ids", "text_attention_mask", "feature_exist_mask", "input_features",
                    "feature_attention_mask")

    def model_inputs(self, device) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).to(device) for k in self.MODEL_INPUTS if getattr(self, k) is not None}


class Collator:
    """Samples -> `Batch`: rows (one sample each, or packed), audio tensors in row-major order, Whisper features of
    the user wavs (padded to the longest, as the released plugin)."""

    def __init__(self, cfg: FunAudioChatConfig, max_len: int, packing: bool):
        t, a = cfg.text_config, cfg.audio_config
        self.pad_id = t.pad_token_id if t.pad_token_id is not None else _first(t.eos_token_id)
        self.speech_pad, self.ignore = a.pad_token_id, cfg.ignore_index
        self.max_len, self.packing = max_len, packing
        self.frontend = WhisperFrontend(a.num_mel_bins)

    def __call__(self, samples: list[Sample]) -> Batch:
        rows = pack(samples, self.max_len) if self.packing else [[s] for s in samples]
        width = max(sum(len(s) for s in row) for row in rows)
        b = len(rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        labels = torch.full((b, width), self.ignore, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        positions = torch.zeros(b, width, dtype=torch.long)
        owners = torch.full((b, width), -1, dtype=torch.long)
        index: dict[int, list[int]] = {}  # a sample object may come twice (a record and its typed copy's twin)
        for i, s in enumerate(samples):
            index.setdefault(id(s), []).append(i)
        audios = []
        for r, row in enumerate(rows):
            at = 0
            for seg, s in enumerate(row, 1):
                n = len(s)
                ids[r, at:at + n] = torch.from_numpy(s.input_ids)
                labels[r, at:at + n] = torch.from_numpy(s.labels)
                mask[r, at:at + n] = seg if self.packing else 1
                positions[r, at:at + n] = torch.arange(n)
                owners[r, at:at + n] = index[id(s)].pop(0)
                audios += s.audios
                at += n
        batch = Batch(ids, mask, positions, labels,
                      n_text_targets=sum(s.n_text_targets for s in samples),
                      n_speech_targets=sum(s.n_speech_targets for s in samples),
                      n_tokens=sum(len(s) for s in samples), owners=owners)
        if audios:
            self._audio_inputs(batch, audios, samples)
        return batch

    def _audio_inputs(self, batch: Batch, audios: list, samples: list[Sample]) -> None:
        n = max(len(a.speech_ids) for a in audios)
        t = max(1, max(len(a.text_ids) for a in audios))
        batch.speech_ids = torch.full((len(audios), n), self.speech_pad, dtype=torch.long)
        batch.speech_attention_mask = torch.zeros(len(audios), n, dtype=torch.long)
        batch.text_ids = torch.full((len(audios), t), self.pad_id, dtype=torch.long)
        for i, a in enumerate(audios):
            batch.speech_ids[i, :len(a.speech_ids)] = torch.from_numpy(a.speech_ids)
            batch.speech_attention_mask[i, :len(a.speech_ids)] = 1
            batch.text_ids[i, :len(a.text_ids)] = torch.from_numpy(a.text_ids)
        batch.text_attention_mask = torch.tensor([len(a.text_ids) > 0 for a in audios])
        batch.feature_exist_mask = torch.tensor([a.wav is not None for a in audios])
        wavs = [a.wav for a in audios if a.wav is not None]
        if wavs:
            loaded = []
            for path in wavs:
                try:
                    loaded.append(load_audio(path, 16000))
                except InputError as err:
                    where = next(s.source for s in samples if any(a.wav == path for a in s.audios))
                    raise InputError(f"{where}: {err} (`funaudiochat data prepare` checks every audio file)") from None
            batch.input_features, batch.feature_attention_mask = self.frontend(loaded, padding="longest")


class DistillCollator:
    """`DistillItem`s -> the samples' `Batch`, with `teacher` = the Batch of the typed twins there are, each twin
    owned by its sample's index, so a target of the one is matched to the same target of the other."""

    def __init__(self, collate: Collator):
        self.collate = collate

    def __call__(self, items: list) -> Batch:
        batch = self.collate([it.sample for it in items])
        twins = [(i, it.typed) for i, it in enumerate(items) if it.typed is not None]
        if twins:
            batch.teacher = self.collate([t for _, t in twins])
            owner_of = torch.tensor([i for i, _ in twins] + [-1])  # index -1 (padding) stays -1
            batch.teacher.owners = owner_of[batch.teacher.owners]
        return batch


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v
