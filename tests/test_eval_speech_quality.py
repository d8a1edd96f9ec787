"""Speech quality of spoken answers, on speech made with our synthesis where the truth is known: Piper at rate 1.5
is faster, a 0.3 gain is 10.5 dB quieter, synth.py's pitch shift by +4 is 4 semitones higher; the ASR judge reads
Piper's speech back with a low WER against its own text, and a high one against another text. Then the runner in
S2S mode (what `eval run --mode s2s` does) on a tiny checkpoint with a tiny detokenizer saves the answers' wavs and
scores them (bad WER: the model is random)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import make_tiny_checkpoint, write_tiny_detokenizer

from funaudiochat.audio.io import resample
from funaudiochat.data.synth import Utterance, synthesize
from funaudiochat.eval import speech_quality
from funaudiochat.eval.run import runner, suites
from funaudiochat.eval.run.adapters import LocalModel

TEXT = "The weather today is sunny and warm, with a light breeze from the west."
OTHER = "Please remember to buy eggs, flour and sugar for the birthday cake."


@pytest.fixture(scope="module")
def spoken():
    """Piper speech; quiet and high are made from the neutral wav the way synth.py applies volume and pitch (a gain;
    playing the samples 2**(4/12) times faster), since two Piper runs differ in prosody (it samples its noise)."""
    neutral = synthesize(Utterance(id="n", text=TEXT), 16000, 0)
    fast = synthesize(Utterance(id="f", text=TEXT, rate=1.5), 16000, 0)
    high = resample(neutral, int(round(16000 * 2 ** (4 / 12))), 16000)
    return {"neutral": neutral, "fast": fast, "quiet": 0.3 * neutral, "high": high}


def test_measures_follow_the_synthesis_settings(spoken):
    m = {name: speech_quality.measure(wav, 16000, TEXT) for name, wav in spoken.items()}
    assert m["neutral"]["words"] == 14 and 2.0 < m["neutral"]["words_per_s"] < 7.0
    assert m["fast"]["words_per_s"] / m["neutral"]["words_per_s"] == pytest.approx(1.5, abs=0.25)
    assert m["fast"]["duration_s"] < 0.8 * m["neutral"]["duration_s"]
    assert m["quiet"]["loudness_db"] - m["neutral"]["loudness_db"] == pytest.approx(20 * math.log10(0.3), abs=1.0)
    assert m["quiet"]["rms_dbfs"] - m["neutral"]["rms_dbfs"] == pytest.approx(20 * math.log10(0.3), abs=1.0)
    semitones = 12 * math.log2(m["high"]["f0_hz"] / m["neutral"]["f0_hz"])
    assert semitones == pytest.approx(4.0, abs=0.75)  # YIN medians: 3.57 to 4.22 seen over repeated runs
    checks = speech_quality.style_checks({"speed": "fast"}, m["fast"], m["neutral"])
    assert checks["speed"]["pass"] is True
    assert speech_quality.style_checks({"speed": "slow"}, m["fast"], m["neutral"])["speed"]["pass"] is False
    assert speech_quality.style_checks({"volume": "quiet"}, m["quiet"], m["neutral"])["volume"]["pass"] is True
    assert speech_quality.style_checks({"volume": "loud"}, m["quiet"], m["neutral"])["volume"]["pass"] is False
    assert speech_quality.style_checks({"pitch": "high"}, m["high"], m["neutral"])["pitch"]["pass"] is True
    assert speech_quality.style_checks({"pitch": "low"}, m["neutral"], m["neutral"])["pitch"]["pass"] is False
    silence = speech_quality.measure(np.zeros(16000), 16000, TEXT)
    assert silence["words_per_s"] is None and silence["loudness_db"] is None and silence["f0_hz"] is None


def test_score_with_the_asr_judge(spoken):
    answers = [{"id": "n", "text": TEXT, "wav": spoken["neutral"], "rate": 16000},
               {"id": "f", "text": TEXT, "wav": spoken["fast"], "rate": 16000, "style": {"speed": "fast"},
                "neutral": "n"},
               {"id": "wrong", "text": OTHER, "wav": spoken["neutral"], "rate": 16000},
               {"id": "lost", "error": "missing audio"}]
    records, summary = speech_quality.score(answers, runner.asr_judge())
    by_id = {r["id"]: r for r in records}
    assert by_id["n"]["wer"] < 0.2 and by_id["f"]["wer"] < 0.3 and by_id["wrong"]["wer"] > 0.7
    assert by_id["f"]["style"]["speed"]["pass"] is True and summary["style_checks"] == 1
    assert summary["style_pass"] == 100.0 and summary["failed"] == 1 and summary["scored"] == 3
    assert "error" in by_id["lost"] and summary["wer"] > 20  # the wrong text counts in the corpus WER


def test_s2s_run_scores_the_answers_speech(tmp_path):
    """The runner with the local engine in S2S mode (in-process: the ASR judge loaded above is reused)."""
    model = LocalModel(make_tiny_checkpoint(tmp_path / "tiny", "the answer is a b c"), max_new_tokens=6, speech=True,
                       detokenizer=write_tiny_detokenizer(tmp_path / "detok"))
    suite = suites.build("sample-speech", tmp_path / "suites", limit=2)
    out = tmp_path / "out" / "sample-speech"
    runner.predict(suite, model, out, progress=False)
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all((out / p["audio"]).is_file() for p in predictions if "audio" in p)
    summary = runner.score(suite, out)
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    spoken = [r for r in records if "error" not in r]
    assert spoken, records  # the tiny random model speaks (noise), so its answers are measured
    assert all(r["duration_s"] > 0 and "hypothesis" in r for r in spoken)
    assert summary["scorer"] == "speech" and summary["metric"] == "wer" and summary["scored"] == len(spoken)
    if len(spoken) == 2:  # the styled item was compared with its neutral one
        assert set(records[1]["style"]) == {"speed"} and "ratio" in records[1]["style"]["speed"]
    runner.write_report(tmp_path / "out", [summary], model.label)
    assert "## Speech of the answers" in (tmp_path / "out" / "report.md").read_text()
