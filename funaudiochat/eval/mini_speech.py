"""fun-audio-chat-mini's speaking figures (issue 14 must-shows 2-4) on the S2S split that `data build-mini` wrote
(SPLIT_s2s.jsonl: spoken questions whose answers are spoken in the Piper voice, plus "slower / faster / louder /
quieter" variants of some of them).

    speech_wer   the ASR judge's transcript of the spoken answer against the model's own text stream (corpus WER)
    ends         where the speech stops against where the voice would stop saying the text: |difference| <= 1 s;
                 shorter is "truncated", longer "runaway" (both on the tokens: a Piper token is 40 ms of the voice)
    latency      the call with the finished question -> first audio sample (features, prefill, the steps until
                 the streaming detokenizer's first chunk), p50 / p95
    rtf          seconds to produce the whole answer / its audio seconds, p50 / p95
    instructions speaking rate (phonetic units per second of speech, on the tokens) of a "slower" / "faster"
                 answer against the plain answer to the same question: changed by >= 20 % the asked way; the
                 level (RMS of the voiced audio) of a "louder" / "quieter" answer: >= 3 dB the asked way

Speech is sampled with the released S2S preset (speech temperature 0.8, top-p 0.9, repetition penalty 1.2), seeded
per record, so a rerun gives the same answers. Text is greedy, as released.
"""
from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from funaudiochat import fileio
from funaudiochat.audio.io import load_audio
from funaudiochat.errors import InputError
from funaudiochat.eval.asr import error_rates
from funaudiochat.eval.mini import fmt_beside, percentile, spoken_messages, summary_row, summary_table
from funaudiochat.eval.normalize import normalize_english
from funaudiochat.speech.piper_tokens import SILENT_UNITS, TOKEN_RATE, repair_tokens, unit_spans
from funaudiochat.text.tokenizer import AUDIO_TEMPLATE

log = logging.getLogger(__name__)

RATE = 16000  # user audio
TARGETS = {"speech_wer": 0.08, "end_within_s": 1.0, "latency_p50_s": 0.5, "rtf": 0.5, "rate_change": 0.2,
           "level_change_db": 3.0, "instruction_share": 0.9}
INSTRUCTIONS = ("slower", "faster", "louder", "quieter")
GAP_HEARD_S = 0.02  # playback gaps shorter than this are not counted (the hand-over between threads alone takes ms)


# ---------------------------------------------------------------------------------------------------- records
@dataclass
class SpokenRecord:
    id: str
    system: str
    messages: list[dict]       # up to the last user turn; earlier spoken answers given as their text
    wavs: list[Path]           # one per spoken user turn
    answer: str                # the reference answer's text (what the training data spoke)
    instruction: str | None    # slower | faster | louder | quieter | None

    @property
    def question_id(self) -> str:
        """The plain record this one varies (itself when it has no instruction)."""
        return self.id[: -len(self.instruction) - 1] if self.instruction else self.id


def read_s2s_split(data_dir: str | Path, split: str, limit: int | None = None, ids: list[str] | None = None,
                   variants: bool = True) -> list[SpokenRecord]:
    """DATA/SPLIT_s2s.jsonl: the first `limit` plain records (of those named in `ids`, when given), and the
    instruction variants of those questions unless `variants` is false."""
    path = Path(data_dir) / f"{split}_s2s.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no such file (`funaudiochat data build-mini --out {data_dir} --stage speech` "
                         f"writes the spoken-answer splits)")
    records = []
    for lineno, row in fileio.read_jsonl(path):
        try:
            records.append(_spoken_record(row, path.parent))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(f"{path}:{lineno}: not a build-mini S2S record ({err!r})") from None
    plain = [r.id for r in records if r.instruction is None]
    if ids is not None:
        wanted = set(ids)
        missing = sorted(wanted - set(plain))
        if missing:
            raise InputError(f"{path}: no plain records with the ids {', '.join(missing[:5])}")
        plain = [i for i in plain if i in wanted]
    keep = set(plain[:limit])
    picked = [r for r in records if r.question_id in keep and (variants or r.instruction is None)]
    if not picked:
        raise InputError(f"{path}: no records")
    return picked


def _spoken_record(row: dict, folder: Path) -> SpokenRecord:
    meta = row.get("meta") or {}
    meta = json.loads(meta) if isinstance(meta, str) else meta
    instruction = meta.get("speech_instruction")
    if instruction is not None and instruction not in INSTRUCTIONS:
        raise ValueError(f"speech_instruction {instruction!r}")
    entries = [json.loads(e) if isinstance(e, str) else e for e in row["audio"]]
    messages, wavs, answers, used = [], [], [], 0
    for m in row["messages"]:
        content = m["content"]
        n = content.count(AUDIO_TEMPLATE)
        mine, used = entries[used:used + n], used + n
        if m["role"] == "user":
            wavs += [folder / e["path"] for e in mine]
        elif n:  # a spoken answer: its text
            content = " ".join(e["text"] for e in mine)
        answers.append(content)
        messages.append({"role": m["role"], "content": content})
    if not messages or messages[-1]["role"] != "assistant" or not wavs:
        raise ValueError("expected spoken user turn(s) and an assistant answer last")
    return SpokenRecord(id=str(row["id"]), system=row.get("system") or "", messages=messages[:-1], wavs=wavs,
                        answer=answers[-1], instruction=instruction)


# ---------------------------------------------------------------------------------------------------- measures
def speech_seconds(codes) -> float:
    """Seconds of tokens up to the end of the last phonetic unit (trailing pauses and sentence marks not counted)."""
    spans = unit_spans(repair_tokens(codes))
    ends = [s.end for s in spans if s.unit not in SILENT_UNITS]
    return (ends[-1] if ends else 0) / TOKEN_RATE


def speaking_rate(codes) -> float | None:
    """Phonetic units per second of their own tokens (pauses and sentence marks left out): the rate the voice
    speaks at, whatever the answer says. None without any phonetic unit."""
    spans = [s for s in unit_spans(repair_tokens(codes)) if s.unit not in SILENT_UNITS]
    tokens = sum(s.end - s.start for s in spans)
    return len(spans) * TOKEN_RATE / tokens if tokens else None


def playback_gap(arrivals: list[tuple[float, float]]) -> float:
    """Silence a listener hears inside an answer played in real time from its first sample: chunks (arrival time,
    seconds of audio), in order; a chunk that arrives after the audio before it has played adds the wait."""
    gap, played = 0.0, arrivals[0][0] if arrivals else 0.0
    for at, seconds in arrivals:
        gap += max(0.0, at - played)
        played = max(played, at) + seconds
    return gap


def voiced_level_db(audio: np.ndarray, sample_rate: int, floor_db: float = 30.0) -> float | None:
    """RMS level (dBFS) of the 20 ms frames within `floor_db` of the loudest one (the voiced part)."""
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    hop = max(1, sample_rate // 50)
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
    if not len(frames):
        return None
    power = (frames ** 2).mean(axis=1)
    if power.max() <= 0:
        return None
    voiced = power[power >= power.max() * 10 ** (-floor_db / 10)]
    return float(10 * np.log10(voiced.mean()))


def followed(instruction: str, plain: dict, varied: dict) -> tuple[bool, float | None]:
    """Did the varied answer follow its instruction against the plain one? (verdict, measured change: the rate
    ratio for slower / faster, the level difference in dB for louder / quieter)."""
    if instruction in ("slower", "faster"):
        a, b = plain["rate"], varied["rate"]
        if not a or not b:
            return False, None
        change = b / a
        ok = change <= 1 - TARGETS["rate_change"] if instruction == "slower" else change >= 1 + TARGETS["rate_change"]
        return bool(ok), change
    a, b = plain["level_db"], varied["level_db"]
    if a is None or b is None:
        return False, None
    change = b - a
    ok = change >= TARGETS["level_change_db"] if instruction == "louder" else change <= -TARGETS["level_change_db"]
    return bool(ok), change


# ---------------------------------------------------------------------------------------------------- the model
class Speaker:
    """Spoken answers of one checkpoint through its streaming detokenizer, timed."""

    def __init__(self, model_dir: str | Path, max_new_tokens: int = 400, hop: int = 15, compile: bool = False,
                 allow_untrained: bool = False, detokenizer: str | Path | None = None, follow_text: bool = True,
                 dtype: str | None = None, decode_weights: str = "fp32"):
        from funaudiochat.engine.inputs import check_trained
        from funaudiochat.engine.loading import load_runtime
        from funaudiochat.engine.presets import generation_preset

        rt = load_runtime(model_dir, dtype=dtype, speech=True, compile=compile, detokenizer_dir=detokenizer,
                          decode_weights=decode_weights)
        if rt.detokenizer is None:
            raise InputError(f"{model_dir}: no detokenizer (a speaking mini checkpoint holds detokenizer.json; "
                             f"for a training checkpoint pass --detokenizer, e.g. a folder holding one)")
        self.engine, self.tokenizer, self.detok = rt.engine, rt.tokenizer, rt.detokenizer
        self.gen = generation_preset("s2s", self.tokenizer, self.engine.cfg, max_new_tokens=max_new_tokens,
                                     speech_follows_text=follow_text)
        self.hop = hop
        if not check_trained(self.engine.cfg, True, True, allow_untrained):
            raise InputError("this checkpoint's speech head was never trained (config.json: trained.speaking); "
                             "--allow-untrained measures it anyway")

    def _prefill(self, prompt, messages: list[dict], gen):
        """The prompt's prefill as `chat` and `serve` start it: the keys and values of the system turn and the user
        turn's opening are computed once per engine (the first question saves them) and copied into every later
        prompt (`engine.prefixes`, `prefix_cache.shared_prefix`)."""
        from funaudiochat.engine.prefix_cache import shared_prefix

        ids = prompt.input_ids[0].tolist()
        prefix, save = shared_prefix(self.engine, self.tokenizer, messages[0], ids, True) if messages else (None, 0)
        return self.engine.start_prefill(prompt, self.engine.usable(gen), prefix=prefix, save_prefix=save)

    def speak(self, rec: SpokenRecord) -> dict:
        from funaudiochat.engine.events import AudioChunk, TurnEnd, stream_turn
        from funaudiochat.engine.prompt import build_prompt

        audios = [load_audio(p, RATE) for p in rec.wavs]
        messages = spoken_messages(rec)
        gen = self.gen.with_(seed=zlib.crc32(rec.id.encode()))
        t0 = time.perf_counter()
        prompt = build_prompt(self.tokenizer, self.engine.cfg, messages, audios)
        job = self._prefill(prompt, messages, gen)
        features_s = time.perf_counter() - t0
        end, arrivals = None, []
        for event in stream_turn(self.engine, prompt, gen, self.tokenizer, self.detok.stream(hop=self.hop),
                                 prefill=job):
            if isinstance(event, AudioChunk):
                arrivals.append((time.perf_counter() - t0, len(event.samples) / event.sample_rate))
            elif isinstance(event, TurnEnd):
                end = event
        if job.saved_prefix is not None:
            self.engine.prefixes.put(job.saved_prefix)
        audio = end.audio if end.audio is not None else np.zeros(0, dtype=np.float32)
        seconds = len(audio) / self.detok.sample_rate
        first = end.usage.first_audio_s
        return {"text": end.text.strip(), "codes": list(end.speech_codes), "audio": audio,
                "finish_reason": end.finish_reason, "audio_s": seconds,
                "first_audio_s": None if first is None else features_s + first, "gap_s": playback_gap(arrivals),
                "rtf": (features_s + end.usage.total_s) / seconds if seconds else None}


# ---------------------------------------------------------------------------------------------------- the report
def evaluate_speech(model: str | Path, data: str | Path, split: str = "test", limit: int | None = None,
                    judge: bool = True, max_new_tokens: int = 400, compiled: bool = False,
                    allow_untrained: bool = False, progress: bool = False, audio_dir: str | Path | None = None,
                    detokenizer: str | Path | None = None, follow_text: bool = True, ids: list[str] | None = None,
                    variants: bool = True, dtype: str | None = None, decode_weights: str = "fp32") -> dict:
    from funaudiochat.speech.piper_tokens import PiperTokenizer

    records = read_s2s_split(data, split, limit, ids, variants)
    me = Speaker(model, max_new_tokens, compile=compiled, allow_untrained=allow_untrained, detokenizer=detokenizer,
                 follow_text=follow_text, dtype=dtype, decode_weights=decode_weights)
    voice = PiperTokenizer()
    asr = None
    if judge:
        from funaudiochat.eval.asr import AsrJudge

        asr = AsrJudge()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(records, desc="eval mini-speech", unit="answer", dynamic_ncols=True)
    items, answers = {}, {}
    for rec in bar if bar is not None else records:
        out = me.speak(rec)
        item = {"id": rec.id, "question_id": rec.question_id, "instruction": rec.instruction,
                "reference": rec.answer, "text": out["text"],
                "finish_reason": out["finish_reason"], "audio_s": out["audio_s"],
                "first_audio_s": out["first_audio_s"], "gap_s": out["gap_s"], "rtf": out["rtf"],
                "codes": [int(c) for c in out["codes"]],  # kept so a report can be re-scored and read
                "rate": speaking_rate(out["codes"]), "speech_s": speech_seconds(out["codes"]),
                "level_db": voiced_level_db(out["audio"], me.detok.sample_rate)}
        try:
            item["text_speech_s"] = speech_seconds(voice.tokenize(out["text"])) if out["text"] else 0.0
        except InputError:  # a text with nothing to say (no words): nothing should be spoken
            item["text_speech_s"] = 0.0
        if asr is not None:
            answers[rec.id] = out["audio"]
        if audio_dir is not None:
            from funaudiochat.audio.io import save_wav

            save_wav(Path(audio_dir) / f"{rec.id}.wav", out["audio"], me.detok.sample_rate)
        items[rec.id] = item

    for rec_id, audio in answers.items():  # judged after all answers are made: its threads never share their timing
        items[rec_id]["transcript"] = asr.transcribe(audio, me.detok.sample_rate) if audio.size else ""
    plain = [i for i in items.values() if i["instruction"] is None]
    report: dict = {"model": str(model), "dtype": dtype or "as stored", "decode_weights": decode_weights,
                    "data": str(data), "split": split,
                    "limit": limit, "speech_follows_text": follow_text,
                    "counts": {"plain": len(plain), "instructions": len(items) - len(plain)}, "targets": TARGETS}
    if asr is not None:
        pairs = [(normalize_english(i["text"]), normalize_english(i["transcript"])) for i in plain]
        pairs = [(r, h) for r, h in pairs if r]
        report["speech_wer"] = error_rates([r for r, _ in pairs], [h for _, h in pairs])[0] if pairs else None
    diffs = [i["speech_s"] - i["text_speech_s"] for i in plain]
    report["ends"] = {"within": sum(abs(d) <= TARGETS["end_within_s"] for d in diffs),
                      "truncated": sum(d < -TARGETS["end_within_s"] for d in diffs),
                      "runaway": sum(d > TARGETS["end_within_s"] for d in diffs), "n": len(diffs),
                      "median_difference_s": percentile(diffs, 50)}
    firsts = [i["first_audio_s"] for i in plain if i["first_audio_s"] is not None]
    rtfs = [i["rtf"] for i in plain if i["rtf"] is not None]
    gaps = [i["gap_s"] for i in plain if i["first_audio_s"] is not None]
    report["latency"] = {"mode": "compiled" if compiled else "eager", "n": len(firsts),
                         "p50_s": percentile(firsts, 50), "p95_s": percentile(firsts, 95)}
    report["gaps"] = {"n": len(gaps), "with_gap": sum(g > GAP_HEARD_S for g in gaps), "p95_s": percentile(gaps, 95),
                      "max_s": max(gaps, default=None)}
    report["rtf"] = {"n": len(rtfs), "p50": percentile(rtfs, 50), "p95": percentile(rtfs, 95)}
    report["instructions"] = {}
    for name in INSTRUCTIONS:
        verdicts = []
        for i in items.values():
            if i["instruction"] == name and i["question_id"] in items:
                ok, change = followed(name, items[i["question_id"]], i)
                i["change"] = change
                verdicts.append(ok)
        if verdicts:
            report["instructions"][name] = {"n": len(verdicts), "followed": sum(verdicts) / len(verdicts)}
    report["items"] = list(items.values())
    report["summary"] = summary(report)
    return report


def summary(report: dict) -> list[dict]:
    """One row per speaking figure."""
    rows = []

    def row(*args):
        rows.append(summary_row(*args))

    if "speech_wer" in report:
        w = report["speech_wer"]
        row("speech WER vs own text", w, "ASR judge: faster-whisper tiny.en", f"<= {TARGETS['speech_wer']}",
            w is not None and w <= TARGETS["speech_wer"])
    e = report["ends"]
    share = e["within"] / e["n"] if e["n"] else None
    row("speech ends within 1 s of the text", share, f"truncated {e['truncated']}, runaway {e['runaway']}", "1.0",
        share == 1.0)
    lat = report["latency"]
    row(f"first audio p50 ({lat['mode']}), s", lat["p50_s"], fmt_beside(lat["p95_s"], "p95"),
        f"<= {TARGETS['latency_p50_s']}", lat["p50_s"] is not None and lat["p50_s"] <= TARGETS["latency_p50_s"])
    r = report["rtf"]
    row("answer RTF p50", r["p50"], fmt_beside(r["p95"], "p95"), f"<= {TARGETS['rtf']}",
        r["p50"] is not None and r["p50"] <= TARGETS["rtf"])
    g = report.get("gaps")
    if g and g["n"]:  # (reported; the issue sets no bar)
        rows.append({"figure": f"answers with a playback gap > {GAP_HEARD_S * 1e3:.0f} ms",
                     "value": g["with_gap"] / g["n"], "beside": f"gap p95 {g['p95_s']:.3f} s, longest "
                     f"{g['max_s']:.3f} s", "target": "", "pass": None})
    for name, s in report["instructions"].items():
        row(f"'{name}' followed", s["followed"], f"{s['n']} items", f">= {TARGETS['instruction_share']}",
            s["followed"] >= TARGETS["instruction_share"])
    return rows


def markdown(report: dict) -> str:
    c = report["counts"]
    weights = report.get("dtype", "as stored")
    if report.get("decode_weights", "fp32") != "fp32":
        weights += f", {report['decode_weights']} decode weights"
    return summary_table(f"# fun-audio-chat-mini speaking: {report['model']} ({weights}) on "
                         f"{report['data']} ({report['split']}: "
                         f"{c['plain']} questions, {c['instructions']} instruction variants)", report["summary"])
