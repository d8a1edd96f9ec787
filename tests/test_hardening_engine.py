"""Bad input at the inference entry points (issue 11): the Python API (`ChatSession`, `load_audio`, `load_runtime`)
and the `infer` command. Each case gets a clear InputError / one error line, nothing is loaded or generated for
nothing, and a refused, failing or cancelled turn leaves a session as it was."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from funaudiochat.audio.io import load_audio
from funaudiochat.config import FunAudioChatConfig
from funaudiochat.engine.device import resolve_device
from funaudiochat.engine.events import TextDelta, TurnEnd
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.inputs import check_trained
from funaudiochat.engine.loading import load_runtime
from funaudiochat.engine.session import ChatSession
from funaudiochat.errors import ConfigError, InputError
from funaudiochat.model.checkpoint import save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from tests.helpers import make_tiny_tokenizer, noise_audio, words, write_wav

GEN = GenerationConfig(max_new_tokens=6, eos_token_id=511, pad_token_id=500, text_greedy=True, force_text_abos=True)
CLI = [sys.executable, "-m", "funaudiochat.cli"]


def _model(seed=0):
    torch.manual_seed(seed)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    return model.eval()


@pytest.fixture(scope="module")
def engine():
    return Engine(_model(), max_seq_len=512)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint folder for the CLI cases."""
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(_model(), folder)
    make_tiny_tokenizer(folder)
    return folder


def _wav(seconds=0.5, seed=1):
    return noise_audio(seconds, seed)


def _answer(session, audio=None, text=None):
    events = list(session.ask(audio, text))
    assert isinstance(events[-1], TurnEnd)
    return events[-1]


def _session(engine, tok, **kw):
    return ChatSession(engine, tok, GEN, system=words([33]), **kw)


# ------------------------------------------------------------------ item 1: a bad turn must not poison a session
def test_nan_turn_is_refused_and_the_next_turn_answers_as_in_a_fresh_session(engine, tok):
    fresh = _answer(_session(engine, tok), _wav(), words([50]))
    session = _session(engine, tok)
    nan = np.full(16000, np.nan, np.float32)
    with pytest.raises(InputError, match="audio: contains NaN or inf"):
        session.ask(audio=nan)  # refused when called, before anything runs
    inf = _wav()
    inf[100] = np.inf
    with pytest.raises(InputError, match="NaN or inf"):
        session.ask(audio=torch.from_numpy(inf), text=words([50]))
    assert session.history == []
    after = _answer(session, _wav(), words([50]))
    assert len(after.text_ids) > 0 and after.text_ids == fresh.text_ids and after.speech_codes == fresh.speech_codes


def test_failed_abandoned_and_cancelled_turns_leave_the_history_unchanged(engine, tok):
    reference = _session(engine, tok)
    _answer(reference, None, words([60]))
    expected = _answer(reference, None, words([61]))

    session = _session(engine, tok)
    _answer(session, None, words([60]))
    before = list(session.history)
    # the consumer raises in the middle of the stream
    with pytest.raises(RuntimeError):
        for event in session.ask(text=words([70])):
            if isinstance(event, TextDelta):
                raise RuntimeError("consumer failed")
    # the consumer walks away after one event
    stream = session.ask(text=words([71]))
    next(stream)
    stream.close()
    # the turn is cancelled
    cancel = threading.Event()
    cancel.set()
    events = list(session.ask(text=words([72]), cancel=cancel))
    assert events[-1].finish_reason == "cancelled"
    assert session.history == before
    assert _answer(session, None, words([61])).text_ids == expected.text_ids


# ------------------------------------------------------------------ item 11: what `ask(audio=...)` accepts
def test_ask_accepts_a_path_stereo_either_way_round_and_tensors(engine, tok, tmp_path):
    path = write_wav(tmp_path / "q.wav", 0.6, freq=330)
    mono = load_audio(path)
    want = _answer(_session(engine, tok), mono).text_ids
    assert _answer(_session(engine, tok), str(path)).text_ids == want  # a path string is loaded, not taken as 1 ms
    assert _answer(_session(engine, tok), path.read_bytes()).text_ids == want
    assert _answer(_session(engine, tok), torch.from_numpy(mono)).text_ids == want
    stereo = np.stack([mono, mono])  # [channels, samples] and [samples, channels] are both averaged to mono
    assert _answer(_session(engine, tok), stereo).text_ids == want
    assert _answer(_session(engine, tok), stereo.T.copy()).text_ids == want
    pcm = np.round(mono * 32767).astype(np.int16)  # integer PCM is scaled
    assert len(_answer(_session(engine, tok), pcm).text_ids) > 0


def test_bad_arrays_say_what_is_expected_and_count_audios_per_turn(engine, tok):
    session = _session(engine, tok)
    _answer(session, _wav(), words([50]))  # the history now holds one audio
    cases = {
        "at least 40 ms|shorter than the minimum 0.04 s": np.zeros(16, np.float32),
        "contains no samples": np.zeros(0, np.float32),
        "2-D .* got shape \\(2, 3, 4000\\)": np.zeros((2, 3, 4000), np.float32),
        "at most 8 channels, got shape \\(100, 200\\)": np.zeros((100, 200), np.float32),
        "numeric samples": np.array(["a", "b"]),
        "far outside \\[-1, 1\\]": _wav() * 32768,
        "expected a 16 kHz waveform": [0.1] * 16000,
    }
    for pattern, audio in cases.items():
        with pytest.raises(InputError, match=pattern) as err:
            session.ask(audio=audio)
        assert "audio 2" not in str(err.value)  # the message is about this turn's audio, not the history's count
    with pytest.raises(InputError, match="is 0.001 s long"):
        session.ask(audio=np.zeros(16, np.float32))
    assert len(session.history) == 2


def test_text_with_undecodable_bytes_or_special_tokens_is_refused(engine, tok):
    with pytest.raises(InputError, match="not valid UTF-8 \\(byte 0xe9 at character 3\\)"):
        _session(engine, tok).ask(text="caf\udce9")
    with pytest.raises(InputError, match="expected a string"):
        _session(engine, tok).ask(text=b"cafe")
    # typed special tokens would end the turn early or add an audio slot with no audio
    for special in ("<|im_end|>", "<|AUDIO|>"):
        with pytest.raises(InputError, match=f"contains the special token {re.escape(special)}"):
            _session(engine, tok).ask(audio=_wav(), text=f"{words([40])} {special} {words([41])}")


# ------------------------------------------------------------------ item 10: load_audio's rates
@pytest.mark.parametrize("rate", [0, -16000, float("nan"), "16000", True])
def test_load_audio_refuses_a_bad_source_rate(rate):
    with pytest.raises(InputError, match="source_rate must be a positive sample rate"):
        load_audio(_wav(), source_rate=rate)


def test_load_audio_refuses_a_bad_target_rate(tmp_path):
    with pytest.raises(InputError, match="sample_rate must be a positive sample rate"):
        load_audio(write_wav(tmp_path / "a.wav", 0.2), sample_rate=0)


def test_a_folder_is_not_called_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="is a folder, not an audio file"):
        load_audio(tmp_path)


# ------------------------------------------------------------------ item 6: devices
def test_device_names_are_checked_with_the_available_devices_listed(ckpt):
    with pytest.raises(InputError, match="'banana' is not a device name; this machine has: cpu"):
        resolve_device("banana")
    with pytest.raises(InputError, match="not a device name"):
        load_runtime(ckpt, device="cuda:x")
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.version.cuda is None:
        with pytest.raises(InputError, match="CPU-only build.*install a CUDA build of torch"):
            load_runtime(ckpt, device="cuda")  # the README's Python example, on the CPU build
    elif torch.cuda.device_count() > 0:
        with pytest.raises(InputError, match=f"no GPU {torch.cuda.device_count()}"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


# ------------------------------------------------------------------ item 4: parts that were never trained
def test_trained_field_round_trips_and_is_validated(tmp_path):
    cfg = tiny()
    assert cfg.untrained_parts() == [] and "trained" not in cfg.to_dict()  # released configs: fully trained
    cfg.trained = {"hearing": False, "speaking": False}
    cfg.save(tmp_path / "config.json")
    back = FunAudioChatConfig.load(tmp_path)
    assert back.trained == {"hearing": False, "speaking": False} and back.untrained_parts() == ["hearing", "speaking"]
    back.mark_trained(["audio_invert_tower.crq_transformer.layers.0.mlp.up_proj.weight"])
    assert back.untrained_parts() == ["hearing"]
    for bad in ({"hearing": "no"}, {"ears": False}, ["hearing"]):
        with pytest.raises(ConfigError, match="config.trained"):
            FunAudioChatConfig.from_dict({**cfg.to_dict(), "trained": bad})


def test_untrained_hearing_refuses_audio_and_untrained_speech_falls_back_to_text(engine, tok, caplog):
    cfg = tiny()
    cfg.trained = {"hearing": False, "speaking": False}
    with pytest.raises(InputError, match="audio adapter was never trained"):
        check_trained(cfg, audio_in=True, speech_out=False)
    assert check_trained(cfg, audio_in=False, speech_out=True) is False
    assert "speech head was never trained" in caplog.text
    assert check_trained(cfg, audio_in=True, speech_out=True, allow_untrained=True) is True
    untrained = Engine(_model(), max_seq_len=512)
    untrained.cfg.trained = dict(cfg.trained)
    session = _session(untrained, tok)
    with pytest.raises(InputError, match="never trained"):
        session.ask(audio=_wav())
    end = _answer(session, None, words([50]))
    assert end.speech_codes == () and len(end.text_ids) > 0  # text only: the random SRH is not used


def test_a_training_stage_marks_the_parts_it_trained(tmp_path, one_thread):
    from funaudiochat.train import loop
    from funaudiochat.train.config import recipe_from_dict
    from tests.helpers import synthetic_s2s, tiny_recipe

    start = tmp_path / "start"
    model = _model()
    model.cfg.trained = {"hearing": False, "speaking": False}
    save_model(model, start)
    data = synthetic_s2s(tmp_path / "data", n=4)
    recipe = tiny_recipe(tmp_path, data, model={"checkpoint": str(start), "preset": None},
                         train={"steps": 1, "global_batch": 2, "micro_batch": 2, "trainable": ["audio_invert_tower.*"]})
    loop.run(recipe_from_dict(recipe))
    trained = json.loads((tmp_path / "run" / "final" / "config.json").read_text())["trained"]
    assert trained == {"hearing": False, "speaking": True}


# ------------------------------------------------------------------ CLI cases (the real command)
def _infer(ckpt, *extra, **kw):
    return subprocess.run(CLI + ["infer", "--model", str(ckpt), "--max-new-tokens", "4", *extra], capture_output=True,
                          timeout=300, **kw)


def _one_error_line(run) -> str:
    err = run.stderr.decode(errors="replace") if isinstance(run.stderr, bytes) else run.stderr
    assert run.returncode == 1, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err


def test_infer_refuses_bad_input_before_loading_anything(ckpt, tmp_path):
    # item 5: a --text that is not UTF-8 (argv bytes), as `--text $'caf\xe9'` gives in a UTF-8 shell
    err = _one_error_line(subprocess.run(CLI + ["infer", "--model", str(ckpt), b"--text", b"caf\xe9"],
                                         capture_output=True, timeout=300))
    assert "--text: is not valid UTF-8 (byte 0xe9" in err
    # item 6: the README's device on the CPU build of torch (other device names: test_device_names_...)
    if torch.version.cuda is None:
        err = _one_error_line(_infer(ckpt, "--text", "w40", "--device", "cuda", text=True))
        assert "CPU-only build" in err and "pip install torch==" in err
    # item 12: the flag, not the API field; a folder as --audio
    err = _one_error_line(_infer(ckpt, "--text", "w40", "--temperature", "0", text=True))
    assert "--temperature" in err and "--greedy" in err and "do_sample" not in err
    folder = tmp_path / "recordings"
    folder.mkdir()
    assert "is a folder, not an audio file" in _one_error_line(_infer(ckpt, "--audio", str(folder), text=True))
    # a question too long for the context is refused before the model loads, not after
    long = write_wav(tmp_path / "long.wav", 12.0, freq=200)
    err = _one_error_line(_infer(ckpt, "--audio", str(long), "--max-seq-len", "64", "--out", str(tmp_path / "o"),
                                 text=True))
    assert "exceeds the context of 64 tokens" in err and not (tmp_path / "o").exists()


def test_infer_checks_out_before_generating_and_says_when_no_wav_is_made(ckpt, tmp_path):
    taken = tmp_path / "answer"
    taken.write_text("an older answer\n")
    err = _one_error_line(_infer(ckpt, "--text", words([40]), "--out", str(taken), text=True))
    assert "exists and is not a folder" in err and taken.read_text() == "an older answer\n"
    out = tmp_path / "new" / "answer"
    run = _infer(ckpt, "--text", words([40]), "--out", str(out), text=True)
    assert run.returncode == 0, run.stderr
    assert "no wav is made" in run.stderr and not (out / "answer.wav").exists()
    assert (out / "answer.txt").read_text().strip() in run.stdout and json.loads((out / "speech_tokens.json").read_text())


def test_infer_on_the_untrained_mini_checkpoint(mini_dir, tmp_path):
    """The README's offline model: `assets smollm2` marks the adapter and SRH as untrained."""
    assert json.loads((mini_dir / "config.json").read_text())["trained"] == {"hearing": False, "speaking": False}
    wav = write_wav(tmp_path / "q.wav", 1.0, freq=220)
    err = _one_error_line(_infer(mini_dir, "--audio", str(wav), "--mode", "s2t", text=True))
    assert "audio adapter was never trained" in err
    run = _infer(mini_dir, "--text", "What is the capital of France?", "--out", str(tmp_path / "a"), text=True)
    assert run.returncode == 0, run.stderr
    assert "speech head was never trained" in run.stderr and "answering in text only" in run.stderr
    assert (tmp_path / "a" / "answer.txt").exists() and not (tmp_path / "a" / "speech_tokens.json").exists()
