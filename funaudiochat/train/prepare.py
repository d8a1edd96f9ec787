"""`funaudiochat data prepare`: check every record of a training JSONL and write released sharegpt records.

Input lines are released sharegpt records or DPO pair records (data.py), or native manifest records:

    {"id": "q1", "system": "optional system prompt",
     "turns": [{"role": "user", "audio": "wavs/q1.wav", "text": "transcript (optional)", "instruction": "optional"},
               {"role": "user", "text": "a typed turn"},
               {"role": "assistant", "text": "the answer", "audio": "wavs/a1.wav"},       # speech to tokenize
               {"role": "assistant", "text": "the answer", "speech_tokens": [12, 7, ...]}, # or codes already
               {"role": "assistant", "text": "a text-only answer"}]}

A DPO pair in this form ends its turns with a user turn and adds {"task": ..., "chosen": ..., "rejected": ...}
(each response a text, or {"text": ..., "token": ...} as in data.py).

Assistant speech is tokenized with the S3 speech tokenizer (25 Hz) and written with the 10-token delay
(`<|audio_bos|>` x10 + `[AU####]`...), user audio as `<|audio_pad|>` x int(seconds * 25), as the released data
pipeline does (SPEC §8.1); relative paths become absolute. Every record is validated: files exist and decode,
texts are not empty, token strings parse, the tokenized conversation fits the context. Bad records are reported
with their line numbers and skipped (or stop the run with on_error="reject").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from funaudiochat import fileio
from funaudiochat.audio.io import load_audio
from funaudiochat.engine.prompt import speech_token_count
from funaudiochat.errors import InputError
from funaudiochat.text.tokenizer import AUDIO_PAD, AUDIO_TEMPLATE
from funaudiochat.train.data import (SPEECH_DELAY, DataReport, Problem, RecordError, SampleBuilder,
                                     assistant_token_string, audio_entries, is_assistant_speech, read_jsonl)

Tokenize = Callable[[np.ndarray], np.ndarray]  # 16 kHz mono wave -> 25 Hz speech codes


class Preparer:
    def __init__(self, builder: SampleBuilder, tokenize: Tokenize | None, delay: int = SPEECH_DELAY):
        self.builder, self.tokenize, self.delay = builder, tokenize, delay

    def prepare(self, record: dict, base_dir: Path, source: str) -> dict:
        if "turns" in record:
            record = self._from_native(record, base_dir)
        else:
            record = self._check_sharegpt(record, base_dir)
        check = self.builder.pair if "chosen" in record else self.builder.sample
        check(record, base_dir, source)  # format, token strings, files, context length
        return record

    # ------------------------------------------------------------------ native manifest
    def _from_native(self, record: dict, base_dir: Path) -> dict:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns:
            raise RecordError("bad format", "\"turns\" must be a non-empty list")
        messages, audio = [], []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
                raise RecordError("bad format", f"turn {i}: expected {{\"role\": \"user\" | \"assistant\", ...}}")
            convert = self._user_turn if turn["role"] == "user" else self._assistant_turn
            content, entry = convert(turn, base_dir, i)
            messages.append({"role": turn["role"], "content": content})
            if entry is not None:
                audio.append(json.dumps(entry, ensure_ascii=False, sort_keys=True))
        out = {"messages": messages, "audio": audio}
        if record.get("system"):
            out = {"system": record["system"], **out}
        out.update({k: record[k] for k in ("task", "chosen", "rejected") if k in record})  # a DPO pair
        return out

    def _user_turn(self, turn: dict, base_dir: Path, i: int) -> tuple[str, dict | None]:
        text, instruction = _text(turn, "text", i), _text(turn, "instruction", i)
        if not turn.get("audio"):
            if not text.strip():
                raise RecordError("empty text", f"turn {i}: a user turn needs \"audio\" or \"text\"")
            return text, None
        path = _resolve(turn["audio"], base_dir)
        n = speech_token_count(len(_read(path, f"turn {i}")))
        if n < 1:
            raise RecordError("unreadable audio", f"turn {i}: {path} is shorter than one speech token (40 ms)")
        entry = {"path": path, "text": "", "token": AUDIO_PAD * n, "ref_path": "", "ref_text": text}
        return AUDIO_TEMPLATE + (f"\n{instruction}" if instruction else ""), entry

    def _assistant_turn(self, turn: dict, base_dir: Path, i: int) -> tuple[str, dict | None]:
        text = _text(turn, "text", i)
        if not text.strip():
            raise RecordError("empty text", f"turn {i}: the assistant turn has no text")
        codes, ref_path = turn.get("speech_tokens"), ""
        if codes is None and turn.get("audio"):
            ref_path = _resolve(turn["audio"], base_dir)
            codes = self._tokenize(ref_path, f"turn {i}")
        if codes is None:
            return text, None
        if not isinstance(codes, list) or not codes or not all(isinstance(c, int) and c >= 0 for c in codes):
            raise RecordError("bad speech tokens", f"turn {i}: speech_tokens must be a non-empty list of codes")
        entry = {"path": "", "text": text, "token": assistant_token_string(codes, self.delay), "ref_path": ref_path,
                 "ref_text": ""}
        return AUDIO_TEMPLATE, entry

    # ------------------------------------------------------------------ released sharegpt
    def _check_sharegpt(self, record: dict, base_dir: Path) -> dict:
        """Decode every user audio; tokenize assistant audio given only as `ref_path` (no token string yet)."""
        entries = audio_entries(record)
        changed = False
        for i, e in enumerate(entries):
            token, path = e.get("token") or "", e.get("path") or e.get("wav_path") or ""
            if not token and e.get("ref_path") and e.get("text"):
                codes = self._tokenize(_resolve(e["ref_path"], base_dir), f"audio {i}")
                e = {**e, "token": assistant_token_string(codes, self.delay), "path": ""}
                entries[i], changed = e, True
            elif path and not is_assistant_speech(token):
                _read(_resolve(path, base_dir), f"audio {i}")
        if changed:
            record = {**record, "audio": [json.dumps(e, ensure_ascii=False, sort_keys=True) for e in entries]}
        return record

    def _tokenize(self, path: str, where: str) -> list[int]:
        if self.tokenize is None:
            raise RecordError("needs speech tokenizer", f"{where}: assistant audio {path} must be tokenized: "
                                                        f"pass --speech-tokenizer (speech_tokenizer_v3.onnx)")
        codes = self.tokenize(_read(path, where))
        if len(codes) == 0:
            raise RecordError("unreadable audio", f"{where}: {path} gave no speech tokens (too short)")
        return [int(c) for c in codes]


def _text(turn: dict, key: str, i: int) -> str:
    value = turn.get(key) or ""
    if not isinstance(value, str):
        raise RecordError("bad format", f"turn {i}: \"{key}\" must be a string")
    return value


def _resolve(path, base_dir: Path) -> str:
    if not isinstance(path, str) or not path:
        raise RecordError("bad format", f"an audio path must be a non-empty string, got {path!r}")
    p = Path(path)
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def _read(path: str, where: str) -> np.ndarray:
    if not Path(path).is_file():
        raise RecordError("missing file", f"{where}: {path}: no such file")
    try:
        return load_audio(path, 16000)
    except InputError as err:
        raise RecordError("unreadable audio", f"{where}: {err}") from None


def prepare_file(src: Path, dst: Path, preparer: Preparer, on_error: str = "skip",
                 progress: bool = True) -> DataReport:
    """Validate / convert every line of `src` into `dst` (written atomically); returns what was skipped and why."""
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError(f"{src}: input JSONL not found")
    with open(src, "rb") as f:
        total = sum(1 for line in f if line.strip())
    report = DataReport()
    with fileio.atomic_path(dst) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for line_no, record in tqdm(read_jsonl(src), total=total, desc="prepare", disable=not progress):
            report.read += 1
            source = f"{src}:{line_no}"
            try:
                if isinstance(record, RecordError):
                    raise record
                out.write(json.dumps(preparer.prepare(record, src.parent, source), ensure_ascii=False) + "\n")
            except RecordError as err:
                if on_error == "reject":
                    raise InputError(f"{source}: {err} (use --on-error skip to skip such records)") from None
                report.problems.append(Problem(source, err.kind, str(err)))
    return report
