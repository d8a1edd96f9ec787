"""`funaudiochat data build-mini`: the question set (size, determinism, disjoint splits, correct arithmetic golds),
the voice pool, a tiny text stage on SmolLM2 (greedy answers, resumed after an interruption), a tiny audio stage
(real TTS + ASR judge: WER filter, records `funaudiochat train` reads, resume, manifest hashes) and the CLI's
refusals."""
from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from funaudiochat.data import build_mini, mini_questions, synth
from funaudiochat.errors import InputError

TINY_QUOTAS = {"facts": {"train": 1, "dev": 1, "test": 2}, "followup": {"train": 1, "dev": 0, "test": 0}}


# ---------------------------------------------------------------------------------------------------- questions
@pytest.fixture(scope="module")
def questions():
    return mini_questions.generate(0)


def test_question_set_size_and_families(questions):
    by_split = {s: [q for q in questions if q.split == s] for s in mini_questions.SPLITS}
    assert len(by_split["train"]) >= 6300 and len(by_split["dev"]) >= 320 and len(by_split["test"]) >= 300
    assert sum(q.gold for q in by_split["test"] if q.family in mini_questions.GOLD_FAMILIES) >= 150
    for split in mini_questions.SPLITS:
        assert {q.family for q in by_split[split]} == set(mini_questions.QUOTAS), split
    assert all(len(q.turns) == 2 for q in questions if q.family == "followup")
    assert all(q.expected for q in questions if q.family in mini_questions.GOLD_FAMILIES)


def test_question_set_is_deterministic_and_splits_share_no_question(questions):
    assert mini_questions.generate(0) == questions
    other = mini_questions.generate(1)
    assert [q.turns for q in other] != [q.turns for q in questions]
    firsts = {s: {q.turns[0] for q in questions if q.split == s} for s in mini_questions.SPLITS}
    assert not firsts["train"] & firsts["test"] and not firsts["train"] & firsts["dev"]
    assert not firsts["dev"] & firsts["test"]
    assert len({q.id for q in questions}) == len(questions)


def test_overlapping_splits_are_refused():
    q = mini_questions.Question("a", "train", "facts", ("What is the capital of Peru?",), ("Lima",))
    clash = mini_questions.Question("b", "test", "followup", ("What is the capital of Peru?", "Why?"))
    with pytest.raises(ValueError, match="both train and test"):
        mini_questions.check_disjoint([q, clash])


_OPS = {"plus": lambda a, b: a + b, "add": lambda a, b: a + b, "buy": lambda a, b: a + b,
        "minus": lambda a, b: a - b, "take away": lambda a, b: a - b, "spent": lambda a, b: a - b,
        "times": lambda a, b: a * b, "multipl": lambda a, b: a * b, "boxes": lambda a, b: a * b,
        "divided": lambda a, b: a // b, "shared": lambda a, b: a // b}


def test_arithmetic_golds_are_right(questions):
    for q in (q for q in questions if q.family == "arithmetic"):
        text = q.turns[0]
        a, b = map(int, re.findall(r"\d+", text))
        if "subtract" in text:  # "subtract {b} from {a}"
            a, b = b, a
            op = "minus"
        else:
            op = next(k for k in _OPS if k in text)
        assert q.expected == (str(_OPS[op](a, b)),), text
        assert "divided" not in text and "shared" not in text or a % b == 0, text


def test_fact_golds_for_known_questions():
    golds = dict(mini_questions.fact_candidates())
    assert golds["What is the capital of Australia?"] == ("Canberra",)
    assert golds["What is the chemical symbol for iron?"] == ("Fe",)
    assert golds["What month comes after December?"] == ("January",)
    assert golds["Which day comes before Monday?"] == ("Sunday",)
    assert golds["How many legs does a spider have?"] == ("8", "eight")


# ---------------------------------------------------------------------------------------------------- voices
def test_voice_pool():
    assert len(build_mini.VOICES) >= 24 and len({v.name for v in build_mini.VOICES}) == len(build_mini.VOICES)
    train = {(v.voice, v.pitch, v.rate) for v in build_mini.voices_for("train")}
    for split in ("dev", "test"):
        held_out = {(v.voice, v.pitch, v.rate) for v in build_mini.voices_for(split)}
        assert held_out and not held_out & train, split
        assert {v.voice for v in build_mini.voices_for(split)} & {"piper:joe"}  # a Piper variant in every split
    espeak_test = {v.voice for v in build_mini.voices_for("test") if not v.piper}
    assert not espeak_test & {v.voice for v in build_mini.VOICES if v.split != "test"}  # whole accents held out
    for v in build_mini.VOICES:  # every voice passes synth's validation (engine, pitch and rate ranges)
        synth.make_utterance({"id": "x", "text": "hi", "voice": v.voice, "pitch": v.pitch, "rate": v.rate})


def test_voice_and_augmentation_choices():
    ids = [f"item{i}.q1" for i in range(400)]
    for split in ("train", "test"):
        chosen = [build_mini.choose_voice(split, i, 0) for i in ids]
        assert all(v.split == split for v in chosen)
        assert 0.35 < sum(v.piper for v in chosen) / len(chosen) < 0.65
    assert [build_mini.choose_voice("train", i, 0) for i in ids] != [build_mini.choose_voice("train", i, 1)
                                                                     for i in ids]
    augs = [build_mini.choose_augmentation("train", i, 0) for i in ids]
    assert augs == [build_mini.choose_augmentation("train", i, 0) for i in ids]
    snrs = [a["noise_snr"] for a in augs if "noise_snr" in a]
    assert snrs and all(5.0 <= s <= 20.0 for s in snrs)
    assert any("reverb" in a for a in augs) and any(a.get("telephone") for a in augs)
    assert sum(build_mini.aug_name(a) == "clean" for a in augs) > 50
    assert build_mini.choose_augmentation("test", ids[0], 0) == {}


# ---------------------------------------------------------------------------------------------------- text stage
def _text_stage(mini_dir, work, text_path, batch_size=1):
    from funaudiochat.data.cli_distill import load

    engine, tok = load(mini_dir)
    settings = build_mini.TextSettings(batch_size=batch_size, max_new_tokens=12)
    return build_mini.run_text_stage(engine, tok, text_path, work, seed=0, settings=settings, quotas=TINY_QUOTAS,
                                     asr_quota={"train": 2, "test": 1}, progress=False)


def test_text_stage_on_smollm2_resumes_to_the_same_bytes(tmp_path, mini_dir, one_thread):
    text = tmp_path / "text.jsonl.gz"
    meta = _text_stage(mini_dir, tmp_path / "work", text)
    records = build_mini.read_text(text)
    qa = [r for r in records if r["family"] != "asr"]
    assert len(qa) == 5 and meta["counts"]["test"]["gold"] == 2
    assert {r["split"] for r in records} == {"train", "dev", "test"}
    for r in qa:
        assert len(r["answers"]) == len(r["turns"]) and r["typed_answer"] == r["answers"][-1]
        assert (r["gold"] is None) == (not r["expected"])
        if r["reject"] is None:
            assert r["answers"][-1].strip() and r["finished"]
    followup = next(r for r in qa if r["family"] == "followup")
    assert all(a.strip() for a in followup["answers"])  # the second turn was answered with the first as history
    for r in (r for r in records if r["family"] == "asr"):
        assert r["text"] in {build_mini.first_sentence(q["answers"][-1]) for q in qa if q["split"] == r["split"]}
    first = text.read_bytes()

    # an interruption after the first answers: rerun (resume) and get the same file, byte for byte
    turn1 = tmp_path / "work" / "turn1.jsonl"
    turn1.write_text(turn1.read_text().splitlines(keepends=True)[0])
    (tmp_path / "work" / "turn1.rejected.jsonl").write_text("")
    _text_stage(mini_dir, tmp_path / "work", text)
    assert text.read_bytes() == first
    with gzip.open(text, "rt") as f:
        assert sum(1 for _ in f) == len(records)


# ---------------------------------------------------------------------------------------------------- audio stage
def _write_text(path: Path, records: list[dict], seed: int = 0) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    build_mini.meta_path(path).write_text(json.dumps({"seed": seed, "counts": {}, "seconds": 0.0,
                                                      "settings": {"system": build_mini.MINI_SYSTEM}}))
    return path


def _qa(id_, split, question, answer, expected=(), reject=None):
    return {"id": id_, "split": split, "family": "facts", "turns": [question], "expected": list(expected),
            "answers": [answer], "typed_answer": answer, "gold": True if expected else None, "reject": reject,
            "finished": True}


AUDIO_RECORDS = [
    _qa("facts-1", "train", "What is the capital of France?", "The capital of France is Paris.", ["Paris"]),
    _qa("facts-2", "train", "Zorblat quex vindarum plosh?", "I do not know."),  # nonsense: the judge mishears it
    _qa("facts-3", "train", "What is the capital of Spain?", "It is Madrid.", reject="repetition"),  # never spoken
    _qa("facts-4", "test", "What is the capital of Italy?", "The capital of Italy is Rome.", ["Rome"]),
    {"id": "asr-1", "split": "train", "family": "asr", "turns": [], "text": "The sun is a star."},
]


@pytest.fixture(scope="module")
def judge():
    from funaudiochat.eval.asr import AsrJudge

    return AsrJudge(threads=1)


def test_audio_stage_filters_writes_records_and_resumes(tmp_path, judge, mini_dir):
    from funaudiochat.config import FunAudioChatConfig
    from funaudiochat.text.tokenizer import TextTokenizer
    from funaudiochat.train.data import SampleBuilder, load_records

    text = _write_text(tmp_path / "text.jsonl.gz", AUDIO_RECORDS)
    out = tmp_path / "build"
    out.mkdir()
    summary = build_mini.run_audio_stage(text, out, judge=judge, progress=False)
    journal = {e["id"]: e for e in map(json.loads, (out / "clips.jsonl").read_text().splitlines())}
    bases = ["facts-1.q1", "facts-2.q1", "facts-4.q1", "asr-1"]
    assert set(bases) | {"facts-4.q1.snr10", "facts-4.q1.phone"} <= set(journal)
    assert not any(i.startswith("facts-3") for i in journal)  # a rejected answer is never spoken
    nonsense = [journal[i] for i in ("facts-2.q1", "facts-2.q1.r1", "facts-2.q1.r2")]  # tried in 3 voices
    assert all((e["kept"], e["reason"]) == (False, "asr_wer") and e["wer"] > build_mini.MAX_WER for e in nonsense)
    assert len({e["voice"] for e in nonsense}) > 1 and not list(out.glob("audio/*/facts-2*"))
    for e in journal.values():  # the judge's verdict decides, and every voice is one of the clip's split
        assert e["kept"] == (e["wer"] <= build_mini.MAX_WER or e["split"].startswith("test_")), e
        assert e["voice"] in {v.name for v in build_mini.voices_for(e["split"].split("_")[0])}
    assert summary["dropped_in_every_voice"].get("train", 0) >= 1
    assert summary["kept"] + sum(summary["rejected"].values()) == summary["attempts"] == len(journal)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert "facts-2" not in {r["id"] for r in train} and "facts-3" not in {r["id"] for r in train}
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert test[0]["meta"]["typed_answer"] == "The capital of Italy is Rome." and test[0]["meta"]["gold"] is True
    assert test[0]["meta"]["voices"][0] in {v.name for v in build_mini.voices_for("test")}
    for variant in ("test_snr10", "test_phone"):  # robustness copies: same items, same voice
        copy = [json.loads(line) for line in (out / f"{variant}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in copy] == [r["id"] for r in test]
        assert copy[0]["meta"]["voices"] == test[0]["meta"]["voices"]
    # the records are what `funaudiochat train` reads: released sharegpt, user audio in, text out
    cfg = FunAudioChatConfig.load(mini_dir / "config.json")
    samples, report = load_records([out / "train.jsonl", out / "test.jsonl"],
                                   SampleBuilder(TextTokenizer.from_file(mini_dir), cfg, 512).sample, "reject")
    assert report.kept == len(train) + len(test) and all(s.audios[0].wav for s in samples)
    tasks = {r["id"]: r["task"] for r in train}
    for item, task in (("asr-1", "asr"), ("facts-1", "qa")):  # a record exactly for the items whose clips passed
        kept = build_mini.kept_entry(journal, item if task == "asr" else item + ".q1")
        assert tasks.get(item) == (task if kept else None)

    # the pre-alignment records: every kept train clip as an ASR record, its spoken text as the transcript
    clips = [json.loads(line) for line in (out / "train_clips_asr.jsonl").read_text().splitlines()]
    kept_train = {e["path"]: e for e in journal.values() if e["kept"] and e["split"] == "train"}
    assert sorted(json.loads(r["audio"][0])["path"] for r in clips) == sorted(kept_train)
    for r in clips:
        spoken = kept_train[json.loads(r["audio"][0])["path"]]["text"]
        assert r["task"] == "asr" and r["messages"][1]["content"] == spoken
    assert {r["id"] for r in train if r["task"] == "asr"} <= {r["id"].replace(".clip1", "") for r in clips} | \
        {r["id"].replace(".clip1", ".asr") for r in clips}
    assert load_records([out / "train_clips_asr.jsonl"], SampleBuilder(TextTokenizer.from_file(mini_dir), cfg,
                                                                        512).sample, "reject")[1].kept == len(clips)

    # manifest: every kept wav with its sha256; verify passes, and fails on a changed file
    assert build_mini.verify_manifest(out)["set_sha256"] == summary["manifest_sha256"]
    # two worker processes (each with its own judge) make the same clips, verdicts and records
    parallel = tmp_path / "parallel"
    parallel.mkdir()
    assert build_mini.run_audio_stage(text, parallel, progress=False, workers=2)["manifest_sha256"] \
        == summary["manifest_sha256"]
    pjournal = {e["id"]: e for e in map(json.loads, (parallel / "clips.jsonl").read_text().splitlines())}
    assert {i: (e["kept"], e["voice"]) for i, e in pjournal.items()} == \
        {i: (e["kept"], e["voice"]) for i, e in journal.items()}
    assert all((parallel / f"{s}.jsonl").read_bytes() == (out / f"{s}.jsonl").read_bytes()
               for s in ("train", "test", "test_snr10", "test_phone"))
    # replay of the manifest (two workers, no judge): the same wavs, verdicts and records; rejected attempts unmade
    replayed = tmp_path / "replayed"
    replayed.mkdir()
    rsummary = build_mini.run_audio_stage(text, replayed, progress=False, workers=2, replay=out / "manifest.jsonl")
    assert rsummary["manifest_sha256"] == summary["manifest_sha256"]
    assert rsummary["replay"]["same_bytes"] == rsummary["replay"]["made"] == summary["kept"]
    assert all((replayed / f"{s}.jsonl").read_bytes() == (out / f"{s}.jsonl").read_bytes()
               for s in ("train", "test", "test_snr10", "test_phone"))
    rjournal = {e["id"]: e for e in map(json.loads, (replayed / "clips.jsonl").read_text().splitlines())}
    assert {i: e["kept"] for i, e in rjournal.items()} == {i: e["kept"] for i, e in journal.items()}
    assert all(rjournal[i]["reason"] == "rejected_in_manifest" for i in ("facts-2.q1", "facts-2.q1.r1"))
    # the test split alone from the full manifest (evaluation without the train audio): the same test records
    test_only = tmp_path / "test_only"
    test_only.mkdir()
    tsummary = build_mini.run_audio_stage(text, test_only, progress=False, replay=out / "manifest.jsonl",
                                          splits=("test",))
    assert tsummary["splits"] == ["test"] and not (test_only / "train.jsonl").exists()
    assert all((test_only / f"{s}.jsonl").read_bytes() == (out / f"{s}.jsonl").read_bytes()
               for s in ("test", "test_snr10", "test_phone"))
    assert {p.parent.name for p in test_only.glob("audio/*/*.wav")} == {"test", "test_snr10", "test_phone"}
    with pytest.raises(InputError, match="unknown split"):
        build_mini.run_audio_stage(text, tmp_path / "bad", progress=False, splits=("tset",))
    other = tmp_path / "other.jsonl"  # a manifest of another plan is refused before anything is made
    other.write_text(json.dumps({"id": "facts-9.q1", "text": "x", "voice": "x", "aug": {}}) + "\n")
    with pytest.raises(InputError, match="1 clip\\(s\\) this build does not plan"):
        build_mini.run_audio_stage(text, tmp_path / "other", progress=False, replay=other)
    # resume: nothing is made again, the records and the set hash stay the same
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    again = build_mini.run_audio_stage(text, out, judge=judge, progress=False)
    assert again["manifest_sha256"] == summary["manifest_sha256"]
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before
    # an interruption that lost a wav: only that clip is made again
    lost = out / journal["facts-4.q1.snr10"]["path"]
    lost.unlink()
    build_mini.run_audio_stage(text, out, judge=judge, progress=False)
    lines = (out / "clips.jsonl").read_text().splitlines()
    assert len(lines) == len(journal) + 1 and json.loads(lines[-1])["id"] == "facts-4.q1.snr10" and lost.is_file()
    build_mini.verify_manifest(out)
    wav = out / journal["facts-4.q1.phone"]["path"]
    wav.write_bytes(wav.read_bytes()[:-2] + b"\x01\x02")
    with pytest.raises(InputError, match="facts-4.q1.phone.wav \\(different content\\)"):
        build_mini.verify_manifest(out)


def test_answers_stage_speaks_kept_train_answers_as_more_asr_records(tmp_path, judge, mini_dir):
    """`--stage answers`: every sentence of each kept train answer that is not already an ASR item or a question,
    spoken once in a train voice and judged; first sentences first; one later sentence in HELD_OUT_EVERY written
    apart, never trained on; records, a manifest of their own (replayable), and the audio stage's files untouched."""
    from funaudiochat.config import FunAudioChatConfig
    from funaudiochat.text.tokenizer import TextTokenizer
    from funaudiochat.train.data import SampleBuilder, load_records

    records = AUDIO_RECORDS + [
        _qa("facts-5", "train", "What is the capital of Peru?",
            "The capital of Peru is Lima. Lima has good food. It is on the coast."),
        _qa("facts-6", "train", "Which star is closest?", "The sun is a star."),  # already the ASR item's sentence
        _qa("facts-7", "train", "Say hi.", "Hi! What is the capital of Italy?"),  # too short; a (test) question
    ]
    text = _write_text(tmp_path / "text.jsonl.gz", records)
    plan = build_mini.plan_answer_clips(build_mini.read_text(text), seed=0)
    assert [(c.id, c.text) for c in plan] == [("facts-1.a1", "The capital of France is Paris."),
                                              ("facts-2.a1", "I do not know."),
                                              ("facts-5.a1", "The capital of Peru is Lima."),
                                              ("facts-5.a2", "Lima has good food."),
                                              ("facts-5.a3", "It is on the coast.")]
    assert [build_mini.held_out_sentence(c.text) for c in plan[2:]] == [False, True, False]
    assert all(c.voice in build_mini.voices_for("train") for c in plan)
    out = tmp_path / "build"
    out.mkdir()
    (out / "manifest.jsonl").write_text("the audio stage's\n")
    summary = build_mini.run_answers_stage(text, out, judge=judge, progress=False)
    assert (out / "manifest.jsonl").read_text() == "the audio stage's\n"
    journal = {e["id"]: e for e in map(json.loads, (out / "clips.jsonl").read_text().splitlines())}
    kept = {c.id for c in plan if build_mini.kept_entry(journal, c.id)}
    assert kept >= {"facts-1.a1", "facts-5.a1", "facts-5.a2", "facts-5.a3"} and summary["kept"] == len(kept)
    read = lambda name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    answers, held = read("train_answers_asr"), read("train_voices_heldout_asr")
    assert [r["id"] for r in answers] == [c.item + ".answer" for c in plan if c.id in kept and c.id.endswith(".a1")] \
        + ["facts-5.answer3"]
    assert [(r["id"], r["messages"][1]["content"]) for r in held] == [("facts-5.answer2", "Lima has good food.")]
    assert answers[0]["task"] == "asr" and answers[0]["messages"][1]["content"] == "The capital of France is Paris."
    assert summary["records"] == {"train_answers_asr": len(answers), "train_voices_heldout_asr": 1}
    cfg = FunAudioChatConfig.load(mini_dir / "config.json")
    builder = SampleBuilder(TextTokenizer.from_file(mini_dir), cfg, 512)
    assert load_records([out / "train_answers_asr.jsonl"], builder.sample, "reject")[1].kept == len(answers)
    assert build_mini.verify_manifest(out, build_mini.ANSWERS_MANIFEST)["set_sha256"] == summary["manifest_sha256"]
    replayed = tmp_path / "replayed"  # a fresh machine: the same clips from the manifest, without the judge
    replayed.mkdir()
    again = build_mini.run_answers_stage(text, replayed, progress=False, workers=2,
                                         replay=out / f"{build_mini.ANSWERS_MANIFEST}.jsonl")
    assert again["manifest_sha256"] == summary["manifest_sha256"]
    for name in ("train_answers_asr", "train_voices_heldout_asr"):
        assert (replayed / f"{name}.jsonl").read_bytes() == (out / f"{name}.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "funaudiochat.cli", "data", "build-mini", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_refuses_to_overwrite_and_checks_seeds(tmp_path):
    out = tmp_path / "build"
    text = _write_text(tmp_path / "text.jsonl.gz", AUDIO_RECORDS[4:], seed=3)
    run = _cli("--out", out, "--stage", "audio", "--text", text, "--resume", "--no-progress")
    assert run.returncode == 1 and "made with seed 3, not 0" in run.stderr and "Traceback" not in run.stderr
    run = _cli("--out", out, "--stage", "audio", "--text", text, "--no-progress")
    assert run.returncode == 1 and "already holds a build" in run.stderr
    run = _cli("--out", tmp_path / "other", "--stage", "text", "--limit", "2")
    assert run.returncode == 1 and "give --text a path other than" in run.stderr and not (tmp_path / "other").exists()
    run = _cli("--out", tmp_path / "other", "--stage", "all", "--splits", "test")
    assert run.returncode == 1 and "give --stage audio or speech" in run.stderr and not (tmp_path / "other").exists()


def test_cli_seed_of_a_build_and_verify_without_manifest(tmp_path, capsys):
    from funaudiochat.cli import main as cli_main

    out = tmp_path / "build"
    build_mini.claim_out(out, seed=0, resume=False)
    text = _write_text(tmp_path / "text.jsonl.gz", AUDIO_RECORDS[4:], seed=3)
    assert cli_main(["data", "build-mini", "--out", str(out), "--text", str(text), "--resume", "--seed", "3"]) == 1
    assert "with seed 0, not 3" in capsys.readouterr().err
    assert cli_main(["data", "build-mini", "--out", str(out), "--verify"]) == 1
    assert "no manifest" in capsys.readouterr().err


def test_asr_sentences_are_clean_and_never_in_two_splits():
    def rec(split, answer, reject=None):
        return {"split": split, "answers": [answer], "reject": reject}

    records = [rec("test", "The capital of France is Paris. It is lovely."), rec("train", "The capital of France is "
               "Paris."), rec("train", "Seventeen plus one is eighteen, I think."), rec("train", "It is 42 + 1."),
               rec("dev", "The moon orbits the Earth."), rec("train", "A cat is a small furry animal.", "repetition")]
    items = build_mini.asr_items(records, seed=0)
    assert sorted((i["split"], i["text"]) for i in items) == [
        ("dev", "The moon orbits the Earth."), ("test", "The capital of France is Paris."),
        ("train", "Seventeen plus one is eighteen, I think.")]
    assert len({i["id"] for i in items}) == len(items)
    assert build_mini.asr_items(records, seed=0, quota={"dev": 5}) == [
        i for i in items if i["split"] == "dev"]


def test_clip_plan_skips_rejected_answers_but_keeps_every_test_item():
    records = AUDIO_RECORDS + [_qa("facts-5", "test", "What is the capital of Peru?", "Lima Lima Lima.", ["Lima"],
                                   reject="repetition"),
                               {**_qa("followup-1", "dev", "What is a comet?", "A ball of ice."),
                                "turns": ["What is a comet?", "Tell me more."], "answers": ["A", "B"]}]
    clips = {c.id: c for c in build_mini.plan_clips(records, seed=0)}
    assert set(clips) == {"facts-1.q1", "facts-2.q1", "facts-4.q1", "facts-4.q1.snr10", "facts-4.q1.phone", "asr-1",
                          "facts-5.q1", "facts-5.q1.snr10", "facts-5.q1.phone", "followup-1.q1", "followup-1.q2"}
    assert clips["followup-1.q2"].text == "Tell me more." and clips["followup-1.q2"].split == "dev"
    assert clips["facts-5.q1.phone"].base == "facts-5.q1" and dict(clips["facts-5.q1.phone"].aug) == {
        "telephone": True}
    assert dict(clips["facts-5.q1.snr10"].aug) == {"noise_snr": 10.0} and clips["facts-5.q1"].aug == ()
    assert [c.id for c in build_mini.plan_clips(records, seed=0)] == list(clips)
