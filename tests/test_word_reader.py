"""The word reader (model/word_reader.py): Whisper tiny.en's decoder, converted from the pip-shipped CTranslate2
files, reads a spoken sentence into the mini's 5 Hz slots as the LLM's own word embeddings.

Oracles: CTranslate2's greedy Whisper decoding of the same features (the same tokens), and the LLM tokenizer (the
slots' nearest LLM embeddings spell the sentence).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import torch

from funaudiochat.assets.ct2 import read_ct2
from funaudiochat.assets.whisper_decoder import llm_ids_table, reader_config, reader_state_dict
from funaudiochat.assets.whisper_encoder import PREFIX as ENCODER_PREFIX
from funaudiochat.assets.whisper_encoder import convert_whisper_encoder, whisper_model_dir
from funaudiochat.audio.io import load_audio
from funaudiochat.audio.mel import WhisperFrontend
from funaudiochat.config import AudioConfig, FunAudioChatConfig
from funaudiochat.errors import CheckpointError, ConfigError
from funaudiochat.model.encoder import AudioEncoder
from funaudiochat.model.word_reader import WordReader, WordReaderConfig

ctranslate2 = pytest.importorskip("ctranslate2")
SPOKEN = "What is the capital city of France?"


@pytest.fixture(scope="module")
def whisper():
    directory = whisper_model_dir()
    ct2 = read_ct2(directory / "model.bin")
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    cfg = reader_config(ct2, tok)
    enc_cfg, enc_state = convert_whisper_encoder()
    encoder = AudioEncoder(enc_cfg)
    encoder.load_state_dict({k.removeprefix(ENCODER_PREFIX): v for k, v in enc_state.items()}, strict=False)
    reader = WordReader(cfg, 576)
    reader.load_state_dict({k.removeprefix("word_reader."): v for k, v in reader_state_dict(ct2, cfg).items()},
                           strict=False)
    return cfg, tok, encoder.eval(), reader.eval()


@pytest.fixture(scope="module")
def spoken():
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("espeak-ng is missing (apt-get install -y espeak-ng), and CI=true forbids skipping")
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    path = f"/tmp/word_reader_{os.getpid()}.wav"
    subprocess.run(["espeak-ng", "-w", path, SPOKEN], check=True, capture_output=True)
    try:
        return load_audio(path)
    finally:
        os.unlink(path)


def read_tokens(reader: WordReader, memory: torch.Tensor) -> list[int]:
    states, count = reader.read(memory, 100)
    return (states[0, : int(count[0])] @ reader.embed_tokens.weight.T).argmax(-1).tolist()


def test_reads_the_tokens_ctranslate2_reads(whisper, spoken):
    cfg, tok, encoder, reader = whisper
    padded, _ = WhisperFrontend(80)([spoken], padding="max_length")  # Whisper's own 30 s input [1, 80, 3000]
    ct2_model = ctranslate2.models.Whisper(str(whisper_model_dir()), device="cpu", compute_type="float32")
    ref = ct2_model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(
        ct2_model.encode(ctranslate2.StorageView.from_array(padded.numpy()), to_cpu=True))), [list(cfg.start_ids)],
        beam_size=1, max_length=100)[0].sequences_ids[0]
    assert "capital" in tok.decode(ref).lower()
    with torch.no_grad():
        whole = encoder.ln_post(encoder.encode_frames(padded, torch.tensor([padded.shape[-1]]))[0])[None]
        assert read_tokens(reader, whole) == ref
        # the model's path: the clip's own mel frames, padded to the window with the clip's floor
        features, mask = WhisperFrontend(80)([spoken], padding="longest")
        windows = encoder.window_frames(features, mask.sum(-1))
        assert windows[0].shape == (1, 1500, 384)
        assert read_tokens(reader, encoder.ln_post(windows[0])) == ref


def test_slots_hold_the_llm_embeddings_of_the_words(whisper, spoken, mini_dir):
    """The soft embedding of each word read is nearest to the LLM embedding of that word's first LLM piece."""
    cfg, tok, encoder, reader = whisper
    llm_tok = tokenizers.Tokenizer.from_file(str(mini_dir / "tokenizer.json"))
    reader.llm_ids.copy_(llm_ids_table(cfg, tok, llm_tok))
    torch.manual_seed(0)
    table = torch.randn(llm_tok.get_vocab_size(), 576)  # any table: the soft embedding is a mixture of its rows
    features, mask = WhisperFrontend(80)([spoken], padding="longest")
    with torch.no_grad():
        windows = [encoder.ln_post(w) for w in encoder.window_frames(features, mask.sum(-1))]
        slots = reader(windows, 40, table)[0]  # [G, D]
    nearest = (torch.nn.functional.normalize(slots, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T)
    words = llm_tok.decode(nearest.argmax(-1)[(slots.abs().sum(-1) > 0)].tolist())
    assert "capital" in words.lower() and "france" in words.lower(), words
    assert slots[-1].abs().sum() == 0  # past the last word: nothing from the reader


def test_llm_ids_table_maps_bytes_to_the_same_bytes(whisper, mini_dir):
    cfg, tok, _, _ = whisper
    llm_tok = tokenizers.Tokenizer.from_file(str(mini_dir / "tokenizer.json"))
    table = llm_ids_table(cfg, tok, llm_tok)
    for word in (" capital", " France", " Addis", " rhinoceros", "?"):
        for piece in tok.encode(word, add_special_tokens=False).ids:
            ids = [i for i in table[piece].tolist() if i >= 0]
            assert ids and llm_tok.decode(ids) == tok.decode([piece])
    assert (table[cfg.end_id] == -1).all() and (table[cfg.start_ids[0]] == -1).all()


def test_config_is_checked():
    with pytest.raises(ConfigError, match="unknown keys"):
        WordReaderConfig.from_dict({"layerz": 4})
    with pytest.raises(ConfigError, match="d_model"):  # Whisper tiny's 384 against the default encoder's 1280
        AudioConfig.from_dict({"word_reader": {}})
    with pytest.raises(ConfigError, match="object or null"):
        AudioConfig.from_dict({"word_reader": "whisper"})
    ok = AudioConfig.from_dict({"word_reader": {}, "d_model": 384, "encoder_attention_heads": 6})
    assert AudioConfig.from_dict(ok.to_dict()).word_reader == {}  # round-trips through config.json
    assert "word_reader" not in AudioConfig().to_dict()  # released configs unchanged


def test_deltas_refuse_a_reader_the_base_lacks(tmp_path, mini_dir):
    """Extracting against a base without the reader would ship Whisper's decoder as a 100 MB 'delta'."""
    from funaudiochat.assets import mini_deltas
    from funaudiochat.assets.whisper_decoder import attach_word_reader
    from funaudiochat.model.checkpoint import load_model, save_model

    model = load_model(mini_dir, dtype="fp32")
    attach_word_reader(model, tokenizers.Tokenizer.from_file(str(mini_dir / "tokenizer.json")))
    save_model(model, tmp_path / "with_reader")
    shutil.copy(mini_dir / "tokenizer.json", tmp_path / "with_reader")
    with pytest.raises(CheckpointError, match="word reader"):
        mini_deltas.extract(tmp_path / "with_reader", mini_dir)


@pytest.fixture(scope="module")
def reader_base(tmp_path_factory):
    """`funaudiochat assets smollm2 DIR --word-reader`: the mini's starting checkpoint with Whisper's decoder."""
    from funaudiochat.cli import main as cli_main

    base = tmp_path_factory.mktemp("reader") / "base"
    assert cli_main(["assets", "smollm2", str(base), "--word-reader"]) == 0
    return base


def test_the_untrained_mini_with_a_reader_answers_a_spoken_question(reader_base, spoken, tmp_path):
    """Nothing trained here: Whisper's decoder reads the question into SmolLM2's own embeddings, and the base LLM
    answers it as it answers the typed question, through the real `infer` CLI."""
    import soundfile as sf

    config = json.loads((reader_base / "config.json").read_text())
    assert config["trained"] == {"hearing": True, "speaking": False}
    assert config["audio_config"]["word_reader"]["start_ids"] == [50257, 50362]
    sf.write(tmp_path / "question.wav", spoken, 16000)
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "infer", "--model", str(reader_base), "--audio",
                          str(tmp_path / "question.wav"), "--mode", "s2t", "--max-new-tokens", "24", "--threads", "2",
                          "--out", str(tmp_path / "answer")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "paris" in (tmp_path / "answer" / "answer.txt").read_text().lower(), run.stdout


def test_deltas_ship_the_trained_reader_parts_and_assembly_reattaches_whisper(reader_base, tmp_path):
    """`assets smollm2 --word-reader` -> train (here: changed tensors) -> deltas without Whisper's weights ->
    `assets mini`'s assembly from the pip-shipped parts gives the trained model back."""
    from funaudiochat.assets import mini_deltas
    from funaudiochat.model.checkpoint import load_model, save_model

    base = reader_base
    model = load_model(base, dtype="fp32")
    assert model.word_reader is not None and not model.audio_tower.continual_output_matching.weight.any()
    with torch.no_grad():
        model.word_reader.correction.weight.normal_(0, 0.01)
        model.audio_tower.continual_output_matching.weight.normal_(0, 0.01)
    save_model(model, tmp_path / "trained")
    shutil.copy(base / "tokenizer.json", tmp_path / "trained")
    deltas, meta = mini_deltas.extract(tmp_path / "trained", base)
    assert meta["word_reader"] == "1" and json.loads(meta["trained"])["hearing"]
    assert sorted(deltas) == ["audio_tower.continual_output_matching.weight", "word_reader.correction.weight"]
    mini_deltas.write(deltas, meta, tmp_path / "deltas")
    rebuilt = load_model(mini_deltas.assemble(tmp_path / "out", tmp_path / "deltas"), dtype="fp32")
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
