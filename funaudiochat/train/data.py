"""Training records -> model-ready samples, exactly as the released LLaMA-Factory plugin builds them (SPEC §8).

The training format is the released sharegpt record, read as-is (SPEC §8.1):

    {"system": "...", "messages": [{"role": "user", "content": "<|audio_bos|><|AUDIO|><|audio_eos|>"},
                                   {"role": "assistant", "content": "<|audio_bos|><|AUDIO|><|audio_eos|>"}],
     "audio": ["{\"path\": \"/abs/q.wav\", \"text\": \"\", \"token\": \"<|audio_pad|>...\", ...}",
               "{\"path\": \"\", \"text\": \"answer\", \"token\": \"<|audio_bos|>x10[AU0012][AU0007]...\", ...}"]}

Each audio placeholder, in order, takes one `audio` entry (a JSON string or an object). How an entry becomes model
inputs (SPEC §8.3): its `token` string gives the speech ids (`<|audio_pad|>` for user audio, `<|audio_bos|>` x10
delay + `[AU####]` codes for assistant speech); the placeholder expands to ceil(len/k) `<|AUDIO|>`; an entry whose
token starts with `<|audio_bos|>` and holds codes is assistant speech and gets no continuous features; other entries
with a `path` get Whisper features of that wav; `text` is the transcript (text_ids), empty for user audio; an
optional `text_at` (per text id, the index of the speech token it rides with, the delay counted; increasing) lays
the ids out on the groups holding those tokens with `<|sil|>` between (spoken_answers.py's "word" layout) instead
of one id per group from the first. It is in speech tokens, not groups, so one record serves any group size k.
The chat template is the released `funaudiochat` one; labels cover every assistant part `content<|im_end|>\\n`.

DPO pairs use the same record for the prompt (messages end with a user turn) plus `chosen` / `rejected` responses
{"text": ..., "token": ...} and a `task` tag.

Distillation (recipe `distill`): a record whose user turns are all speech with their scripts (`ref_text`) and whose
answers are text also gets its typed twin, the same conversation with each spoken question written out, for the
teacher to read (`SampleBuilder.distill_item`).

Native manifests (`turns: [...]`, audio to tokenize) are converted by `funaudiochat data prepare` (prepare.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from funaudiochat import fileio
from funaudiochat.config import FunAudioChatConfig
from funaudiochat.engine.prompt import user_audio_tokens
from funaudiochat.errors import InputError
from funaudiochat.text.chat import DEFAULT_SYSTEM
from funaudiochat.text.tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, AUDIO_PAD, AUDIO_TEMPLATE, TextTokenizer

SPEECH_DELAY = 10  # speech lags text by 10 tokens (2 groups, 400 ms): the bos prefix of every assistant token string
_SPEECH_TOKEN = re.compile(r"<\|audio_bos\|>|<\|audio_pad\|>|<\|audio_eos\|>|\[AU(\d+)\]")


class RecordError(InputError):
    """One record cannot be used; `kind` groups the reasons in reports (e.g. "missing file", "too long")."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class AudioItem:
    speech_ids: np.ndarray     # [n] speech token ids (user: pad ids; assistant: bos x delay + codes)
    text_ids: np.ndarray       # [t] transcript ids (empty for user audio)
    wav: str | None            # file of the continuous features (user audio); None for assistant speech


@dataclass
class Sample:
    input_ids: np.ndarray      # [L]
    labels: np.ndarray         # [L] unshifted, -100 outside the assistant parts
    audios: list[AudioItem]    # in order of appearance
    source: str                # "file.jsonl:LINE"
    n_text_targets: int = 0    # text / speech positions the model's loss will count (for global normalisation)
    n_speech_targets: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferencePair:
    chosen: Sample
    rejected: Sample
    task: str
    source: str

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class DistillItem:
    """A sample and, where the record has one, its typed twin for the teacher (same answers, so the same targets)."""
    sample: Sample
    typed: Sample | None

    def __len__(self) -> int:
        return len(self.sample)


@dataclass
class Problem:
    source: str
    kind: str
    message: str


@dataclass
class DataReport:
    read: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.read - len(self.problems)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": self.counts(),
                "problems": [{"source": p.source, "kind": p.kind, "message": p.message} for p in self.problems]}

    def summary(self, show: int = 10) -> str:
        lines = [f"{self.kept} of {self.read} records kept"]
        if self.problems:
            lines[0] += ", skipped: " + ", ".join(f"{n} {k}" for k, n in self.counts().items())
            lines += [f"  {p.source}: {p.message}" for p in self.problems[:show]]
            if len(self.problems) > show:
                lines.append(f"  ... and {len(self.problems) - show} more")
        return "\n".join(lines)


def parse_speech_tokens(token: str, cfg: FunAudioChatConfig) -> list[int]:
    """A released token string (`<|audio_bos|>`, `<|audio_pad|>`, `<|audio_eos|>`, `[AU0042]`) -> speech ids."""
    a = cfg.audio_config
    specials = {AUDIO_BOS: a.bos_token_id, AUDIO_PAD: a.pad_token_id, AUDIO_EOS: a.eos_token_id}
    ids, pos = [], 0
    for m in _SPEECH_TOKEN.finditer(token):
        if m.start() != pos:
            break
        pos = m.end()
        if m.group(1) is None:
            ids.append(specials[m.group(0)])
            continue
        code = int(m.group(1))
        if code >= a.bos_token_id:
            raise RecordError("bad speech tokens", f"speech code [AU{m.group(1)}] is out of range (codes are "
                                                   f"0..{a.bos_token_id - 1} for this model)")
        ids.append(code)
    if pos != len(token):
        raise RecordError("bad speech tokens", f"unexpected text in a speech token string at character {pos}: "
                                               f"{token[pos:pos + 20]!r} (expected <|audio_pad|>, <|audio_bos|> "
                                               f"or [AU####])")
    return ids


def assistant_token_string(codes, delay: int = SPEECH_DELAY) -> str:
    """Speech codes -> the released assistant token string: `<|audio_bos|>` x delay, then `[AU%04d]` per code."""
    return AUDIO_BOS * delay + "".join("[AU%04d]" % int(c) for c in codes)


def is_assistant_speech(token: str) -> bool:
    """The released plugin's rule: assistant speech starts with <|audio_bos|> and holds [AU....] codes."""
    return token.startswith(AUDIO_BOS) and "AU" in token[len(AUDIO_BOS):]


class SampleBuilder:
    """Converts records to `Sample`s for one model config and text tokenizer."""

    def __init__(self, tokenizer: TextTokenizer, cfg: FunAudioChatConfig, max_len: int, check_files: bool = True):
        self.tok, self.cfg, self.max_len, self.check_files = tokenizer, cfg, max_len, check_files
        self.k = cfg.audio_config.group_size
        self.ignore = cfg.ignore_index

    # ------------------------------------------------------------------ sharegpt conversation
    def sample(self, record: dict, base_dir: Path, source: str) -> Sample:
        if "turns" in record and "messages" not in record:
            raise RecordError("bad format", "a native manifest record (\"turns\"); convert the file with "
                                            "`funaudiochat data prepare` first")
        system, messages = self._conversation(record, need_last="assistant")
        return self._build(system, messages, audio_entries(record), base_dir, source)

    def pair(self, record: dict, base_dir: Path, source: str) -> PreferencePair:
        system, messages = self._conversation(record, need_last="user")
        audios = audio_entries(record)
        task = record.get("task") or "untagged"
        if not isinstance(task, str):
            raise RecordError("bad format", f"task must be a string, got {task!r}")
        built = []
        for side in ("chosen", "rejected"):
            content, entry = self._response(record.get(side), side)
            built.append(self._build(system, messages + [{"role": "assistant", "content": content}],
                                     audios + ([entry] if entry else []), base_dir, source))
        if np.array_equal(built[0].input_ids, built[1].input_ids) and _same_audio(built[0], built[1]):
            raise RecordError("bad format", "chosen and rejected responses are identical")
        return PreferencePair(built[0], built[1], task, source)

    def distill_item(self, record: dict, base_dir: Path, source: str) -> DistillItem:
        sample = self.sample(record, base_dir, source)
        typed = typed_record(record)
        if typed is None:
            return DistillItem(sample, None)
        twin = self.sample(typed, base_dir, source)
        ign = self.ignore
        if not np.array_equal(sample.labels[sample.labels != ign], twin.labels[twin.labels != ign]):
            raise RecordError("bad format", "the typed twin's answers tokenize differently from the record's")
        return DistillItem(sample, twin)

    def _response(self, resp, side: str) -> tuple[str, dict | None]:
        if isinstance(resp, str):
            resp = {"text": resp}
        if not isinstance(resp, dict) or not isinstance(resp.get("text", ""), str):
            raise RecordError("bad format", f"{side}: expected {{\"text\": ..., \"token\": ...}}, got {resp!r}")
        text, token = resp.get("text", ""), resp.get("token", "")
        if not token:
            if not text.strip():
                raise RecordError("empty text", f"{side}: the response has neither text nor speech tokens")
            return text, None
        return AUDIO_TEMPLATE, {"path": "", "text": text, "token": token}

    def _conversation(self, record: dict, need_last: str) -> tuple[str, list[dict]]:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RecordError("bad format", "expected a non-empty \"messages\" list")
        system = record.get("system") or ""
        if isinstance(messages[0], dict) and messages[0].get("role") == "system":
            system, messages = messages[0].get("content") or system, messages[1:]
        if not isinstance(system, str):
            raise RecordError("bad format", f"system must be a string, got {system!r}")
        for i, m in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if not isinstance(m, dict) or m.get("role") != want or not isinstance(m.get("content"), str):
                raise RecordError("bad format", f"message {i}: expected {{\"role\": \"{want}\", \"content\": str}} "
                                                f"(turns alternate user/assistant), got {_short(m)}")
            if not m["content"].strip():
                raise RecordError("empty text", f"message {i} ({want}) has empty content")
        if messages[-1]["role"] != need_last:
            raise RecordError("bad format", f"the last message must be a{'n' if need_last[0] == 'a' else ''} "
                                            f"{need_last} turn")
        return system or DEFAULT_SYSTEM, messages

    # ------------------------------------------------------------------ ids, labels, audio items
    def _audio_item(self, entry: dict, base_dir: Path, i: int) -> AudioItem:
        token = entry.get("token") or ""
        if not token:
            raise RecordError("bad speech tokens", f"audio {i}: empty \"token\" string (run `funaudiochat data "
                                                   f"prepare` to tokenize assistant audio)")
        try:
            speech = parse_speech_tokens(token, self.cfg)
        except RecordError as err:
            raise RecordError(err.kind, f"audio {i}: {err}") from None
        pad = self.cfg.audio_config.pad_token_id
        if speech and all(s == pad for s in speech):  # user audio: the placeholders this model gives it, as the
            speech = [pad] * user_audio_tokens(len(speech), self.cfg)  # engine does (engine/prompt.py)
        text = entry.get("text") or ""
        if not isinstance(text, str):
            raise RecordError("bad format", f"audio {i}: text must be a string")
        wav = None
        path = entry.get("path") or entry.get("wav_path") or ""
        if path and not is_assistant_speech(token):
            wav = str(path if Path(path).is_absolute() else base_dir / path)
            if self.check_files and not Path(wav).is_file():
                raise RecordError("missing file", f"audio {i}: {wav}: no such file")
        if is_assistant_speech(token) and not text.strip():
            raise RecordError("empty text", f"audio {i}: assistant speech without its text")
        text_ids = np.asarray(self.tok.encode(text) if text else [], dtype=np.int64)
        if entry.get("text_at") is not None:
            text_ids = self._laid_out(text_ids, entry["text_at"], i)
        return AudioItem(np.asarray(speech, dtype=np.int64), text_ids, wav)

    def _laid_out(self, text_ids: np.ndarray, text_at, i: int) -> np.ndarray:
        """Text ids placed on the groups holding the speech tokens `text_at` names (one per id), `<|sil|>` on the
        other groups."""
        if not (isinstance(text_at, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in text_at)):
            raise RecordError("bad format", f"audio {i}: text_at must be a list of integers")
        if len(text_at) != len(text_ids):
            raise RecordError("bad format", f"audio {i}: text_at has {len(text_at)} entries for "
                                            f"{len(text_ids)} text tokens")
        groups = [t // self.k for t in text_at]
        if groups and (min(text_at) < 0 or any(b <= a for a, b in zip(groups, groups[1:]))):
            raise RecordError("bad format", f"audio {i}: text_at must be 0 or more and put each text token on a "
                                            f"later group of {self.k} speech tokens than the one before")
        if self.tok.special.sil is None:
            raise RecordError("bad format", f"audio {i}: text_at needs a <|sil|> token in the vocabulary")
        out = np.full(groups[-1] + 1 if groups else 0, self.tok.special.sil, dtype=np.int64)
        out[groups] = text_ids
        return out

    def _build(self, system: str, messages: list[dict], entries: list[dict], base_dir: Path, source: str) -> Sample:
        n_slots = sum(m["content"].count(AUDIO_TEMPLATE) for m in messages)
        if n_slots != len(entries):
            raise RecordError("bad format", f"{n_slots} audio placeholder(s) {AUDIO_TEMPLATE} in the messages but "
                                            f"{len(entries)} audio entr{'y' if len(entries) == 1 else 'ies'}")
        audios = [self._audio_item(e, base_dir, i) for i, e in enumerate(entries)]
        groups = iter([-(-len(a.speech_ids) // self.k) for a in audios])
        pieces = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
        for m in messages:
            parts = m["content"].split(AUDIO_TEMPLATE)
            content = parts[0] + "".join(AUDIO_BOS + AUDIO * next(groups) + AUDIO_EOS + p for p in parts[1:])
            if m["role"] == "user":
                pieces.append((f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", False))
            else:
                pieces.append((f"{content}<|im_end|>\n", True))
        ids, labels = [], []
        for text, trained in pieces:  # each piece is encoded on its own, as LLaMA-Factory does
            piece = self.tok.encode(text)
            ids += piece
            labels += piece if trained else [self.ignore] * len(piece)
        if len(ids) > self.max_len:
            raise RecordError("too long", f"{len(ids)} tokens, longer than the context (data.max_len={self.max_len})")
        sample = Sample(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), audios, source)
        self._count_targets(sample)
        return sample

    def _count_targets(self, s: Sample) -> None:
        """How many text and speech targets the model's rewritten labels hold (SPEC §6.2), checking that every
        run of <|AUDIO|> matches its audio's group count."""
        sp, k = self.tok.special, self.k
        audio = s.input_ids == sp.audio
        starts = np.flatnonzero(audio & ~np.concatenate([[False], audio[:-1]]))
        ends = np.flatnonzero(audio & ~np.concatenate([audio[1:], [False]])) + 1
        if len(starts) != len(s.audios):
            raise RecordError("bad format", f"found {len(starts)} runs of {AUDIO} for {len(s.audios)} audios "
                                            f"(is {AUDIO} written outside the audio template?)")
        trained = s.labels != self.ignore
        n_text = int((trained & ~audio).sum())
        n_speech = k * int((trained & (s.input_ids == sp.audio_eos)).sum())
        for a, start, end in zip(s.audios, starts, ends):
            if end - start != -(-len(a.speech_ids) // k):
                raise RecordError("bad format", f"an audio of {len(a.speech_ids)} speech tokens needs "
                                                f"{-(-len(a.speech_ids) // k)} {AUDIO}, found {end - start}")
            if trained[start]:
                n_speech += len(a.speech_ids)
                n_text += (end - start) if len(a.text_ids) else 0
        s.n_text_targets, s.n_speech_targets = n_text, n_speech


def audio_entries(record: dict) -> list[dict]:
    """The record's `audio` list (JSON strings, as released, or objects) as dicts."""
    raw = record.get("audio", record.get("audios", []))
    if not isinstance(raw, list):
        raise RecordError("bad format", f"\"audio\" must be a list, got {type(raw).__name__}")
    entries = []
    for i, e in enumerate(raw):
        if isinstance(e, str):
            try:
                e = json.loads(e)
            except json.JSONDecodeError as err:
                raise RecordError("bad format", f"audio {i}: not a JSON string ({err.msg})") from None
        if not isinstance(e, dict) or not isinstance(e.get("token", ""), str):
            raise RecordError("bad format", f"audio {i}: expected an object with \"path\", \"text\", \"token\"")
        entries.append(e)
    return entries


def typed_record(record: dict) -> dict | None:
    """The record with each spoken user turn written out as its script (`ref_text`), or None where that does not
    make the same conversation typed: an ASR record (its answer is the script itself), an answer spoken as speech
    tokens, a user turn mixing speech and text, or a script missing."""
    if record.get("task") == "asr":
        return None
    entries = iter(audio_entries(record))
    messages = []
    for m in record.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, str) or AUDIO_TEMPLATE not in content:
            messages.append(m)
            continue
        if m.get("role") != "user" or content.strip() != AUDIO_TEMPLATE:
            return None
        script = (next(entries, None) or {}).get("ref_text")
        if not isinstance(script, str) or not script.strip():
            return None
        messages.append({**m, "content": script.strip()})
    if messages == record.get("messages"):
        return None  # nothing was spoken
    return {**{k: v for k, v in record.items() if k not in ("audio", "audios")}, "messages": messages}


def _same_audio(a: Sample, b: Sample) -> bool:
    return len(a.audios) == len(b.audios) and all(
        np.array_equal(x.speech_ids, y.speech_ids) and np.array_equal(x.text_ids, y.text_ids)
        for x, y in zip(a.audios, b.audios))


def _short(obj, n: int = 80) -> str:
    text = json.dumps(obj, ensure_ascii=False) if not isinstance(obj, str) else obj
    return text if len(text) <= n else text[:n] + "..."


def read_jsonl(path: Path) -> Iterator[tuple[int, dict | RecordError]]:
    """(line number, record) per non-blank line; a line that is not UTF-8 or not a JSON object yields a
    RecordError (so `on_error=skip` skips just that line)."""
    for line_no, record in fileio.read_jsonl(path):
        yield line_no, RecordError(record.kind, record.message) if isinstance(record, fileio.LineProblem) else record


def load_records(paths: list[str | Path], build, on_error: str = "skip") -> tuple[list, DataReport]:
    """Read JSONL files with `build(record, base_dir, source)`; malformed records are reported with their line
    numbers and skipped (`on_error="skip"`) or stop the run (`"reject"`, raises InputError)."""
    items, report = [], DataReport()
    for path in map(Path, paths):
        if not path.is_file():
            raise InputError(f"{path}: data file not found")
        for line_no, record in read_jsonl(path):
            report.read += 1
            source = f"{path}:{line_no}"
            try:
                if isinstance(record, RecordError):
                    raise record
                items.append(build(record, path.parent, source))
            except RecordError as err:
                if on_error == "reject":
                    raise InputError(f"{source}: {err} (set data.on_error=skip to skip such records)") from None
                report.problems.append(Problem(source, err.kind, str(err)))
    return items, report
