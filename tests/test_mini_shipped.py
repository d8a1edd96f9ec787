"""The shipped fun-audio-chat-mini (issue 12 must-show 6): `assets mini` assembles it offline from the pip-shipped
parts plus the committed models/mini/deltas.safetensors, and it answers the README's spoken question, a test-split
clip in a voice never heard in training, correctly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DELTAS = ROOT / "models" / "mini" / "deltas.safetensors"
QUESTION = "What is the capital of Norway?"  # test item facts-95bea16bf2, spoken by an espeak voice never trained on
QUESTION_VOICE = "espeak:en-029+m4"
GOLD = "oslo"


def _skip_reason() -> str | None:
    from funaudiochat.assets.mini_deltas import RELEASE_STAGES, stage_of

    if not DELTAS.is_file():
        return "models/mini/deltas.safetensors is not committed yet"
    stage = stage_of(DELTAS)
    if stage not in RELEASE_STAGES:
        return f"models/mini holds the {stage!r} stage's deltas (training progress), not a release"
    return None


SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))


def _cli(*args, timeout=600):
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("shipped") / "mini"
    _cli("assets", "mini", ckpt, "--deltas", DELTAS.parent)
    return ckpt


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    """The spoken question, made as the mini's test clips are (espeak, 16 kHz): no audio is committed."""
    import soundfile as sf

    from funaudiochat.data.synth import make_utterance, synthesize

    path = tmp_path_factory.mktemp("question") / "question.wav"
    sf.write(path, synthesize(make_utterance({"id": "q", "text": QUESTION, "voice": QUESTION_VOICE})), 16000)
    return path


def test_shipped_mini_answers_the_readme_question(shipped, question, tmp_path):
    config = json.loads((shipped / "config.json").read_text())
    assert config["trained"]["hearing"] is True
    out = tmp_path / "answer"
    stdout = _cli("infer", "--model", shipped, "--audio", question, "--mode", "s2t", "--max-new-tokens", "48",
                  "--threads", "2", "--out", out)
    answer = (out / "answer.txt").read_text(encoding="utf-8")
    assert answer.strip() and answer.strip() in stdout
    assert GOLD in answer.lower(), answer


def test_shipped_mini_says_its_answer(shipped, question, tmp_path):
    """Issue 14 must-show 7: the README's main job speaks; the ASR judge hears the answer's own text in its wav."""
    from funaudiochat.audio.io import load_audio
    from funaudiochat.eval.asr import WHISPER_RATE, AsrJudge, error_rates
    from funaudiochat.eval.normalize import normalize_english

    if not json.loads((shipped / "config.json").read_text())["trained"]["speaking"]:
        pytest.skip("the shipped deltas do not train the speech head yet")
    out = tmp_path / "answer"
    _cli("infer", "--model", shipped, "--audio", question, "--threads", "2", "--seed", "0", "--out", out)
    text = normalize_english((out / "answer.txt").read_text(encoding="utf-8"))
    heard = normalize_english(AsrJudge(threads=2).transcribe(load_audio(out / "answer.wav", WHISPER_RATE),
                                                             WHISPER_RATE))
    assert text, "the answer has no text"
    wer, _ = error_rates([text], [heard])
    assert wer <= 0.15, (text, heard, wer)
