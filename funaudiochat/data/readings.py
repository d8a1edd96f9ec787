"""ASR targets the mini can copy: what its word reader reads from each train ASR clip.

The mini hears through Whisper's decoder (model/word_reader.py): the LLM gets the word pieces the reader read and,
for "Please help me transcribe the audio.", is to write them out. Trained against the clip's script, the LLM is
also taught to overrule the reader where the reader misheard ("Columbia" -> "Colombia"), and with its 135 M
parameters it learns to guess instead ("80 plus 81" read right, written "80 plus 80"). With the reading itself as
the target, the ASR task is a copy.

The readings are the LLM pieces the reader puts in the clip's slots (cut to the slots, as training and the engine
see them: word_reader.slot_rate sets how many), decoded with the LLM's tokenizer, by the checkpoint's reader in fp32
(one result on every CPU). They are written to a gzipped JSONL (`{"id", "reading"}` per ASR record; committed as
recipes/mini/data/readings.jsonl.gz, so no machine has to read the clips again) and applied to DATA/train.jsonl as
DATA/train_read.jsonl.
"""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import torch

from funaudiochat import fileio
from funaudiochat.errors import InputError
from funaudiochat.text.tokenizer import AUDIO_PAD

DEFAULT_READINGS = Path("recipes/mini/data/readings.jsonl.gz")


def asr_records(data_dir: Path, split: str = "train") -> list[dict]:
    """The ASR records of DATA/SPLIT.jsonl, as written."""
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no such split file (`funaudiochat data build-mini --out {data_dir}` writes it)")
    return [row for row in _records(path) if row.get("task") == "asr"]


def _records(path: Path):
    """The records of a build-mini JSONL file; a line that is not a JSON object stops with its line number."""
    for lineno, row in fileio.read_jsonl(path):
        if not isinstance(row, dict):
            raise InputError(f"{path}:{lineno}: {row}")
        yield row


def _clip(row: dict, data_dir: Path) -> tuple[Path, int]:
    """An ASR record -> (its wav, its placeholder speech tokens as written: 25 Hz)."""
    from funaudiochat.train.data import audio_entries

    entry = audio_entries(row)[0]
    return data_dir / entry["path"], entry["token"].count(AUDIO_PAD)


class Reader:
    """A checkpoint's word reader and encoder, reading clips into LLM text as the model sees it."""

    def __init__(self, model_dir: Path, slot_rate: float | None = None):
        from funaudiochat.audio.mel import WhisperFrontend
        from funaudiochat.model.checkpoint import load_model
        from funaudiochat.model.word_reader import set_reader_settings
        from funaudiochat.text.tokenizer import TextTokenizer

        self.model = load_model(model_dir).eval()
        if self.model.word_reader is None:
            raise InputError(f"{model_dir}: no word reader (audio_config.word_reader): nothing to read with")
        if slot_rate is not None:  # read for a model that gives the audio this many slots a second
            set_reader_settings(self.model, {**self.model.cfg.audio_config.word_reader, "slot_rate": slot_rate},
                                "--slot-rate")
        self.model.word_reader.set_compute_dtype("fp32")
        self.frontend = WhisperFrontend(self.model.cfg.audio_config.num_mel_bins)
        self.tokenizer = TextTokenizer.from_file(model_dir)

    @torch.no_grad()
    def read(self, wavs: list[Path], placeholders: list[int]) -> list[str]:
        """Clips and their placeholder counts (25 Hz) -> what the reader puts in each clip's slots, as text."""
        from funaudiochat.audio.io import load_audio
        from funaudiochat.engine.prompt import user_audio_tokens

        cfg = self.model.cfg
        n_groups = [math.ceil(user_audio_tokens(n, cfg) / cfg.audio_config.group_size) for n in placeholders]
        features, mask = self.frontend([load_audio(w) for w in wavs], padding="longest")
        dtype = next(self.model.continuous_audio_tower.parameters()).dtype
        pieces = self.model.word_reader.pieces(self.model.reader_memory(features.to(dtype), mask.sum(-1)), n_groups)
        return [self.tokenizer.decode(p.tolist()).strip() for p in pieces]


def read_train_clips(data_dir: Path, model_dir: Path, partial: Path, batch: int = 8, progress: bool = True,
                     slot_rate: float | None = None) -> dict[str, str]:
    """Every train ASR record's reading, appended to `partial` as it goes (a rerun reads only what is missing)."""
    from tqdm import tqdm

    rows = asr_records(data_dir)
    reader = Reader(model_dir, slot_rate)
    rate = reader.model.word_reader.cfg.slot_rate  # a partial run read at another rate does not count
    # a line cut by an interrupted write is not a reading: it is read again
    done = {r["id"]: r["reading"] for _, r in fileio.read_jsonl(partial)
            if isinstance(r, dict) and r.get("slot_rate") == rate} if partial.is_file() else {}
    todo = [r for r in rows if r["id"] not in done]
    if todo:
        if partial.is_file() and partial.stat().st_size and not partial.read_bytes().endswith(b"\n"):
            with partial.open("a") as out:  # the cut line ends here, so the next reading starts its own
                out.write("\n")
        with partial.open("a") as out, tqdm(total=len(rows), initial=len(rows) - len(todo), desc="readings",
                                            unit="clip", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(todo), batch):
                chunk = todo[start: start + batch]
                wavs, placeholders = zip(*(_clip(r, data_dir) for r in chunk))
                for row, text in zip(chunk, reader.read(list(wavs), list(placeholders))):
                    done[row["id"]] = text
                    out.write(json.dumps({"id": row["id"], "reading": text, "slot_rate": rate},
                                         ensure_ascii=False) + "\n")
                out.flush()
                bar.update(len(chunk))
    return {r["id"]: done[r["id"]] for r in rows}


def write_readings(readings: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) as f:
        for rid in sorted(readings):
            f.write(json.dumps({"id": rid, "reading": readings[rid]}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def load_readings(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise InputError(f"{path}: no readings (`funaudiochat data build-mini --stage readings --model "
                         f"checkpoints/mini` writes them)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {row["id"]: row["reading"] for row in map(json.loads, f)}


def apply_readings(data_dir: Path, readings: dict[str, str]) -> dict:
    """DATA/train.jsonl -> DATA/train_read.jsonl: each ASR record's answer is its reading (the script is kept in
    meta.transcript); records read as nothing are dropped. QA records are copied unchanged."""
    src, dst = data_dir / "train.jsonl", data_dir / "train_read.jsonl"
    counts = {"qa": 0, "asr": 0, "asr_dropped_empty": 0, "asr_differs_from_script": 0}
    tmp = dst.with_name(dst.name + ".tmp")
    with tmp.open("w") as out:
        for row in _records(src):
            if row.get("task") == "asr":
                if row["id"] not in readings:
                    raise InputError(f"{src}: ASR record {row['id']!r} has no reading (readings of "
                                     f"another data build? rerun `--stage readings`)")
                reading, script = readings[row["id"]], row["messages"][-1]["content"]
                if not reading:
                    counts["asr_dropped_empty"] += 1
                    continue
                counts["asr_differs_from_script"] += reading != script
                row = {**row, "messages": row["messages"][:-1] + [{"role": "assistant", "content": reading}],
                       "meta": {**(row.get("meta") or {}), "transcript": script}}
                counts["asr"] += 1
            else:
                counts["qa"] += 1
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(dst)
    return counts
