"""Speech synthesis for the data factory: engines, controls, augmentation, manifest, resumability, CLI.

The intelligibility test is a small version of bench/synth.py (8 utterances per engine, same WER thresholds).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from funaudiochat.cli import main as cli_main
from funaudiochat.data import augment, synth
from funaudiochat.errors import InputError

SENTENCES = [
    "The weather is lovely today, so we should go for a walk in the park.",
    "Could you tell me how to get to the nearest train station?",
    "Please remind me to call my mother at six this evening.",
    "I would like to order a large pizza with mushrooms and olives.",
    "What is the capital city of France?",
    "The children were playing football in the garden after school.",
    "Turn off the lights in the kitchen before you go to bed.",
    "My favorite book is a long story about a journey across the sea.",
]


def _utt(text: str, voice: str = "piper", **kw) -> synth.Utterance:
    return synth.make_utterance({"id": "t", "text": text, "voice": voice, **kw})


@pytest.fixture(scope="module")
def judge():
    from funaudiochat.eval.asr import AsrJudge

    return AsrJudge()


@pytest.mark.parametrize("voice,max_wer", [("piper", 0.10), ("espeak:en-us", 0.20)])
def test_synthesised_speech_is_understood_by_the_asr_judge(tmp_path, judge, voice, max_wer):
    utts = [synth.make_utterance({"id": f"s{i}", "text": t, "voice": voice}) for i, t in enumerate(SENTENCES)]
    report = synth.synthesize_many(utts, tmp_path, progress=False)
    scored = judge.score(report.manifest)
    assert scored["n"] == len(SENTENCES)
    assert scored["wer"] <= max_wer, [(i["reference"], i["hypothesis"]) for i in scored["items"] if i["wer"]]


def test_espeak_utterance_sounds_the_same_whatever_was_said_before():
    """espeak-ng carries state from one utterance to the next; each is made from the freshly initialised state."""
    engine = synth._engine("espeak")
    first = engine.synthesize(SENTENCES[4], "en-us+f3", 1.0)
    engine.synthesize(SENTENCES[0], "en-gb-x-rp+m3", 1.3)
    assert np.array_equal(first, engine.synthesize(SENTENCES[4], "en-us+f3", 1.0))


def test_piper_in_parts_is_the_packaged_voice_with_seeded_noise():
    """Without noise, the parts path (encoder, durations, flow + decoder) is piper's whole graph; with noise, the
    same seed gives the same audio (the whole graph draws its noise unseeded) and another seed another take."""
    from piper import PiperVoice
    from piper.config import SynthesisConfig

    from funaudiochat.speech.piper_voice import voice_files

    engine = synth.PiperEngine(threads=1)
    text = SENTENCES[4] + " " + SENTENCES[0]  # two sentences: one piece each
    mine = engine.parts.speak(text, 1.0, np.random.default_rng(0), noise_scale=0.0, noise_w=0.0)
    model, config = voice_files()
    theirs = np.concatenate([c.audio_float_array for c in PiperVoice.load(model, config).synthesize(
        text, SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0))])
    assert mine.shape == theirs.shape
    np.testing.assert_allclose(mine, theirs, atol=2e-3)  # onnxruntime fp32 on two graph cuts, both [-1, 1]
    take = engine.synthesize(SENTENCES[4], 1.0, np.random.default_rng(7))
    assert np.array_equal(take, engine.synthesize(SENTENCES[4], 1.0, np.random.default_rng(7)))
    other = engine.synthesize(SENTENCES[4], 1.0, np.random.default_rng(8))
    assert other.shape != take.shape or not np.allclose(other, take, atol=1e-3)


@pytest.mark.parametrize("voice", ["piper", "espeak:en-us"])
def test_rate_one_and_a_half_shortens_duration_by_a_quarter(voice):
    text = SENTENCES[0]
    normal = synth.synthesize(_utt(text, voice), 16000).shape[0]
    fast = synth.synthesize(_utt(text, voice, rate=1.5), 16000).shape[0]
    assert fast <= 0.75 * normal, (fast, normal)


def median_f0(wav: np.ndarray, rate: int = 16000) -> float:
    """Median YIN F0 over the loud frames. (bench/synth.py uses librosa.pyin; its numba compile costs minutes of
    CI on 2 cores, YIN none.)"""
    librosa = pytest.importorskip("librosa")
    f0 = librosa.yin(wav, fmin=60, fmax=500, sr=rate, frame_length=1024, hop_length=256)
    rms = librosa.feature.rms(y=wav, frame_length=1024, hop_length=256)[0]
    n = min(f0.shape[0], rms.shape[0])
    return float(np.median(f0[:n][rms[:n] > 0.1 * rms.max()]))


@pytest.mark.parametrize("voice", ["piper", "espeak:en-us"])
def test_pitch_up_raises_median_f0(voice):
    text = "Hello, how are you doing this morning?"
    base = median_f0(synth.synthesize(_utt(text, voice), 16000))
    up = median_f0(synth.synthesize(_utt(text, voice, pitch=4.0), 16000))  # 2**(4/12) = 1.26
    assert up >= 1.15 * base, (base, up)
    down = median_f0(synth.synthesize(_utt(text, voice, pitch=-4.0), 16000))
    assert down <= base / 1.15, (base, down)


def test_pitch_shift_keeps_duration():
    text = SENTENCES[1]
    base = synth.synthesize(_utt(text, "espeak:en-us"), 16000).shape[0]
    shifted = synth.synthesize(_utt(text, "espeak:en-us", pitch=-5.0), 16000).shape[0]
    assert abs(shifted - base) <= 0.05 * base


def test_every_listed_english_espeak_voice_speaks():
    lengths = {v: synth.synthesize(_utt("Good evening.", f"espeak:{v}"), 16000).shape[0]
               for v in synth.ESPEAK_ENGLISH_VOICES}
    assert all(0.4 * 16000 < n < 2.5 * 16000 for n in lengths.values()), lengths


def test_mandarin_through_the_espeak_1_52_library():
    engine = synth._engine("espeak")
    assert engine.version.startswith("1.52"), engine.version  # Debian's 1.51 reads Mandarin wrongly
    text = "今天天气很好，我们去公园散步吧。"  # 14 syllables
    wav = synth.synthesize(synth.make_utterance({"id": "zh", "text": text, "lang": "zh"}), 16000)
    seconds = wav.shape[0] / 16000
    assert 14 * 0.12 <= seconds <= 14 * 0.6, seconds
    frames = wav[: wav.shape[0] // 400 * 400].reshape(-1, 400)
    voiced = np.sqrt((frames**2).mean(axis=1)) > 0.02
    assert voiced.mean() > 0.4  # mostly sound, not silence


def test_volume_scales_the_level():
    wav = synth.synthesize(_utt("Testing the volume.", "espeak:en-us"), 16000)
    quiet = synth.synthesize(_utt("Testing the volume.", "espeak:en-us", volume=0.25), 16000)
    assert np.max(np.abs(wav)) == pytest.approx(synth.PEAK, rel=0.05)
    assert np.max(np.abs(quiet)) == pytest.approx(0.25 * np.max(np.abs(wav)), rel=0.05)


def test_output_sample_rate_and_augmentation_are_applied():
    plain = synth.synthesize(_utt("One two three.", "espeak:en-us"), 24000)
    augmented = synth.synthesize(_utt("One two three.", "espeak:en-us", noise_snr=5.0, reverb=0.3, telephone=True),
                                 24000)
    assert augmented.shape[0] > plain.shape[0]  # the reverb tail
    spectrum = np.abs(np.fft.rfft(augmented)) ** 2
    freqs = np.fft.rfftfreq(augmented.shape[0], 1 / 24000)
    assert spectrum[freqs > 4000].sum() < 1e-6 * spectrum.sum()


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("color", ["white", "pink"])
@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
def test_noise_is_added_at_the_requested_snr(color, snr):
    rng = np.random.default_rng(1)
    clean = synth.synthesize(_utt(SENTENCES[2], "espeak:en-us"), 16000)
    noisy = augment.add_noise(clean, snr, rng, color)
    measured = 10 * np.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum((noisy - clean).astype(np.float64) ** 2))
    assert abs(measured - snr) <= 0.5, measured


def test_pink_noise_has_more_power_at_low_frequencies():
    rng = np.random.default_rng(0)
    for color, low_over_high in (("white", (0.5, 2.0)), ("pink", (10.0, np.inf))):
        power = np.abs(np.fft.rfft(augment.noise(64000, color, rng))) ** 2
        freqs = np.fft.rfftfreq(64000, 1 / 16000)
        ratio = power[(freqs > 100) & (freqs < 500)].mean() / power[(freqs > 4000) & (freqs < 8000)].mean()
        assert low_over_high[0] <= ratio <= low_over_high[1], (color, ratio)


@pytest.mark.parametrize("rate", [16000, 24000, 44100])
def test_telephone_has_no_energy_above_4khz(rate):
    rng = np.random.default_rng(0)
    wav = (0.3 * rng.standard_normal(rate)).astype(np.float32)  # white noise: energy at every frequency
    out = augment.telephone(wav, rate)
    assert out.shape == wav.shape
    spectrum = np.abs(np.fft.rfft(out)) ** 2
    freqs = np.fft.rfftfreq(out.shape[0], 1 / rate)
    assert spectrum[freqs > 4000].sum() < 1e-6 * spectrum.sum()
    assert spectrum[(freqs > 500) & (freqs < 3000)].sum() > 0.5 * spectrum.sum()  # the voice band survives


def test_reverb_keeps_level_and_decays():
    rng = np.random.default_rng(0)
    click = np.zeros(16000, np.float32)
    click[100] = 1.0
    out = augment.add_reverb(click, 16000, 0.5, rng)
    assert out.shape[0] == 16000 + 8000 - 1
    assert np.sqrt(np.mean(out.astype(np.float64) ** 2)) == pytest.approx(np.sqrt(np.mean(click**2)), rel=1e-4)
    early, late = np.abs(out[200:2000]).mean(), np.abs(out[6000:8000]).mean()
    assert late < 0.1 * early
    with pytest.raises(InputError, match="RT60"):
        augment.add_reverb(click, 16000, 0.0, rng)


def test_noise_on_silence_is_refused():
    with pytest.raises(InputError, match="silent"):
        augment.add_noise(np.zeros(100, np.float32), 10.0, np.random.default_rng(0))


# ---------------------------------------------------------------- requests, manifest, resume, CLI


def test_parse_requests_text_and_jsonl(tmp_path):
    txt = tmp_path / "lines.txt"
    txt.write_text("Hello there.\n\nSecond line.\n", encoding="utf-8")
    items = synth.parse_requests(txt, {"voice": "espeak:en-us", "rate": 1.2})
    assert [(u.id, u.text, u.voice, u.rate) for u in items] == [("utt000001", "Hello there.", "espeak:en-us", 1.2),
                                                                ("utt000003", "Second line.", "espeak:en-us", 1.2)]
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_text('{"id": "a", "text": "Hi.", "pitch": 2}\n{"text": "你好", "lang": "zh"}\n', encoding="utf-8")
    a, b = synth.parse_requests(jsonl)
    assert (a.voice, a.pitch, b.id, b.voice) == ("piper", 2.0, "utt000002", "espeak:cmn")


@pytest.mark.parametrize("line,message", [
    ('{"text": ""}', "text is empty"),
    ('{"text": "x", "voice": "festival"}', "use 'piper' or 'espeak"),
    ('{"text": "x", "voice": "piper", "lang": "zh"}', "English only"),
    ('{"text": "x", "rate": 3}', "rate 3.0 is outside"),
    ('{"text": "x", "id": "../etc"}', "names a file"),
    ('{"text": "x", "speed": 2}', "unknown field"),
    ('{"text": "x", "noise": "brown"}', "noise 'brown'"),
    ('{"text": "x", "voice": "espeak:en-us", "rate": 0.5, "pitch": 12}', "it can do"),
    ('{"text": "x", "rate": "fast"}', "wrong type"),
    ('{"text": "x", "telephone": "no"}', "true or false"),
    ('not json', "not valid JSON"),
    ('{"text": "x", "voice": "piper:amy"}', "the only Piper voice shipped is 'piper:joe'"),
    ('{"text": "x", "voice": "espeak:klingon"}', "speaks piqd, not English .*English espeak voices: en, "),
    ('{"text": "x", "lang": "zh", "voice": "espeak:en-us"}', "not Mandarin .*Mandarin espeak voices: cmn"),
    ('{"text": "x", "voice": "espeak:en-us+nobody"}', "unknown espeak-ng variant 'nobody'; variants: .*f3"),
])
def test_bad_requests_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=message) as err:
        synth.parse_requests(path)
    assert "bad.jsonl:2" in str(err.value)


def test_duplicate_ids_and_unknown_espeak_voice(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="duplicate id"):
        synth.parse_requests(path)
    with pytest.raises(InputError, match="unknown espeak-ng voice 'no-such-voice'; English espeak voices: en, "):
        _utt("hello", "espeak:no-such-voice")


def _check_manifest(manifest, utts, sample_rate):
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == [u.id for u in utts]
    for record, utt in zip(records, utts):
        info = sf.info(str(manifest.parent / record["path"]))
        assert info.samplerate == record["sample_rate"] == sample_rate
        assert record["duration"] == pytest.approx(info.frames / info.samplerate)
        assert record["text"] == utt.text and record["settings"]["rate"] == utt.rate
    return records


def test_synthesize_many_resumes_and_keeps_the_manifest_consistent(tmp_path):
    texts = ["First sentence.", "Second sentence here.", "Third one.", "And the fourth."]
    utts = [synth.make_utterance({"id": f"u{i}", "text": t, "voice": "espeak:en-us"}) for i, t in enumerate(texts)]
    out = tmp_path / "out"
    report = synth.synthesize_many(utts, out, progress=False)
    assert (report.synthesized, report.reused) == (4, 0)
    first = _check_manifest(report.manifest, utts, 16000)
    assert not (out / "manifest.jsonl.partial").exists()

    again = synth.synthesize_many(utts, out, progress=False)
    assert (again.synthesized, again.reused) == (0, 4)
    assert again.records == first

    (out / "u1.wav").write_bytes(b"")  # a broken wav is made again
    utts[2] = synth.make_utterance({"id": "u2", "text": "Third one.", "voice": "espeak:en-us", "rate": 1.3})
    resumed = synth.synthesize_many(utts, out, progress=False)
    assert (resumed.synthesized, resumed.reused) == (2, 2)
    _check_manifest(resumed.manifest, utts, 16000)

    # an interrupted run leaves finished items in the journal and no manifest: they are kept
    report.manifest.rename(out / "manifest.jsonl.partial")
    journal_only = synth.synthesize_many(utts, out, progress=False)
    assert (journal_only.synthesized, journal_only.reused) == (0, 4)


def test_parallel_workers_give_the_same_manifest(tmp_path):
    utts = [synth.make_utterance({"id": f"p{i}", "text": t, "voice": "espeak:en-us+f3"})
            for i, t in enumerate(SENTENCES[:4])]
    one = synth.synthesize_many(utts, tmp_path / "one", progress=False)
    two = synth.synthesize_many(utts, tmp_path / "two", workers=2, progress=False)
    assert two.synthesized == 4
    _check_manifest(two.manifest, utts, 16000)
    for a, b in zip(one.records, two.records):  # espeak-ng differs by a few samples between calls, not more
        assert {**a, "duration": 0} == {**b, "duration": 0}
        assert b["duration"] == pytest.approx(a["duration"], abs=0.01)


def test_cli_data_synth(tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("Good morning.\nHow are you?\n", encoding="utf-8")
    rc = cli_main(["data", "synth", str(lines), "--out-dir", str(tmp_path / "wavs"), "--voice", "espeak:en-us",
                   "--sample-rate", "24000", "--noise-snr", "20", "--no-progress"])
    assert rc == 0
    assert "2 utterances" in capsys.readouterr().out
    records = [json.loads(x) for x in (tmp_path / "wavs" / "manifest.jsonl").read_text().splitlines()]
    assert [r["settings"]["noise_snr"] for r in records] == [20.0, 20.0]
    assert sf.info(str(tmp_path / "wavs" / records[0]["path"])).samplerate == 24000
    assert cli_main(["data", "synth", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path)]) == 1
