"""fun-audio-chat-mini's data, built here end to end (`funaudiochat data build-mini`; issue 12, MINI.md).

Text stage (the LLM, slow; its output is committed under recipes/mini/data/ so the audio stage never needs it):
the question set of `mini_questions` (deterministic from the seed) is answered GREEDILY by the base
SmolLM2-135M-Instruct through our engine (`distill.Distiller`) under `MINI_SYSTEM`, a follow-up's second turn with
the first turn and its answer as history. Degenerate answers (empty, unfinished, too long, refusal, repetition:
distill's filters) drop train and dev items; test items are all kept, with the reason, so that accuracy from
speech and from text are measured on the same items. Each item records the base model's typed answer and, where
there is a gold answer, its verdict. ASR items ("Please help me transcribe the audio.") take clean first
sentences of the answers as transcripts. Output: one gzipped JSONL (TEXT) and TEXT's .meta.json.

Audio stage (no LLM): every user turn is spoken by a voice of its split's pool (`VOICES`: Piper joe variants and
espeak-ng voices; test and dev voices are never used in train), augmented in train/dev (volume, noise at 5-20 dB
SNR, reverberation, telephone band), and judged by the ASR judge: a clip whose WER against its text is above
`max_wer` is dropped with the reason and tried again in up to `RETRIES` other voices of its split (an item whose
clip fails in every voice is dropped). The test split also gets robustness copies of every clip, in the voice it
was kept in (10 dB SNR, telephone band; kept whatever their WER, which is recorded). Outputs under OUT:
audio/SPLIT/*.wav, clips.jsonl (the journal: every clip, kept or not), manifest.jsonl (sha256 of every kept wav) and manifest.sha256
(one hash over the set), the training records train/dev/test(_snr10|_phone).jsonl that `funaudiochat train`
reads, and summary.json.

Speech stage (issue 14; no LLM, no audio): every QA record of train/dev/test is turned into its S2S record, the
assistant answers spoken in the mini's voice as 25 Hz Piper tokens aligned to the text stream (`spoken_answers`).
Every `INSTRUCTION_EVERY`-th record also gets a speech-instruction variant (slower / faster / louder / quieter, one
drawn per train/dev record; all four for a test record). Outputs OUT/{train,dev,test}_s2s.jsonl, speech.json and
OUT/{split}_s2s_style.jsonl (the variants with their plain records).

Resumable everywhere: the distiller skips answered questions, the audio journal skips clips already made, and the
records, manifest and summary are rewritten from those files at the end of each run.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from funaudiochat import fileio
from funaudiochat.data import distill, mini_questions
from funaudiochat.errors import InputError
from funaudiochat.text.chat import ASR_INSTRUCTION
from funaudiochat.text.tokenizer import AUDIO_PAD, AUDIO_TEMPLATE

# An English rendering of the released spoken persona's style rules (SPOKEN_S2M_PROMPT: "replies short, usually one
# to three sentences"). The released prompt itself is Chinese: SmolLM2-135M echoes it or rambles under it.
MINI_SYSTEM = "You are a friendly voice assistant. Answer in one to three short spoken sentences."
DEFAULT_TEXT = Path("recipes/mini/data/text.jsonl.gz")
SAMPLE_RATE = 16000
MAX_WER = 0.3         # the ASR judge's WER above which a clip is dropped
RETRIES = 2           # a dropped clip is tried again in up to this many other voices of its split
ASR_QUOTA = {"train": 1500, "dev": 60, "test": 150}
ASR_REUSE_EVERY = 3   # every third QA item also gives an ASR record on its (first) question clip
HELD_OUT_EVERY = 20   # answers stage: one later answer sentence in 20 is held out (`held_out_sentence`)
ROBUSTNESS = {"snr10": {"noise_snr": 10.0}, "phone": {"telephone": True}}
_ASR_SENTENCE = re.compile(r"^[A-Z][A-Za-z ,'-]*[A-Za-z][.!?]$")


@dataclass
class TextSettings:
    batch_size: int = 16
    max_new_tokens: int = 128
    max_words: int = 100
    system: str = MINI_SYSTEM


# ==================================================================================================== text stage
class _HistoryDistiller(distill.Distiller):
    """A Distiller whose prompts may carry earlier turns (a follow-up's first question and the model's answer)."""

    def __init__(self, *args, history: dict[str, list[dict]], **kwargs):
        super().__init__(*args, **kwargs)
        self.history = history

    def messages(self, p: distill.DistillPrompt) -> list[dict]:
        return [{"role": "system", "content": self.settings.system}, *self.history.get(p.id, []),
                {"role": "user", "content": p.prompt}]


def _read_answers(out: Path) -> dict[str, dict]:
    kept, rejected, _ = distill.output_paths(out)
    found = {}
    for path in (kept, rejected):
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    found[rec["id"]] = rec
    return found


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def first_sentence(text: str) -> str:
    return next(iter(sentences(text)), "")


def asr_items(records: list[dict], seed: int, quota: dict | None = None) -> list[dict]:
    """Transcription items per split: clean first sentences (4-20 words, letters only) of kept answers, each
    sentence in one split only (test chooses first)."""
    quota = ASR_QUOTA if quota is None else quota
    rng = random.Random(f"{seed}:asr")
    out, used = [], set()
    for split in reversed(mini_questions.SPLITS):
        sentences = []
        for rec in records:
            if rec["split"] == split and rec["reject"] is None:
                s = first_sentence(rec["answers"][-1])
                if _ASR_SENTENCE.match(s) and 4 <= len(s.split()) <= 20 and s not in sentences \
                        and s.lower() not in used:
                    sentences.append(s)
        rng.shuffle(sentences)
        used.update(s.lower() for s in sentences)  # a split's candidates, chosen or not, stay out of the next
        for s in sentences[:quota.get(split, 0)]:
            out.append({"id": f"asr-{hashlib.sha1(s.encode()).hexdigest()[:10]}", "split": split, "family": "asr",
                        "turns": [], "text": s})
    return out


def run_text_stage(engine, tok, text_path: Path, work: Path, seed: int = 0, settings: TextSettings | None = None,
                   quotas: dict | None = None, limit: int | None = None, asr_quota: dict | None = None,
                   progress: bool = True) -> dict:
    """Answer the question set (resumably, in `work`), then write TEXT and TEXT.meta.json. Returns the meta."""
    settings = settings or TextSettings()
    questions = mini_questions.generate(seed, quotas)
    if limit is not None:
        questions = [q for split in mini_questions.SPLITS for q in [q for q in questions if q.split == split][:limit]]
    dsettings = distill.DistillSettings(batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                                        greedy=True, seed=seed, system=settings.system)
    filters = distill.Filters(max_words=settings.max_words)
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    # pass 1: every first turn (a follow-up's first turn under its own id)
    first_id = {q.id: (q.id + ".t1" if len(q.turns) > 1 else q.id) for q in questions}
    prompts = [distill.DistillPrompt(first_id[q.id], q.turns[0], q.family) for q in questions]
    distiller = distill.Distiller(engine, tok, dsettings, filters)
    distiller.run(prompts, work / "turn1.jsonl", progress=progress)
    turn1 = _read_answers(work / "turn1.jsonl")
    # pass 2: follow-ups, with the first question and the model's own answer as history
    followups = [q for q in questions if len(q.turns) > 1 and turn1[first_id[q.id]]["answer"]]
    history = {q.id: [{"role": "user", "content": q.turns[0]},
                      {"role": "assistant", "content": turn1[first_id[q.id]]["answer"]}] for q in followups}
    second = _HistoryDistiller(engine, tok, dsettings, filters, history=history)
    second.run([distill.DistillPrompt(q.id, q.turns[1], q.family) for q in followups], work / "turn2.jsonl",
               progress=progress)
    turn2 = _read_answers(work / "turn2.jsonl")

    records = []
    for q in questions:
        parts = [turn1[first_id[q.id]]] + ([turn2[q.id]] if len(q.turns) > 1 and q.id in turn2 else [])
        if len(parts) < len(q.turns):
            parts.append({"answer": "", "reason": "empty", "finished": False})
        reject = next((p.get("reason") for p in parts if p.get("reason")), None)
        answers = [p["answer"] for p in parts]
        gold = distill.matches_expected(answers[-1], q.expected) if q.expected else None
        records.append({"id": q.id, "split": q.split, "family": q.family, "turns": list(q.turns),
                        "expected": list(q.expected), "answers": answers, "typed_answer": answers[-1], "gold": gold,
                        "reject": reject, "finished": all(p.get("finished") for p in parts)})
    records += asr_items(records, seed, asr_quota)
    payload = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    with fileio.atomic_path(text_path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(payload)  # mtime 0, no name: the same records give the same bytes
    meta = {"seed": seed, "limit": limit, "settings": asdict(settings), "model": "SmolLM2-135M-Instruct (greedy)",
            "sha256_jsonl": hashlib.sha256(payload).hexdigest(), "counts": text_counts(records),
            "seconds": round(time.perf_counter() - t0, 1)}
    fileio.write_text(meta_path(text_path), json.dumps(meta, indent=2) + "\n")
    return meta


def meta_path(text_path: Path) -> Path:
    return text_path.with_name(text_path.name.split(".")[0] + ".meta.json")


def text_counts(records: list[dict]) -> dict:
    counts: dict = {}
    for r in records:
        split = counts.setdefault(r["split"], {"items": 0, "kept": 0, "by_family": Counter(), "rejected": Counter(),
                                               "gold": 0, "gold_correct": 0})
        split["items"] += 1
        split["by_family"][r["family"]] += 1
        if r.get("reject"):
            split["rejected"][r["reject"]] += 1
        else:
            split["kept"] += 1
        if r.get("gold") is not None:
            split["gold"] += 1
            split["gold_correct"] += int(r["gold"])
    return json.loads(json.dumps(counts))


def read_text(text_path: Path) -> list[dict]:
    if not Path(text_path).is_file():
        raise InputError(f"{text_path}: no text-stage output; run `funaudiochat data build-mini --stage text` first")
    try:
        with gzip.open(text_path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{text_path}: not a gzipped JSONL of text-stage records ({err})") from None


# ==================================================================================================== the build folder
def claim_out(out: Path, seed: int, resume: bool) -> None:
    """Mark OUT as a build of `seed`; an OUT holding a build is only continued with `resume` (and the same seed)."""
    out = Path(out)
    marker = out / "build.json"
    if marker.is_file():
        earlier = json.loads(marker.read_text(encoding="utf-8"))
        if not resume:
            raise InputError(f"{out} already holds a build (seed {earlier.get('seed')}); pass --resume to continue "
                             f"it, or choose another --out")
        if earlier.get("seed") != seed:
            raise InputError(f"{out} holds a build with seed {earlier.get('seed')}, not {seed}; resume it with "
                             f"--seed {earlier.get('seed')} or choose another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not a build-mini folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_text(marker, json.dumps({"seed": seed}) + "\n")


def check_text_seed(text_path: Path, seed: int) -> dict:
    """The meta of an existing text-stage output, checked to be of `seed` and the full question set."""
    path = meta_path(text_path)
    if not path.is_file():
        raise InputError(f"{path}: missing (the text stage writes it beside {text_path.name})")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("seed") != seed:
        raise InputError(f"{text_path} was made with seed {meta.get('seed')}, not {seed}; pass --seed "
                         f"{meta.get('seed')} or another --text")
    return meta


# ==================================================================================================== audio stage
@dataclass(frozen=True)
class Voice:
    """A speaker of the pool: an engine voice with a fixed pitch shift (semitones) and speaking rate."""

    name: str
    voice: str
    split: str
    pitch: float = 0.0
    rate: float = 1.0

    @property
    def piper(self) -> bool:
        return self.voice.startswith("piper")


def _piper(name, split, pitch, rate):
    return Voice(f"piper-{name}", "piper:joe", split, pitch, rate)


def _espeak(name, split, pitch=0.0, rate=1.0):
    return Voice(f"espeak-{name}" + (f"{pitch:+g}" if pitch else ""), f"espeak:{name}", split, pitch, rate)


# Test and dev voices are never used in train: whole espeak voices (accents) and Piper pitch/rate variants of their own.
VOICES = (
    _piper("joe", "train", 0.0, 1.0), _piper("low", "train", -2.0, 0.95), _piper("high", "train", 2.0, 1.05),
    _piper("lower", "train", -4.0, 1.0), _piper("higher", "train", 4.0, 1.0), _piper("fast", "train", 0.0, 1.2),
    _piper("slow-low", "train", -1.0, 0.9),
    _espeak("en-us", "train"), _espeak("en-us+f2", "train"), _espeak("en-us+f3", "train"),
    _espeak("en-us+m3", "train"), _espeak("en-us+m7", "train"), _espeak("en-us+f1", "train", 1.0),
    _espeak("en-us+m1", "train", -1.0), _espeak("en", "train"), _espeak("en+f4", "train"), _espeak("en+m2", "train"),
    _espeak("en-gb-x-rp", "train"), _espeak("en-gb-x-rp+f3", "train", 1.0), _espeak("en-gb-x-gbclan", "train"),
    _espeak("en-gb-x-gbclan+f2", "train"),
    _piper("slow", "dev", 0.0, 0.85), _espeak("en-us-nyc", "dev"), _espeak("en-us-nyc+f5", "dev"),
    _piper("high-fast", "test", 3.0, 1.1), _piper("low-slow", "test", -3.0, 0.9),
    _espeak("en-gb-scotland", "test"), _espeak("en-gb-scotland+f2", "test"), _espeak("en-029", "test"),
    _espeak("en-029+m4", "test", -1.0),
)
PIPER_SHARE = 0.5  # half of every split's clips are Piper (natural), half espeak


def voices_for(split: str) -> list[Voice]:
    return [v for v in VOICES if v.split == split]


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(f"{seed}:{key}")  # str seeds hash with sha512: stable across runs and machines


def choose_voice(split: str, clip_id: str, seed: int) -> Voice:
    rng = _rng(seed, "voice:" + clip_id)
    pool = voices_for(split)
    piper = [v for v in pool if v.piper]
    return rng.choice(piper if piper and rng.random() < PIPER_SHARE else [v for v in pool if not v.piper])


def choose_augmentation(split: str, clip_id: str, seed: int) -> dict:
    """Train/dev: volume 0.5-1, then reverb RT60 0.15-0.45 s (20 %), noise at 5-20 dB SNR (45 %), telephone (15 %),
    independently. Test clips are clean (their robustness copies are rendered beside them)."""
    if split == "test":
        return {}
    rng = _rng(seed, "aug:" + clip_id)
    aug = {"volume": round(rng.uniform(0.5, 1.0), 3)}
    if rng.random() < 0.2:  # longer rooms make robotic espeak speech unintelligible to the judge
        aug["reverb"] = round(rng.uniform(0.15, 0.45), 3)
    if rng.random() < 0.45:
        aug["noise_snr"] = round(rng.uniform(5.0, 20.0), 2)
        aug["noise"] = rng.choice(("white", "pink"))
    if rng.random() < 0.15:
        aug["telephone"] = True
    return aug


def aug_name(aug: dict) -> str:
    parts = [k for k in ("reverb", "noise_snr", "telephone") if k in aug]
    return "+".join(parts) or "clean"


@dataclass(frozen=True)
class Clip:
    id: str          # also the wav's name
    item: str        # the text record it belongs to
    split: str
    text: str
    voice: Voice
    aug: tuple       # sorted (key, value) pairs of the augmentation
    base: str | None = None  # robustness copies: the clean clip whose (kept) voice they reuse; never dropped


def plan_clips(records: list[dict], seed: int) -> list[Clip]:
    """Every clip of the build: QA user turns (kept items; every test item), ASR sentences, test robustness copies
    (each right after its clean clip)."""
    clips = []
    for rec in records:
        if rec["family"] != "asr" and rec.get("reject") and rec["split"] != "test":
            continue
        texts = [rec["text"]] if rec["family"] == "asr" else rec["turns"]
        for n, text in enumerate(texts, start=1):
            cid = f"{rec['id']}.q{n}" if rec["family"] != "asr" else rec["id"]
            voice = choose_voice(rec["split"], cid, seed)
            aug = choose_augmentation(rec["split"], cid, seed)
            clips.append(Clip(cid, rec["id"], rec["split"], text, voice, tuple(sorted(aug.items()))))
            if rec["split"] == "test":
                for name, extra in ROBUSTNESS.items():
                    clips.append(Clip(f"{cid}.{name}", rec["id"], f"test_{name}", text, voice,
                                      tuple(sorted(extra.items())), base=cid))
    return clips


def answer_sentences(rec: dict) -> list[str]:
    """An item's answer sentences, numbered from 1 as the answers stage names their clips (ITEM.aN): the last
    answer's first sentence, its other sentences, then the earlier turns' answers' sentences."""
    last = sentences(rec["answers"][-1])
    return last + [s for answer in rec["answers"][:-1] for s in sentences(answer)]


def held_out_sentence(text: str) -> bool:
    """One answer sentence in HELD_OUT_EVERY (by a hash of its text) is never trained on: hearing is scored on new
    sentences in train voices (train_voices_heldout_asr.jsonl), not only on the test questions. First sentences
    (ITEM.a1) are all trained on, as before there were more."""
    return zlib.crc32(text.lower().encode()) % HELD_OUT_EVERY == 0


def plan_answer_clips(records: list[dict], seed: int) -> list[Clip]:
    """The answers stage's clips: every sentence (3-30 words) of each kept train answer that is not already an ASR
    item nor a question, once, in a train voice; ids ITEM.aN (`answer_sentences`), the first sentences first.
    Hearing is held back by the sentences it has heard (entities, numbers: docs/mini.md); the answers say the
    questions' entities again, in other sentences."""
    taken = {r["text"].lower() for r in records if r["family"] == "asr"}
    kept = [r for r in records if r["split"] == "train" and r["family"] != "asr" and not r.get("reject")]
    taken.update(t.lower() for r in records if r["family"] != "asr" for t in r["turns"])
    clips = []
    for later in (False, True):  # every item's first sentence before any later one: ITEM.a1 as it always was
        for rec in kept:
            for n, text in enumerate(answer_sentences(rec), start=1):
                if (n > 1) != later or not 3 <= len(text.split()) <= 30 or text.lower() in taken:
                    continue
                taken.add(text.lower())
                cid = f"{rec['id']}.a{n}"
                aug = choose_augmentation("train", cid, seed)
                clips.append(Clip(cid, rec["id"], "train", text, choose_voice("train", cid, seed),
                                  tuple(sorted(aug.items()))))
    return clips


def retry(clip: Clip, attempt: int, seed: int) -> Clip:
    """The clip again, in another voice (and augmentation) of its split, after the judge rejected it."""
    cid = f"{clip.id}.r{attempt}"
    aug = choose_augmentation(clip.split, cid, seed)
    return Clip(cid, clip.item, clip.split, clip.text, choose_voice(clip.split, cid, seed), tuple(sorted(aug.items())))


def kept_entry(done: dict[str, dict], clip_id: str, retries: int = RETRIES) -> dict | None:
    """The journal entry that stands for a clean clip: its first attempt the judge accepted."""
    for cid in [clip_id] + [f"{clip_id}.r{k}" for k in range(1, retries + 1)]:
        entry = done.get(cid)
        if entry and entry["kept"]:
            return entry
    return None


def synthesize_clip(clip: Clip, seed: int):
    from funaudiochat.data import synth

    utt = synth.make_utterance({"id": clip.id, "text": clip.text, "voice": clip.voice.voice,
                                "pitch": clip.voice.pitch, "rate": clip.voice.rate, **dict(clip.aug)}, clip.id)
    return synth.synthesize(utt, SAMPLE_RATE, seed)


def clip_wer(judge, wav, text: str) -> tuple[str, float]:
    from funaudiochat.eval.asr import error_rates
    from funaudiochat.eval.normalize import normalize_english

    hypothesis = judge.transcribe(wav, SAMPLE_RATE)
    ref, hyp = normalize_english(text), normalize_english(hypothesis)
    return hypothesis, (error_rates([ref], [hyp])[0] if ref else 0.0)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_journal(path: Path) -> dict[str, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                done[rec["id"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by an interruption: that clip is made again
    return done


def _done(entry: dict | None, clip: Clip, out: Path, max_wer: float) -> bool:
    """A journal entry stands for `clip` if it asked for the same thing, was judged with the same threshold, and
    its wav (when kept) is still there, whole."""
    if entry is None or entry.get("text") != clip.text or entry.get("voice") != clip.voice.name \
            or entry.get("aug") != dict(clip.aug) or entry.get("max_wer") != max_wer:
        return False
    return not entry["kept"] or ((out / entry["path"]).is_file() and (out / entry["path"]).stat().st_size
                                 == entry["bytes"])


def make_clip(clip: Clip, out: Path, seed: int, max_wer: float, judge, replay: dict | None = None) -> dict:
    """Synthesise and judge one clip; save its wav if kept. Returns its journal entry. With `replay` ({attempt id:
    manifest row} of a committed build), the build's verdict stands instead of the judge's: an attempt without a
    row was rejected there and is not made; one with a row is made and kept, and whether its bytes equal the row's
    is recorded."""
    from funaudiochat.audio.io import save_wav

    t0 = time.perf_counter()
    entry = {"id": clip.id, "item": clip.item, "split": clip.split, "text": clip.text, "voice": clip.voice.name,
             "aug": dict(clip.aug), "max_wer": max_wer}
    row = None if replay is None else replay.get(clip.id)
    if replay is not None and row is None:
        entry.update(kept=False, reason="rejected_in_manifest", seconds=0.0)
        return entry
    if row is not None and (row["text"], row["voice"], row["aug"]) != (clip.text, clip.voice.name, dict(clip.aug)):
        raise InputError(f"replayed manifest: clip {clip.id} is {row['voice']} {row['aug']} {row['text']!r} there, "
                         f"{clip.voice.name} {dict(clip.aug)} {clip.text!r} in this plan (another text stage or seed)")
    try:
        wav = synthesize_clip(clip, seed)
    except InputError as err:
        entry.update(kept=False, reason="synthesis_failed", error=str(err))
    else:
        hypothesis, wer = (None, row["wer"]) if row is not None else clip_wer(judge, wav, clip.text)
        entry.update(hypothesis=hypothesis, wer=round(wer, 4), duration=round(len(wav) / SAMPLE_RATE, 3))
        if wer > max_wer and clip.base is None and row is None:
            entry.update(kept=False, reason="asr_wer")
        else:
            path = Path("audio") / clip.split / f"{clip.id}.wav"
            with fileio.atomic_path(out / path) as tmp:
                save_wav(tmp, wav, SAMPLE_RATE)
            entry.update(kept=True, reason=None, path=str(path), bytes=(out / path).stat().st_size,
                         sha256=_sha256(out / path), samples=len(wav))
            if row is not None:
                entry["replayed_same_bytes"] = entry["sha256"] == row["sha256"]
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    return entry


def _plan_attempts(clip: Clip, done: dict[str, dict], voices: dict[str, Voice], out: Path, seed: int,
                   max_wer: float, retries: int) -> list[tuple[Clip, dict | None]] | None:
    """The attempts that may make `clip`, each with its journal entry if already made (else None); None when the
    journal already holds the attempt that stands for it (nothing to do)."""
    if clip.base is not None:  # a robustness copy, in the voice its clean clip was finally kept in
        base = kept_entry(done, clip.base, retries)
        attempts = [] if base is None else [Clip(clip.id, clip.item, clip.split, clip.text, voices[base["voice"]],
                                                 clip.aug, clip.base)]
    else:
        attempts = [clip] + [retry(clip, k, seed) for k in range(1, retries + 1)]
    plan = []
    for attempt in attempts:
        entry = done.get(attempt.id)
        entry = entry if _done(entry, attempt, out, max_wer) else None
        if entry is not None and entry["kept"]:
            return None
        plan.append((attempt, entry))
    return None if all(entry is not None for _, entry in plan) else plan


def _make_first_kept(plan: list[tuple[Clip, dict | None]], out: Path, seed: int, max_wer: float, replay: dict | None,
                     judge) -> list[dict]:
    """Make the plan's attempts in order until one is kept; returns the new journal entries."""
    new = []
    for attempt, entry in plan:
        if entry is None:
            entry = make_clip(attempt, out, seed, max_wer, judge, replay)
            new.append(entry)
        if entry["kept"]:
            break
    return new


_WORKER_JUDGE = None  # the ASR judge of a --workers process, built once by _init_audio_worker


def _init_audio_worker(threads: int, judged: bool) -> None:
    global _WORKER_JUDGE
    from funaudiochat.data import synth
    from funaudiochat.eval.asr import AsrJudge

    synth._ENGINE_THREADS = 1  # as in run_audio_stage
    _WORKER_JUDGE = AsrJudge(threads=threads) if judged else None


def _worker_job(job: tuple) -> list[dict]:
    return _make_first_kept(*job, judge=_WORKER_JUDGE)


def make_clips(clips: list[Clip], out: Path, seed: int, max_wer: float, judge, retries: int = RETRIES,
               progress: bool = True, workers: int = 1, threads: int = 1, replay: dict | None = None) -> dict:
    """Make every clip not yet in the journal (OUT/clips.jsonl); a clip the judge rejects is tried again in up to
    `retries` other voices of its split. With `workers` > 1, clips are made in that many processes (each with its
    own judge and `threads` threads); a clip's result does not depend on the process that made it. With `replay`
    (a committed manifest's rows by id) its verdicts replace the judge's (`make_clip`). Returns the journal,
    {attempt id: entry}."""
    import multiprocessing

    from tqdm import tqdm

    journal_path = out / "clips.jsonl"
    done = _read_journal(journal_path)
    voices = {v.name: v for v in VOICES}
    pool = None
    if workers > 1:  # spawn: never fork a process that holds onnxruntime / CTranslate2 threads
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_audio_worker,
                                                          initargs=(threads, replay is None))
    try:
        with open(journal_path, "a", encoding="utf-8") as journal, \
                tqdm(total=len(clips), desc="audio", unit="clip", disable=not progress, dynamic_ncols=True) as bar:
            # clean clips first: a robustness copy takes the voice its clean clip was kept in
            for group in ([c for c in clips if c.base is None], [c for c in clips if c.base is not None]):
                jobs = []
                for clip in group:
                    plan = _plan_attempts(clip, done, voices, out, seed, max_wer, retries)
                    if plan is None:
                        bar.update(1)
                    else:
                        # only this plan's rows travel to the worker (no row: rejected in the replayed build)
                        rows = None if replay is None else {a.id: replay[a.id] for a, _ in plan if a.id in replay}
                        jobs.append((plan, out, seed, max_wer, rows))
                results = (pool.imap_unordered(_worker_job, jobs) if pool
                           else (_make_first_kept(*job, judge=judge) for job in jobs))
                for entries in results:
                    for entry in entries:
                        journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
                        done[entry["id"]] = entry
                    journal.flush()
                    bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
    return done


# ---------------------------------------------------------------------------------------------------- records
def _audio_entry(entry: dict, text: str) -> str:
    from funaudiochat.engine.prompt import speech_token_count

    return json.dumps({"path": entry["path"], "text": "", "token": AUDIO_PAD * speech_token_count(entry["samples"]),
                       "ref_path": "", "ref_text": text}, ensure_ascii=False, sort_keys=True)


def training_record(rec: dict, entries: list[dict], system: str, asr: bool = False) -> dict:
    """A released sharegpt record (train/data.py) with user audio in, the answer (or transcript) as text out."""
    meta = {"family": rec["family"], "voices": [e["voice"] for e in entries],
            "augmentation": [aug_name(e["aug"]) for e in entries]}
    if asr:
        text = rec["text"] if rec["family"] == "asr" else rec["turns"][0]
        return _asr_record(rec["id"] + ("" if rec["family"] == "asr" else ".asr"), text, entries[0], system, meta)
    messages = []
    for turn, answer in zip(rec["turns"], rec["answers"]):
        messages += [{"role": "user", "content": AUDIO_TEMPLATE}, {"role": "assistant", "content": answer}]
    meta.update(expected=rec["expected"], typed_answer=rec["typed_answer"], gold=rec["gold"], reject=rec["reject"],
                questions=rec["turns"])
    return {"id": rec["id"], "task": "qa", "system": system, "messages": messages,
            "audio": [_audio_entry(e, t) for e, t in zip(entries, rec["turns"])], "meta": meta}


def clip_asr_record(rec: dict, entries: list[dict], system: str, turn: int) -> dict:
    """Clip `turn` of an item (an ASR sentence, or a QA item's question turn) as an ASR record, for
    train_clips_asr.jsonl; ids ITEM.clipN."""
    text = rec["text"] if rec["family"] == "asr" else rec["turns"][turn]
    meta = {"family": rec["family"], "voices": [entries[turn]["voice"]],
            "augmentation": [aug_name(entries[turn]["aug"])]}
    return _asr_record(f"{rec['id']}.clip{turn + 1}", text, entries[turn], system, meta)


def _asr_record(record_id: str, text: str, entry: dict, system: str, meta: dict) -> dict:
    """"Please help me transcribe the audio." on one clip, its text as the answer."""
    messages = [{"role": "user", "content": f"{AUDIO_TEMPLATE}\n{ASR_INSTRUCTION}"},
                {"role": "assistant", "content": text}]
    return {"id": record_id, "task": "asr", "system": system, "messages": messages,
            "audio": [_audio_entry(entry, text)], "meta": meta}


def _reuse_for_asr(item_id: str) -> bool:
    return int(hashlib.sha1(item_id.encode()).hexdigest(), 16) % ASR_REUSE_EVERY == 0


def write_records(records: list[dict], done: dict[str, dict], out: Path, system: str) -> dict[str, dict]:
    """OUT/{train,dev,test,test_snr10,test_phone}.jsonl from the text records and the kept clips, and
    OUT/train_clips_asr.jsonl: every kept train clip (ASR sentences and each question turn) as an ASR record, for
    pre-alignment (about twice the ASR records of train.jsonl, from the same audio). Returns the record counts per
    split and family (ASR records under "asr")."""
    by_split: dict[str, list[dict]] = {}
    clips_asr: list[dict] = []
    for rec in records:
        if rec["family"] != "asr" and rec.get("reject") and rec["split"] != "test":
            continue
        n = 1 if rec["family"] == "asr" else len(rec["turns"])
        base = [rec["id"]] if rec["family"] == "asr" else [f"{rec['id']}.q{i}" for i in range(1, n + 1)]
        variants = [("", rec["split"])] + ([(f".{k}", f"test_{k}") for k in ROBUSTNESS] if rec["split"] == "test"
                                           else [])
        if not all(kept_entry(done, cid) for cid in base):
            continue  # a clip dropped in every voice drops the item, with its robustness copies
        for suffix, split in variants:
            entries = [kept_entry(done, cid) if not suffix else done.get(cid + suffix) for cid in base]
            if not all(e and e["kept"] for e in entries):
                continue
            target = by_split.setdefault(split, [])
            if split == "train":
                clips_asr += [clip_asr_record(rec, entries, system, t) for t in range(len(entries))]
            if rec["family"] == "asr":
                target.append(training_record(rec, entries, system, asr=True))
                continue
            target.append(training_record(rec, entries, system))
            if _reuse_for_asr(rec["id"]):
                target.append(training_record(rec, entries, system, asr=True))
    for name, recs in [*by_split.items(), ("train_clips_asr", clips_asr)]:
        fileio.write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return {split: dict(sorted(Counter("asr" if r["task"] == "asr" else r["meta"]["family"] for r in recs).items()),
                        total=len(recs)) for split, recs in sorted(by_split.items())}


# ---------------------------------------------------------------------------------------------------- manifest
def set_hash(rows: list[dict]) -> str:
    """One hash over the whole set: sha256 of the sorted 'sha256  path' lines (as sha256sum prints them)."""
    lines = sorted(f"{r['sha256']}  {r['path']}\n" for r in rows)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def write_manifest(done: dict[str, dict], out: Path, name: str = "manifest") -> str:
    rows = sorted(({"path": e["path"], "sha256": e["sha256"], "bytes": e["bytes"], "id": e["id"],
                    "split": e["split"], "text": e["text"], "voice": e["voice"], "aug": e["aug"], "wer": e["wer"]}
                   for e in done.values() if e["kept"]), key=lambda r: r["path"])
    fileio.write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    digest = set_hash(rows)
    fileio.write_text(out / f"{name}.sha256", digest + "\n")
    return digest


def verify_manifest(out: Path, name: str = "manifest") -> dict:
    """Check every wav of OUT/NAME.jsonl against its sha256, and the set hash; raise InputError on a mismatch."""
    out = Path(out)
    path = out / f"{name}.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no manifest (the {'audio' if name == 'manifest' else 'answers'} stage writes it)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = []
    for r in rows:
        wav = out / r["path"]
        if not wav.is_file():
            bad.append(f"{r['path']} (missing)")
        elif _sha256(wav) != r["sha256"]:
            bad.append(f"{r['path']} (different content)")
    digest = set_hash(rows)
    stored = (out / f"{name}.sha256").read_text(encoding="utf-8").strip() if (out / f"{name}.sha256").is_file() \
        else None
    if stored != digest:
        bad.append(f"{name}.sha256 ({stored} != {digest} computed from {name}.jsonl)")
    if bad:
        raise InputError(f"{out}: {len(bad)} problem(s) against the manifest: " + "; ".join(bad[:5])
                         + (" ..." if len(bad) > 5 else ""))
    return {"files": len(rows), "set_sha256": digest}


# ---------------------------------------------------------------------------------------------------- speech stage
INSTRUCTION_EVERY = 4  # every 4th QA record also gets speech-instruction variant(s)
SPEECH_SPLITS = ("train", "dev", "test")


def instructions_for(record_id: str, split: str) -> list[str]:
    """The speech-instruction variants a QA record gets: none for most; one (drawn by its id) in train/dev, all four
    in test, for every INSTRUCTION_EVERY-th record."""
    from funaudiochat.data.spoken_answers import INSTRUCTIONS

    key = zlib.crc32(f"instruction:{record_id}".encode())
    if key % INSTRUCTION_EVERY:
        return []
    names = list(INSTRUCTIONS)
    return names if split == "test" else [names[(key // INSTRUCTION_EVERY) % len(names)]]


SPEECH_FORMAT = 3  # of the S2S records; 2 put the S2M sentence before their system prompt, 3 keeps the text one


def run_speech_stage(out: Path, text_tokenizer, piper=None, progress: bool = True,
                     layout: str = "released", splits: tuple[str, ...] | None = None) -> dict:
    """OUT/{split}.jsonl's QA records -> OUT/{split}_s2s.jsonl (spoken answers, instruction variants, the text laid
    out along the speech by `layout`, spoken_answers.LAYOUTS) and OUT/speech.json (counts, seconds, the records'
    sha256, the layout, the format). A split whose S2S file was made from records with the same sha256, in the same
    layout and SPEECH_FORMAT, is kept as is (the audio stage rewrites the records on every run, with the same
    bytes). With `splits`, only those of SPEECH_SPLITS (e.g. ("test",) after an audio stage of the test split
    alone)."""
    from tqdm import tqdm

    from funaudiochat.data.spoken_answers import speak_record

    if splits is not None and not set(splits) <= set(SPEECH_SPLITS):
        raise InputError(f"the speech stage's splits are {list(SPEECH_SPLITS)}, got {sorted(set(splits))}")
    from funaudiochat.speech.piper_tokens import PiperTokenizer

    out = Path(out)
    path = out / "speech.json"
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for split in (s for s in SPEECH_SPLITS if splits is None or s in splits):
        src, dst = out / f"{split}.jsonl", out / f"{split}_s2s.jsonl"
        if not src.is_file():
            raise InputError(f"{src}: no records; run the audio stage first")
        source = _sha256(src)
        done = summary.get(split, {})
        if dst.is_file() and done.get("source_sha256") == source and done.get("layout", "released") == layout \
                and done.get("format", 1) == SPEECH_FORMAT:
            write_style_pairs(dst)
            continue
        piper = piper or PiperTokenizer()
        t0, rows, skipped = time.perf_counter(), [], Counter()
        records = [r for r in map(json.loads, src.read_text(encoding="utf-8").splitlines()) if r["task"] == "qa"]
        for rec in tqdm(records, desc=f"speech {split}", unit="record", disable=not progress, dynamic_ncols=True):
            for instruction in [None] + instructions_for(rec["id"], split):
                try:
                    rows.append(speak_record(rec, piper, text_tokenizer, instruction=instruction, layout=layout))
                except InputError:  # an answer with nothing speakable in it
                    skipped[instruction or "plain"] += 1
        fileio.write_text(dst, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        write_style_pairs(dst)
        by = Counter(r["meta"]["speech_instruction"] or "plain" for r in rows)
        summary[split] = {"records": len(rows), "by_instruction": dict(sorted(by.items())), "skipped": dict(skipped),
                          "seconds": round(time.perf_counter() - t0, 1), "source_sha256": source,
                          "layout": layout, "format": SPEECH_FORMAT}
        fileio.write_text(path, json.dumps(summary, indent=2) + "\n")  # now: a stop in a later split keeps this one
    return summary


def write_style_pairs(s2s_path: Path) -> Path:
    """SPLIT_s2s.jsonl -> SPLIT_s2s_style.jsonl: every speech-instruction variant and the plain record it was made
    from (the same question and answer, said otherwise), the data that teaches the head how an answer is to be said
    (recipes/mini/speak_style.yaml). Rewritten from the S2S file each time (a few seconds)."""
    lines = s2s_path.read_text(encoding="utf-8").splitlines()
    records = [(json.loads(line), line) for line in lines]
    originals = {r["id"].rsplit(".", 1)[0] for r, _ in records if r["meta"].get("speech_instruction")}
    kept = [line for r, line in records if r["meta"].get("speech_instruction") or r["id"] in originals]
    dst = s2s_path.with_name(s2s_path.name.replace("_s2s.jsonl", "_s2s_style.jsonl"))
    fileio.write_text(dst, "".join(line + "\n" for line in kept))
    return dst


# ---------------------------------------------------------------------------------------------------- the stage
def attempt_ids(clips: list[Clip], retries: int = RETRIES) -> set[str]:
    """The journal ids the plan may have made: each clean clip and its retries, each robustness copy."""
    ids = set()
    for c in clips:
        ids.update([c.id] if c.base else [c.id] + [f"{c.id}.r{k}" for k in range(1, retries + 1)])
    return ids


def audio_summary(done: dict[str, dict], clips: list[Clip], records_written: dict, digest: str,
                  seconds: float) -> dict:
    entries = [done[i] for i in sorted(attempt_ids(clips) & set(done))]
    by = lambda key: dict(sorted(Counter(key(e) for e in entries if e["kept"]).items()))  # noqa: E731
    kept = [e for e in entries if e["kept"]]
    lost = Counter(c.split for c in clips if c.base is None and kept_entry(done, c.id) is None)
    return {"attempts": len(entries), "kept": len(kept), "planned": len(clips),
            "rejected": dict(Counter(e["reason"] for e in entries if not e["kept"])),
            "kept_after_retry": sum(1 for e in kept if re.search(r"\.r\d+$", e["id"])),
            "dropped_in_every_voice": dict(sorted(lost.items())),
            "by_split": by(lambda e: e["split"]), "by_voice": by(lambda e: e["voice"]),
            "by_augmentation": by(lambda e: aug_name(e["aug"])),
            "audio_hours": round(sum(e["duration"] for e in kept) / 3600, 3),
            "mean_wer_kept": {s: round(sum(e["wer"] for e in kept if e["split"] == s)
                                       / max(1, sum(1 for e in kept if e["split"] == s)), 4)
                              for s in sorted({e["split"] for e in kept})},
            "records": records_written, "manifest_sha256": digest,
            "clip_seconds": round(sum(e.get("seconds", 0.0) for e in entries), 1), "seconds": round(seconds, 1)}


def read_replay(path: Path, clips: list[Clip], splits: tuple[str, ...] | None = None) -> dict[str, dict]:
    """A committed manifest (JSONL, gzipped or not) as {attempt id: row}, checked against this build's plan (only
    the rows of `splits` when given)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--replay {path}: no such manifest")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            rows = {r["id"]: r for r in map(json.loads, filter(str.strip, f))
                    if splits is None or r["split"].partition("_")[0] in splits}  # test_snr10 is test's
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"--replay {path}: not an audio manifest ({err})") from None
    unknown = sorted(set(rows) - attempt_ids(clips))
    if unknown:
        raise InputError(f"--replay {path}: {len(unknown)} clip(s) this build does not plan (another text stage or "
                         f"seed?), e.g. {unknown[:3]}")
    return rows


def _make_planned(clips: list[Clip], out: Path, seed: int, max_wer: float, threads: int, judge, progress: bool,
                  workers: int, replay: Path | None,
                  splits: tuple[str, ...] | None = None) -> tuple[dict[str, dict], dict | None]:
    """Make a stage's planned clips (`make_clips`), judged, or with `replay`'s verdicts. Returns the journal and the
    replayed manifest's rows (None without `replay`)."""
    from funaudiochat.data import synth

    rows = None if replay is None else read_replay(replay, clips, splits)
    if judge is None and workers == 1 and rows is None:
        from funaudiochat.eval.asr import AsrJudge

        judge = AsrJudge(threads=threads)
    # one onnxruntime thread for Piper in every process: its float sums (so a wav's bytes) depend on the thread count
    synth._ENGINE_THREADS = 1
    done = make_clips(clips, out, seed, max_wer, judge, progress=progress, workers=workers,
                      threads=max(1, threads // workers), replay=rows)
    return done, rows


def run_audio_stage(text_path: Path, out: Path, seed: int = 0, max_wer: float = MAX_WER, threads: int = 1,
                    judge=None, progress: bool = True, workers: int = 1, replay: Path | None = None,
                    splits: tuple[str, ...] | None = None) -> dict:
    """Speak, judge and save every clip of TEXT's records; write the records, manifest and OUT/summary.json.
    With `replay` (a committed manifest), make exactly its clips with its verdicts and no judge: the same build in
    a fraction of the time (the summary counts the clips whose bytes equal the manifest's). With `splits`, only
    those splits' records (e.g. ("test",) to evaluate without the train audio); a clip does not depend on the
    other splits, so they are the same clips as in a full build."""
    out = Path(out)
    meta = check_text_seed(text_path, seed)
    records = read_text(text_path)
    if splits is not None:
        unknown = sorted(set(splits) - set(mini_questions.SPLITS))
        if unknown:
            raise InputError(f"unknown split(s) {unknown}; the splits are {list(mini_questions.SPLITS)}")
        records = [r for r in records if r["split"] in splits]
    clips = plan_clips(records, seed)
    t0 = time.perf_counter()
    done, rows = _make_planned(clips, out, seed, max_wer, threads, judge, progress, workers, replay, splits)
    written = write_records(records, done, out, meta["settings"]["system"])
    wanted = attempt_ids(clips)
    digest = write_manifest({k: v for k, v in done.items() if k in wanted}, out)
    summary = {"seed": seed, "text": str(text_path), "text_counts": meta["counts"], "text_seconds": meta["seconds"],
               "voices": {split: [v.name for v in voices_for(split)] for split in mini_questions.SPLITS},
               "max_wer": max_wer, "splits": list(splits or mini_questions.SPLITS),
               **audio_summary(done, clips, written, digest, time.perf_counter() - t0)}
    if rows is not None:
        replayed = [done[i] for i in rows if i in done]
        summary["replay"] = {"manifest": str(replay), "clips": len(rows), "made": len(replayed),
                             "same_bytes": sum(bool(e.get("replayed_same_bytes")) for e in replayed)}
    fileio.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------------- answers stage
ANSWERS_MANIFEST = "answers_manifest"


def run_answers_stage(text_path: Path, out: Path, seed: int = 0, max_wer: float = MAX_WER, threads: int = 1,
                      judge=None, progress: bool = True, workers: int = 1, replay: Path | None = None) -> dict:
    """More ASR clips, after the audio stage, in the same folder and journal: `plan_answer_clips`, made and judged
    as the audio stage's clips are. Writes OUT/train_answers_asr.jsonl (one ASR record per kept clip, ids
    ITEM.answer for a first sentence, ITEM.answerN for the Nth), OUT/train_voices_heldout_asr.jsonl (the held-out
    sentences' records, `held_out_sentence`), OUT/answers_manifest.{jsonl,sha256} and OUT/answers_summary.json;
    the audio stage's own files are untouched."""
    out = Path(out)
    meta = check_text_seed(text_path, seed)
    clips = plan_answer_clips(read_text(text_path), seed)
    t0 = time.perf_counter()
    done, _ = _make_planned(clips, out, seed, max_wer, threads, judge, progress, workers, replay)
    system = meta["settings"]["system"]
    written = {"train_answers_asr": [], "train_voices_heldout_asr": []}
    for clip in clips:
        entry = kept_entry(done, clip.id)
        if entry is not None:
            n = clip.id.rsplit(".a", 1)[1]
            held = n != "1" and held_out_sentence(clip.text)
            written["train_voices_heldout_asr" if held else "train_answers_asr"].append(_asr_record(
                f"{clip.item}.answer" + ("" if n == "1" else n), clip.text, entry, system,
                {"family": "answer", "voices": [entry["voice"]], "augmentation": [aug_name(entry["aug"])]}))
    for name, records in written.items():
        fileio.write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    digest = write_manifest({k: v for k, v in done.items() if k in attempt_ids(clips)}, out, ANSWERS_MANIFEST)
    summary = audio_summary(done, clips, {k: len(v) for k, v in written.items()}, digest, time.perf_counter() - t0)
    fileio.write_text(out / "answers_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
