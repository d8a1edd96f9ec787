"""Training data of the word reader (recipe `stage: reader`): the user clips of the training records with their
scripts, and the collate that roughens each clip and computes its log-mel.

A clip is an audio entry of a record (train/data.py's format) that has a wav and a script (`ref_text`, the words
spoken, which build-mini writes). Its target is what Whisper writes for those words: `start_ids`, the script's
Whisper tokens (with the leading space Whisper writes), `end_id`. A clip spoken in several records (a question asked
again in a follow-up) is trained once. The reader reads one window of `window_s` seconds at a time, so a longer
clip, whose script would not match any one window, is reported and skipped.

The collate adds, to a share of the clips, noise at an SNR or the telephone band (recipe `reader`), drawn from
(seed, step, micro-batch, position): a resumed run sees the same audio.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from funaudiochat.audio.io import load_audio
from funaudiochat.audio.mel import WhisperFrontend
from funaudiochat.data import augment
from funaudiochat.errors import InputError
from funaudiochat.model.word_reader import WordReaderConfig
from funaudiochat.train.data import DataReport, RecordError, audio_entries, load_records

IGNORE = -100
SAMPLE_RATE = 16000  # Whisper's


@dataclass(frozen=True)
class ReaderClip:
    wav: str
    ids: tuple[int, ...]  # start_ids, the script's Whisper tokens, end_id

    def __len__(self) -> int:  # the epoch plan buckets by it
        return len(self.ids)


@dataclass
class ReaderBatch:
    features: torch.Tensor  # [N, M, T] log-mel, padded to the longest clip
    lengths: torch.Tensor   # [N] valid mel frames
    inputs: torch.Tensor    # [N, L] token sequences without their last token (padded with end_id)
    targets: torch.Tensor   # [N, L] the next token of each position; IGNORE on the prompt and the padding
    n_targets: int


class _ClipBuilder:
    """One record -> its clips (load_records' `build`)."""

    def __init__(self, cfg: WordReaderConfig, tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.seconds: dict[str, float] = {}  # per wav: a clip asked again in a follow-up is measured once

    def __call__(self, record: dict, base_dir: Path, source: str) -> list[ReaderClip]:
        clips = []
        for i, entry in enumerate(audio_entries(record)):
            script, path = entry.get("ref_text"), entry.get("path") or entry.get("wav_path")
            if not path or not isinstance(script, str) or not script.strip():
                continue  # assistant speech, or a clip without its script
            wav = str(path if Path(path).is_absolute() else base_dir / path)
            if not Path(wav).is_file():
                raise RecordError("missing file", f"audio {i}: {wav}: no such file")
            if wav not in self.seconds:
                self.seconds[wav] = _seconds(wav)
            seconds = self.seconds[wav]
            if seconds > self.cfg.window_s:
                raise RecordError("too long", f"audio {i}: {seconds:.1f} s, past the reader's {self.cfg.window_s} s "
                                              f"window")
            words = self.tok.encode(" " + script.strip(), add_special_tokens=False).ids
            ids = (*self.cfg.start_ids, *words, self.cfg.end_id)
            if len(ids) > self.cfg.max_positions:
                raise RecordError("too long", f"audio {i}: a script of {len(words)} Whisper tokens")
            clips.append(ReaderClip(wav, ids))
        if not clips:
            raise RecordError("no script", "no user clip with its script (`ref_text`)")
        return clips


def _seconds(wav: str) -> float:
    """A clip's duration from its header (WAV, FLAC, ...), else by decoding it."""
    try:
        return sf.info(wav).duration
    except (RuntimeError, sf.LibsndfileError):
        pass
    try:
        return len(load_audio(wav)) / SAMPLE_RATE
    except InputError as err:  # not audio, or cut short: the record is reported, the run goes on
        raise RecordError("bad audio", str(err)) from None


def load_reader_clips(paths: list, cfg: WordReaderConfig, tokenizer,
                      on_error: str = "skip") -> tuple[list[ReaderClip], DataReport]:
    """Every distinct user clip of the JSONL files with its target tokens, and the report of the records skipped."""
    per_record, report = load_records(paths, _ClipBuilder(cfg, tokenizer), on_error)
    clips, seen = [], set()
    for clip in (c for record in per_record for c in record):
        if clip.wav not in seen:
            seen.add(clip.wav)
            clips.append(clip)
    return clips, report


class ReaderCollator:
    """Clips of one micro-batch -> ReaderBatch, each clip roughened as `section` (the recipe's `reader`) says."""

    def __init__(self, n_mels: int, cfg: WordReaderConfig, section, seed: int):
        self.frontend, self.cfg, self.section, self.seed = WhisperFrontend(n_mels), cfg, section, seed

    def roughen(self, wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s, u = self.section, rng.random()
        if u < s.noise:
            return augment.add_noise(wav, float(rng.uniform(*s.snr_db)), rng, str(rng.choice(augment.NOISE_COLORS)))
        if u < s.noise + s.telephone:
            return augment.telephone(wav, SAMPLE_RATE)
        return wav

    def __call__(self, clips: list[ReaderClip], key: tuple[int, int]) -> ReaderBatch:
        """key: (step, micro-batch), which with the seed fixes each clip's roughening."""
        wavs = []
        for i, clip in enumerate(clips):
            wav = load_audio(clip.wav)[: self.cfg.window_s * SAMPLE_RATE]  # as measured at setup
            # a silent clip cannot take noise at an SNR: it trains as it is
            rng = np.random.default_rng([self.seed, *key, i])
            wavs.append(self.roughen(wav, rng) if np.any(wav) else wav)
        features, mask = self.frontend(wavs, padding="longest")
        width = max(len(c) for c in clips)
        ids = torch.full((len(clips), width), self.cfg.end_id, dtype=torch.long)
        targets = torch.full((len(clips), width - 1), IGNORE, dtype=torch.long)
        prompt = len(self.cfg.start_ids) - 1  # the prompt's own tokens are given, not predicted
        for i, clip in enumerate(clips):
            ids[i, : len(clip)] = torch.tensor(clip.ids)
            targets[i, prompt: len(clip) - 1] = ids[i, prompt + 1: len(clip)]
        return ReaderBatch(features, mask.sum(-1), ids[:, :-1], targets, int((targets != IGNORE).sum()))
