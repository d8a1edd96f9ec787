"""The ASR judge: Whisper-equal English normalisation, WER/CER, transcription of synthesized speech, the CLI."""
from __future__ import annotations

import json

import pytest

from funaudiochat.cli import main as cli_main
from funaudiochat.data import synth
from funaudiochat.errors import InputError
from funaudiochat.eval.asr import AsrJudge, error_rates, read_manifest
from funaudiochat.eval.normalize import SPELLINGS, normalize_english

ORACLE_CASES = [
    "Hello, world!",
    "I won't go, can't you see? Let's go!",
    "He's been there; she'd gone home. They're here.",
    "Dr. Smith and Mr. Jones met at St. Paul's.",
    "[MUSIC] (laughs) Um, I think, uh, yes.",
    "It costs twenty five dollars and fifty cents.",
    "There were two hundred and five people.",
    "About three point five million people live there.",
    "In nineteen ninety nine we had one oh one dalmatians.",
    "The twenty first century began in two thousand and one.",
    "Ten percent of 1,000 is 100.",
    "She was born on the 3rd of May, 1985.",
    "I have one apple and two oranges.",
    "My favourite colour is grey, at the theatre centre.",
    "Café naïve façade œuvre straße.",
    "The 1990s were great; the nineteen nineties.",
    "He scored ninety-nine points in the fourth quarter.",
    "It's 3.14 approximately, and $20 million.",
    "Call me at five five five one two three four.",
    "The first, second and third place winners got prizes.",
    "A thousand years ago, hundreds of people lived here.",
    "Seventy five thousand three hundred and twelve.",
    "It weighs 5kg and is 10cm long.",
    "Zero, one, two, three.",
    "Twenty twenty was a strange year.",
    "They organised a programme to analyse the behaviour of the neighbours.",
    "You'll see; we've done it. I'm sure.",
    "Hmm... the point is, point five of them.",
]


def test_normalizer_equals_whisper_english_normalizer():
    oracle_module = pytest.importorskip("transformers.models.whisper.english_normalizer")
    oracle = oracle_module.EnglishTextNormalizer(SPELLINGS)  # same spelling table: ours is a subset of Whisper's
    for text in ORACLE_CASES:
        assert normalize_english(text) == oracle(text).strip(), text


@pytest.mark.parametrize("text,expected", [
    ("It's TWENTY-ONE degrees!", "it is 21 degrees"),
    ("  spaced\t\nout  ", "spaced out"),
    ("The colour grey.", "the color gray"),
    ("", ""),
])
def test_normalizer_examples(text, expected):
    assert normalize_english(text) == expected


def test_error_rates_count_edits():
    wer, cer = error_rates(["the cat sat down"], ["the bat sat"])  # 1 substitution + 1 deletion of 4 words
    assert wer == pytest.approx(2 / 4)
    assert cer == pytest.approx(6 / 16)  # "c"->"b", then " down" deleted (5 chars) over 16 characters
    assert error_rates(["a b", "c d e"], ["a b", "c d e"]) == (0.0, 0.0)


@pytest.fixture(scope="module")
def judge():
    return AsrJudge()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Two synthesized utterances, and a third line that pairs a.wav with the wrong text."""
    out = tmp_path_factory.mktemp("asr")
    utts = [synth.make_utterance({"id": "a", "text": "What is the capital city of France?"}),
            synth.make_utterance({"id": "b", "text": "Please remind me to call my mother at six this evening."})]
    path = synth.synthesize_many(utts, out, progress=False).manifest
    wrong = {"id": "c", "path": "a.wav", "text": "completely unrelated words about bananas"}
    path.write_text(path.read_text() + json.dumps(wrong) + "\n")
    return path


def test_judge_scores_a_manifest(judge, manifest):
    report = judge.score(manifest)
    items = {i["id"]: i for i in report["items"]}
    assert report["n"] == 3 and list(items) == ["a", "b", "c"]
    # Piper samples its noise, so the speech differs per run: most draws give WER 0, a rare one 3 words in 11 (CI)
    assert items["a"]["wer"] <= 0.35 and items["b"]["wer"] <= 0.35, report["items"]
    assert items["c"]["wer"] >= 0.8 and items["c"]["hypothesis"] == items["a"]["hypothesis"]
    refs = [normalize_english(i["reference"]) for i in report["items"]]
    hyps = [normalize_english(i["hypothesis"]) for i in report["items"]]
    assert (report["wer"], report["cer"]) == error_rates(refs, hyps)


def test_pairs_and_empty_references(judge, manifest):
    (_, a, _), (_, b, text_b), _ = read_manifest(manifest)
    report = judge.score([(a, "[MUSIC]"), (b, text_b)])
    assert report["n"] == 1 and report["items"][0]["wer"] is None  # nothing to score against
    assert report["wer"] == report["items"][1]["wer"]


def test_transcribe_resamples_any_rate(judge, manifest):
    from funaudiochat.audio.io import load_audio

    _, path, text = read_manifest(manifest)[0]
    hypothesis = judge.transcribe(load_audio(path, 24000), 24000)
    assert normalize_english(hypothesis) == normalize_english(text)


def test_bad_manifests_are_input_errors(tmp_path, judge):
    with pytest.raises(InputError, match="no such manifest"):
        judge.score(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no path"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="bad.jsonl:1"):
        judge.score(bad)


def test_cli_eval_asr_report_and_filter(tmp_path, manifest, capsys):
    report_path, kept_path = tmp_path / "report.json", tmp_path / "sub" / "kept.jsonl"
    rc = cli_main(["eval", "asr", str(manifest), "--out", str(report_path), "--max-wer", "0.2",
                   "--filtered", str(kept_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert f"WER {100 * report['wer']:.2f} %" in printed
    kept = [json.loads(line) for line in kept_path.read_text().splitlines()]
    assert [k["id"] for k in kept] == [i["id"] for i in report["items"] if i["wer"] <= 0.2]
    assert "c" not in [k["id"] for k in kept]
    for record in kept:
        assert (kept_path.parent / record["path"]).is_file()  # paths rewritten relative to the new manifest
    assert cli_main(["eval", "asr", str(manifest), "--max-wer", "0.1"]) == 1  # needs --filtered too
