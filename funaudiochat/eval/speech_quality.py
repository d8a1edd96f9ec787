"""Speech quality of spoken (S2S) answers: does the speech say its own text, how fast, how long, how loud, how high,
and does it follow a requested speaking style.

Per answer (a wav and the answer's text):
- `wer`: the ASR judge (Whisper tiny.en, `funaudiochat.eval.asr`) transcribes the speech; WER against the answer's
  own text, both through the Whisper English normaliser.
- `duration_s`; `speech_s`: the active part (20 ms frames within 35 dB of the loudest frame and above -60 dBFS);
  `words_per_s`: the text's words (normalised) per second of active speech.
- `rms_dbfs`: RMS level of the whole file; `loudness_db`: a LUFS-like level, the BS.1770 gating (400 ms blocks
  with 75 % overlap, an absolute gate at -70 dB, then a relative gate 10 dB under the mean of the blocks kept) on
  the plain (not K-weighted) signal, in dB re full scale.
- `f0_hz`: median F0 of the active frames (YIN, 60-500 Hz).

Style check: an item that asks for a style (`style`: {"speed": "fast"|"slow", "volume": "loud"|"quiet",
"pitch": "high"|"low"}) names the item that asks the same without a style (`neutral`); the measured value is
compared with the neutral answer's: speed passes at a words/s ratio >= 1.1 (fast) or <= 1/1.1 (slow), volume at
a loudness difference >= +3 dB or <= -3 dB, pitch at >= +1 or <= -1 semitone.
"""
from __future__ import annotations

import math

import numpy as np

from funaudiochat.eval.normalize import normalize_english

FRAME_S = 0.02
ACTIVE_RANGE_DB = 35.0
SILENCE_DBFS = -60.0
SPEED_RATIO = 1.1
VOLUME_DB = 3.0
PITCH_SEMITONES = 1.0
STYLES = {"speed": ("fast", "slow"), "volume": ("loud", "quiet"), "pitch": ("high", "low")}


def _db(power: float) -> float:
    return 10 * math.log10(max(power, 1e-12))


def _frame_power(wav: np.ndarray, rate: int, frame_s: float, hop_s: float) -> np.ndarray:
    frame, hop = max(1, int(rate * frame_s)), max(1, int(rate * hop_s))
    if len(wav) < frame:
        return np.array([float(np.mean(wav ** 2))]) if len(wav) else np.zeros(0)
    starts = range(0, len(wav) - frame + 1, hop)
    return np.array([float(np.mean(wav[s:s + frame] ** 2)) for s in starts])


def active_mask(wav: np.ndarray, rate: int) -> np.ndarray:
    """One bool per 20 ms frame: speech (within ACTIVE_RANGE_DB of the loudest frame and above SILENCE_DBFS)."""
    levels = np.array([_db(p) for p in _frame_power(wav, rate, FRAME_S, FRAME_S)])
    if not len(levels):
        return np.zeros(0, dtype=bool)
    return (levels > levels.max() - ACTIVE_RANGE_DB) & (levels > SILENCE_DBFS)


def gated_loudness(wav: np.ndarray, rate: int) -> float | None:
    """BS.1770-style gated level (dB re full scale) of the unweighted signal; None for silence."""
    blocks = _frame_power(wav, rate, 0.4, 0.1)
    kept = blocks[[_db(p) > -70.0 for p in blocks]] if len(blocks) else blocks
    if not len(kept):
        return None
    relative = _db(float(np.mean(kept))) - 10.0
    kept = kept[[_db(p) > relative for p in kept]]
    return _db(float(np.mean(kept)))


def median_f0(wav: np.ndarray, rate: int, mask: np.ndarray) -> float | None:
    """Median YIN F0 (Hz) over the active frames; None when there are none."""
    import librosa

    if len(wav) < int(0.1 * rate) or not mask.any():
        return None
    hop = int(rate * FRAME_S)
    f0 = librosa.yin(wav.astype(np.float32), fmin=60, fmax=500, sr=rate, frame_length=4 * hop, hop_length=hop)
    keep = mask[:len(f0)] if len(mask) >= len(f0) else np.pad(mask, (0, len(f0) - len(mask)))
    values = f0[keep[:len(f0)]]
    return float(np.median(values)) if len(values) else None


def measure(wav: np.ndarray, rate: int, text: str) -> dict:
    """Duration, active speech, words/s, levels and F0 of one spoken answer (no ASR)."""
    wav = np.asarray(wav, dtype=np.float64).reshape(-1)
    mask = active_mask(wav, rate)
    speech_s = float(mask.sum()) * FRAME_S
    words = len(normalize_english(text).split())
    return {"duration_s": len(wav) / rate, "speech_s": speech_s, "words": words,
            "words_per_s": words / speech_s if speech_s > 0 and words else None,
            "rms_dbfs": _db(float(np.mean(wav ** 2))) if len(wav) else None,
            "loudness_db": gated_loudness(wav, rate), "f0_hz": median_f0(wav, rate, mask)}


def style_checks(style: dict, measured: dict, neutral: dict) -> dict:
    """{aspect: {"requested", "ratio" / "difference_db" / "semitones", "pass"}} of a styled answer vs its neutral one;
    an aspect that cannot be measured on either answer gets pass None."""
    checks = {}
    for aspect, requested in style.items():
        if aspect not in STYLES or requested not in STYLES[aspect]:
            raise ValueError(f"unknown style {aspect}={requested!r}; known: {STYLES}")
        up = requested == STYLES[aspect][0]
        check = {"requested": requested, "pass": None}
        if aspect == "speed" and measured.get("words_per_s") and neutral.get("words_per_s"):
            ratio = measured["words_per_s"] / neutral["words_per_s"]
            check.update(ratio=ratio, **{"pass": ratio >= SPEED_RATIO if up else ratio <= 1 / SPEED_RATIO})
        elif aspect == "volume" and measured.get("loudness_db") is not None and neutral.get("loudness_db") is not None:
            diff = measured["loudness_db"] - neutral["loudness_db"]
            check.update(difference_db=diff, **{"pass": diff >= VOLUME_DB if up else diff <= -VOLUME_DB})
        elif aspect == "pitch" and measured.get("f0_hz") and neutral.get("f0_hz"):
            semitones = 12 * math.log2(measured["f0_hz"] / neutral["f0_hz"])
            check.update(semitones=semitones,
                         **{"pass": semitones >= PITCH_SEMITONES if up else semitones <= -PITCH_SEMITONES})
        checks[aspect] = check
    return checks


def summarize(records: list[dict]) -> dict:
    """Corpus WER (percent) over the measured answers with text, means of the measures, style pass rate."""
    from funaudiochat.eval.asr import error_rates

    ok = [r for r in records if "error" not in r]
    summary = {"items": len(records), "scored": len(ok), "failed": len(records) - len(ok)}
    pairs = [(r["reference"], r["hypothesis"]) for r in ok if r.get("reference")]
    if pairs:
        wer, cer = error_rates([p[0] for p in pairs], [p[1] for p in pairs])
        summary.update(wer=100 * wer, cer=100 * cer)
    for key in ("duration_s", "words_per_s", "loudness_db", "rms_dbfs", "f0_hz"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            summary[f"mean_{key}"] = float(np.mean(values))
    checks = [c["pass"] for r in ok for c in r.get("style", {}).values() if c["pass"] is not None]
    summary["style_checks"] = len(checks)
    if checks:
        summary["style_pass"] = 100.0 * sum(checks) / len(checks)
    return summary


def score(answers: list[dict], judge) -> tuple[list[dict], dict]:
    """Score spoken answers. `answers`: {"id", "text", and "wav" + "rate", or "error"; optional "style",
    "neutral"}; `judge`: an AsrJudge (or anything with transcribe(wav, rate)). Returns (records, summary)."""
    from funaudiochat.eval.asr import error_rates

    records, measured = [], {}
    for answer in answers:
        record = {"id": answer["id"]}
        if "error" in answer:
            record["error"] = answer["error"]
        else:
            record.update(measure(answer["wav"], answer["rate"], answer["text"]))
            hypothesis = judge.transcribe(answer["wav"], answer["rate"])
            reference = normalize_english(answer["text"])
            record.update(reference=reference, hypothesis=normalize_english(hypothesis), asr=hypothesis)
            record["wer"] = error_rates([reference], [record["hypothesis"]])[0] if reference else None
            measured[answer["id"]] = record
        records.append(record)
    for answer, record in zip(answers, records):
        if "error" in record or not answer.get("style"):
            continue
        neutral = measured.get(answer.get("neutral"))
        if neutral is None:
            record["style"] = {k: {"requested": v, "pass": None, "note": "no neutral answer"}
                               for k, v in answer["style"].items()}
        else:
            record["style"] = style_checks(answer["style"], record, neutral)
    return records, summarize(records)
