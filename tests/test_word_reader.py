"""The word reader (model/word_reader.py): Whisper tiny.en's decoder, converted from the pip-shipped CTranslate2
files, reads a spoken sentence into the mini's 5 Hz slots as the LLM's own word embeddings.

Oracles: CTranslate2's greedy Whisper decoding of the same features (the same tokens), and the LLM tokenizer (the
slots' nearest LLM embeddings spell the sentence).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import torch
import torch.nn.functional as F

from funaudiochat.assets.ct2 import read_ct2
from funaudiochat.assets.whisper_decoder import llm_ids_table, reader_config, reader_state_dict
from funaudiochat.assets.whisper_encoder import PREFIX as ENCODER_PREFIX
from funaudiochat.assets.whisper_encoder import convert_whisper_encoder, whisper_model_dir
from funaudiochat.audio.io import load_audio
from funaudiochat.audio.mel import WhisperFrontend
from funaudiochat.config import AudioConfig, FunAudioChatConfig
from funaudiochat.errors import CheckpointError, ConfigError
from funaudiochat.model.encoder import AudioEncoder
from funaudiochat.model import word_reader
from funaudiochat.model.word_reader import WordReader, WordReaderConfig, cut_loop

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
    reader = WordReader(cfg)
    reader.load_state_dict({k.removeprefix("word_reader."): v for k, v in reader_state_dict(ct2, cfg).items()},
                           strict=False)
    reader.set_compute_dtype("fp32")  # compared with CTranslate2's float32 decoding (bf16: its own test)
    return cfg, tok, encoder.eval(), reader.eval()


def speak(text: str) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("espeak-ng is missing (apt-get install -y espeak-ng), and CI=true forbids skipping")
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    path = f"/tmp/word_reader_{os.getpid()}.wav"
    subprocess.run(["espeak-ng", "-w", path, text], check=True, capture_output=True)
    try:
        return load_audio(path)
    finally:
        os.unlink(path)


@pytest.fixture(scope="module")
def spoken():
    return speak(SPOKEN)


def read_tokens(reader: WordReader, memory: torch.Tensor) -> list[int]:
    tokens, count = reader.read(memory, 100)
    return tokens[0, : int(count[0])].tolist()


def ct2_decode(ct2_model, padded: torch.Tensor, cfg: WordReaderConfig, beam_size: int) -> list[int]:
    memory = ct2_model.encode(ctranslate2.StorageView.from_array(padded.numpy()), to_cpu=True)
    return ct2_model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(memory)), [list(cfg.start_ids)],
                              beam_size=beam_size, max_length=100)[0].sequences_ids[0]


def test_beam_search_and_greedy_read_what_ctranslate2_reads(whisper, spoken):
    """On a clip at 5 dB SNR, where beam search and greedy decoding read different words, each reads what
    CTranslate2's decoding of the same features does."""
    cfg, tok, encoder, reader = whisper
    noise = np.random.default_rng(0).standard_normal(len(spoken)).astype(np.float32)
    noisy = spoken + noise * np.sqrt(np.mean(spoken ** 2) / 10 ** 0.5)
    padded, _ = WhisperFrontend(80)([noisy], padding="max_length")
    ct2_model = ctranslate2.models.Whisper(str(whisper_model_dir()), device="cpu", compute_type="float32")
    greedy = WordReader(dataclasses.replace(cfg, beam_size=1))
    greedy.load_state_dict(reader.state_dict())
    greedy.set_compute_dtype("fp32")
    with torch.no_grad():
        memory = encoder.ln_post(encoder.encode_frames(padded, torch.tensor([padded.shape[-1]]))[0])[None]
        ours = {5: read_tokens(reader, memory), 1: read_tokens(greedy, memory)}
    theirs = {5: ct2_decode(ct2_model, padded, cfg, 5), 1: ct2_decode(ct2_model, padded, cfg, 1)}
    assert theirs[5] != theirs[1], "the clip no longer tells beam search from greedy decoding"
    assert {k: tok.decode(v) for k, v in ours.items()} == {k: tok.decode(v) for k, v in theirs.items()}
    # windows batched together read what each reads alone
    with torch.no_grad():
        both, count = reader.read(torch.cat([memory, memory[:, :, :]]), 100)
    assert both[1, : int(count[1])].tolist() == ours[5]


@pytest.fixture(scope="module")
def clean_and_noisy(whisper, spoken):
    """The encoder's windows [2, T, C] of the spoken question, clean and at 5 dB SNR."""
    encoder = whisper[2]
    noise = np.random.default_rng(0).standard_normal(len(spoken)).astype(np.float32)
    clips = [spoken, spoken + noise * np.sqrt(np.mean(spoken ** 2) / 10 ** 0.5)]
    padded, _ = WhisperFrontend(80)(clips, padding="max_length")
    with torch.no_grad():
        return encoder.ln_post(torch.stack(encoder.encode_frames(padded, torch.tensor([padded.shape[-1]] * 2))))


def test_bf16_products_read_what_fp32_reads(whisper, clean_and_noisy):
    """The products reading bf16 copies of the weights (auto's choice where the CPU computes bf16 natively: half the
    bytes a step reads) read the same tokens as fp32 on the clean clip and at 5 dB SNR."""
    cfg, tok, _, reader = whisper
    memory = clean_and_noisy
    with torch.no_grad():
        read = {}
        for name in ("fp32", "bf16"):
            reader.set_compute_dtype(name)
            tokens, count = reader.read(memory, 100)
            read[name] = [tokens[i, : int(count[i])].tolist() for i in range(2)]
    reader.set_compute_dtype("fp32")
    assert read["bf16"] == read["fp32"] and "capital" in tok.decode(read["fp32"][0]).lower()
    fc1, x = reader.layers[0].fc1, memory[0, :4]
    fc1.product = "bf16"  # (as the bf16 read left it) its product reads the bf16 copy: close to fp32, not equal
    rounded = fc1(x)
    fc1.product = "plain"
    exact = fc1(x)
    assert not torch.equal(rounded, exact) and rounded.dtype == torch.float32
    torch.testing.assert_close(rounded, exact, rtol=0.05, atol=0.05)
    with pytest.raises(ConfigError, match="compute dtype must be one of"):
        reader.set_compute_dtype("int8")


def test_bf16_copies_packed_for_the_cpu_compute_the_plain_bf16_product(whisper, clean_and_noisy):
    """On a CPU the bf16 copies are kept in oneDNN's packed layout (1.5-2x faster for a window's beams on an AMX CPU):
    the product of the same bf16-rounded inputs and weights as F.linear, to the bf16 rounding of its output."""
    cfg, _, _, reader = whisper
    if not word_reader._packs_for_cpu(torch.device("cpu")):
        pytest.skip("this PyTorch build has no oneDNN")
    z = reader.norm(clean_and_noisy[0, :5])
    w = reader.layers[0].fc1.weight
    packed = word_reader._bf16_copy(cfg.beam_size)(w)
    plain = F.linear(z.to(torch.bfloat16), w.to(torch.bfloat16)).float()
    with torch.no_grad():
        got = word_reader._bf16_product(z, packed)
    assert got.dtype == torch.float32 and got.shape == plain.shape
    torch.testing.assert_close(got, plain, rtol=2 ** -7, atol=1e-3)


def test_packed_fp32_products_read_what_the_plain_weights_read(whisper, clean_and_noisy, monkeypatch):
    """On a CPU without native bf16 the fp32 products read oneDNN's packed copies of the weights (the same sums in
    another order, ~2x faster for a beam's rows): the same tokens as the plain weights on the clean clip and at
    5 dB SNR; a copy follows its weight when the weight changes in place; training reads the weights themselves."""
    cfg, tok, _, reader = whisper
    if not word_reader._packs_for_cpu(torch.device("cpu")):
        pytest.skip("this PyTorch build has no oneDNN")
    memory = clean_and_noisy
    with torch.no_grad():
        read = {}
        for packs in (True, False):
            monkeypatch.setattr(word_reader, "_packs_for_cpu", lambda device, packs=packs: packs)
            tokens, count = reader.read(memory, 100)
            read[packs] = [tokens[i, : int(count[i])].tolist() for i in range(2)]
            assert reader.layers[0].fc1.product == ("packed" if packs else "plain")
        monkeypatch.undo()
        assert read[True] == read[False] and "capital" in tok.decode(read[True][0]).lower()
        z = reader.norm(memory[0, :5])
        plain = reader._word_logits(z, "plain")
        torch.testing.assert_close(reader._word_logits(z, "packed"), plain, rtol=1e-4, atol=1e-4)
        fc1 = reader.layers[0].fc1
        fc1.product = "packed"
        before = fc1(z[:, None])
        reader.embed_tokens.weight.mul_(2)  # in place, as an optimizer step changes it
        fc1.weight.mul_(2)
        try:
            torch.testing.assert_close(reader._word_logits(z, "packed"), 2 * plain, rtol=1e-4, atol=1e-3)
            assert not torch.allclose(fc1(z[:, None]), before, atol=1e-3)
        finally:
            reader.embed_tokens.weight.div_(2)
            fc1.weight.div_(2)
    reader.read(memory[:1], 5)  # leaves every product packed
    logits = reader.teacher_forced(memory[:1], torch.tensor([list(cfg.start_ids)]))
    assert fc1.product == "plain"
    logits.sum().backward()
    assert fc1.weight.grad is not None and reader.embed_tokens.weight.grad is not None
    reader.zero_grad(set_to_none=True)


def test_an_fp16_vocabulary_reads_what_fp32_reads(whisper, clean_and_noisy):
    """With fp16 decode weights (`set_decode_weights`) the packed fp32 read's largest product, one window's beams
    times the vocabulary, reads an fp16 copy in a compiled product-and-sum (half its bytes): the same tokens as fp32
    on the clean clip and at 5 dB SNR, logits within the copy's rounding; "fp32" decode weights turn it off."""
    from funaudiochat.model.quantize import set_decode_weights

    cfg, tok, _, reader = whisper
    if not word_reader._packs_for_cpu(torch.device("cpu")):
        pytest.skip("this PyTorch build has no oneDNN (the fp16 vocabulary replaces the packed product)")
    holder = torch.nn.Module()
    holder.word_reader = reader
    memory = clean_and_noisy
    read = {}
    with torch.no_grad():
        for kind in ("fp32", "fp16", "fp32"):
            set_decode_weights(holder, kind)
            assert reader.half_vocabulary == (kind == "fp16")
            read[kind] = [reader.read(memory[i:i + 1], 100)[0][0].tolist() for i in range(2)]  # one window a read
            if kind == "fp16":
                z = reader.norm(memory[0, :cfg.beam_size])
                half = reader._word_logits(z, "packed")
                assert reader._projection_half.copy.dtype == torch.float16
        torch.testing.assert_close(half, reader._word_logits(z, "packed"), rtol=1e-3, atol=1e-3)
    assert reader._projection_half.copy is None  # (fp32 decode weights drop the copy)
    assert read["fp16"] == read["fp32"] and "capital" in tok.decode(read["fp32"][0]).lower()


def test_reads_the_tokens_ctranslate2_reads(whisper, spoken):
    cfg, tok, encoder, reader = whisper
    padded, _ = WhisperFrontend(80)([spoken], padding="max_length")  # Whisper's own 30 s input [1, 80, 3000]
    ct2_model = ctranslate2.models.Whisper(str(whisper_model_dir()), device="cpu", compute_type="float32")
    ref = ct2_decode(ct2_model, padded, cfg, cfg.beam_size)
    assert "capital" in tok.decode(ref).lower()
    with torch.no_grad():
        whole = encoder.ln_post(encoder.encode_frames(padded, torch.tensor([padded.shape[-1]]))[0])[None]
        assert read_tokens(reader, whole) == ref
        # the model's path: the clip's own mel frames, padded to the window with the clip's floor
        features, mask = WhisperFrontend(80)([spoken], padding="longest")
        windows = encoder.window_frames(features, mask.sum(-1), 3000)
        assert windows[0].shape == (1, 1500, 384)
        assert read_tokens(reader, encoder.ln_post(windows[0])) == ref
        # a 10 s window (the mini's): a third of the frames, the same words
        short = encoder.window_frames(features, mask.sum(-1), 1000)[0]
        assert short.shape == (1, 500, 384)
        assert tok.decode(read_tokens(reader, encoder.ln_post(short))) == tok.decode(ref)
        with pytest.raises(ConfigError, match="even and within one attention chunk"):
            encoder.window_frames(features, mask.sum(-1), 3001)


def test_slots_hold_the_llm_pieces_of_the_words_in_order(whisper, mini_dir):
    """Each LLM piece of each word read takes its own slot, in order: Whisper's one token " 72" is SmolLM2's " ",
    "7", "2", so the slots' nearest LLM embeddings spell the sentence, digits in their order."""
    cfg, tok, encoder, reader = whisper
    llm_tok = tokenizers.Tokenizer.from_file(str(mini_dir / "tokenizer.json"))
    reader.llm_ids.copy_(llm_ids_table(cfg, tok, llm_tok))
    torch.manual_seed(0)
    table = torch.randn(llm_tok.get_vocab_size(), 576)  # any table: the soft embedding is a mixture of its rows
    features, mask = WhisperFrontend(80)([speak("What is 72 plus 91?")], padding="longest")
    with torch.no_grad():
        windows = [encoder.ln_post(w) for w in encoder.window_frames(features, mask.sum(-1), 1000)]
        read = tok.decode(read_tokens(reader, windows[0]))
        slots = reader(windows, 40, table)[0]  # [G, D]
    assert "72" in read and "91" in read, read
    nearest = (torch.nn.functional.normalize(slots, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T)
    filled = slots.abs().sum(-1) > 0
    assert llm_tok.decode(nearest.argmax(-1)[filled].tolist()) == read
    assert int(filled.sum()) == len(llm_tok.encode(read, add_special_tokens=False).ids)
    assert not filled[int(filled.sum()):].any()  # past the last piece: nothing from the reader


def test_llm_ids_table_maps_bytes_to_the_same_bytes(whisper, mini_dir):
    cfg, tok, _, _ = whisper
    llm_tok = tokenizers.Tokenizer.from_file(str(mini_dir / "tokenizer.json"))
    table = llm_ids_table(cfg, tok, llm_tok)
    for word in (" capital", " France", " Addis", " rhinoceros", "?"):
        for piece in tok.encode(word, add_special_tokens=False).ids:
            ids = [i for i in table[piece].tolist() if i >= 0]
            assert ids and llm_tok.decode(ids) == tok.decode([piece])
    assert (table[cfg.end_id] == -1).all() and (table[cfg.start_ids[0]] == -1).all()


def test_a_looping_transcript_keeps_one_copy(whisper):
    """Whisper tiny.en's loops on the mini's test clips, cut to one copy; repeats that speech has stay."""
    _, tok, _, _ = whisper

    def cut(text: str) -> str:
        ids = torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.long)
        return tok.decode(cut_loop(ids).tolist())

    assert cut(" behold behold behold behold behold") == " behold"
    assert cut(" Can you tell me how to keep my cat entertained? Can you tell me how to keep my cat entertained? Can"
               " you tell") == " Can you tell me how to keep my cat entertained?"
    for kept in (" What is 7 times 7 times 7?", " No, no.", " I am very very tired", " Why? Why not?"):
        assert cut(kept) == kept


def test_config_is_checked():
    with pytest.raises(ConfigError, match="unknown keys"):
        WordReaderConfig.from_dict({"layerz": 4})
    with pytest.raises(ConfigError, match="whole seconds within"):
        WordReaderConfig.from_dict({"window_s": 45})
    with pytest.raises(ConfigError, match="beam_size"):
        WordReaderConfig.from_dict({"beam_size": 0})
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
    `assets mini`'s assembly from the pip-shipped parts gives the trained model back, with the reader's settings
    it was trained with (here a 12 s window, not the default)."""
    from funaudiochat.assets import mini_deltas
    from funaudiochat.model.checkpoint import load_model, save_model

    base = tmp_path / "base"
    shutil.copytree(reader_base, base)
    config = json.loads((base / "config.json").read_text())
    config["audio_config"]["word_reader"]["window_s"] = 12
    (base / "config.json").write_text(json.dumps(config))
    model = load_model(base, dtype="fp32")
    assert model.word_reader is not None and not model.audio_tower.continual_output_matching.weight.any()
    with torch.no_grad():
        model.audio_tower.continual_output_matching.weight.normal_(0, 0.01)
    model.cfg.audio_config.word_reader = {**model.cfg.audio_config.word_reader, "slot_rate": 7.5}  # trained with
    model.word_reader.cfg = WordReaderConfig.from_dict(model.cfg.audio_config.word_reader)  # more slots than base
    save_model(model, tmp_path / "trained")
    shutil.copy(base / "tokenizer.json", tmp_path / "trained")
    deltas, meta = mini_deltas.extract(tmp_path / "trained", base)
    reader = json.loads(meta["word_reader"])
    assert reader["window_s"] == 12 and reader["slot_rate"] == 7.5 and json.loads(meta["trained"])["hearing"]
    assert sorted(deltas) == ["audio_tower.continual_output_matching.weight"]
    mini_deltas.write(deltas, meta, tmp_path / "deltas")
    rebuilt = load_model(mini_deltas.assemble(tmp_path / "out", tmp_path / "deltas"), dtype="fp32")
    assert rebuilt.word_reader.cfg.window_s == 12 and rebuilt.word_reader.cfg.slot_rate == 7.5
    on_base = load_model(mini_deltas.assemble(tmp_path / "out_base", tmp_path / "deltas", base_dir=base), dtype="fp32")
    assert on_base.cfg.audio_config.word_reader["slot_rate"] == on_base.word_reader.cfg.slot_rate == 7.5
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    # a reader of another shape is not a setting: refused
    config = json.loads((tmp_path / "trained" / "config.json").read_text())
    config["audio_config"]["word_reader"]["layers"] = 2
    (tmp_path / "trained" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="differ in their word reader"):
        mini_deltas.extract(tmp_path / "trained", base)
    # release 1's deltas recorded no reader settings: refused with a reason, not assembled into another model
    mini_deltas.write(deltas, {**meta, "word_reader": "1"}, tmp_path / "old")
    with pytest.raises(CheckpointError, match="first word-reader release"):
        mini_deltas.assemble(tmp_path / "out_old", tmp_path / "old")


def test_a_regrouped_start_keeps_the_readers_id_table(reader_base, spoken):
    """A recipe that changes the SRH's view (model.srh_pending_units, as speak_srh.yaml does) loads its start through
    the regrouping path, which casts the weights to fp32: the reader's piece table must stay integer ids, and the
    regrouped model must read a spoken question into the same slots as the model loaded as stored."""
    from funaudiochat.config import FunAudioChatConfig
    from funaudiochat.model.checkpoint import load_model
    from funaudiochat.train.config import Recipe
    from funaudiochat.train.loop import _regrouped_model

    cfg = FunAudioChatConfig.load(reader_base)
    cfg.audio_config.srh_pending_units = 4
    regrouped = _regrouped_model(reader_base, cfg, Recipe(), fold_adapters=True).eval()
    stored = load_model(reader_base, dtype="fp32")
    assert regrouped.word_reader.llm_ids.dtype == torch.long
    assert torch.equal(regrouped.word_reader.llm_ids, stored.word_reader.llm_ids)
    features, mask = WhisperFrontend(80)([spoken], padding="longest")
    n_tokens = 50  # 2 s of 25 Hz tokens -> 10 slots

    def slots(model):
        with torch.no_grad():
            return model._read_words(features, mask.sum(-1), n_tokens)[1]

    torch.testing.assert_close(slots(regrouped), slots(stored), rtol=0, atol=0)


def test_readings_stage_makes_each_asr_target_what_the_reader_reads(reader_base, spoken, tmp_path, capsys):
    """`data build-mini --stage readings`: each train ASR record's target becomes its clip as the checkpoint's reader
    reads it (the script kept in meta), QA records pass unchanged, a clip with no slots is dropped; an interrupted
    run reads only what is missing; the committed readings are reused without a model; mismatches are refused."""
    import gzip

    import soundfile as sf

    from funaudiochat.cli import main as cli_main
    from funaudiochat.eval.normalize import normalize_english
    from funaudiochat.text.tokenizer import AUDIO_PAD, AUDIO_TEMPLATE

    data = tmp_path / "data"
    (data / "audio").mkdir(parents=True)
    sf.write(data / "audio" / "france.wav", spoken, 16000)
    sf.write(data / "audio" / "spain.wav", speak("Tell me the capital of Spain."), 16000)

    def record(rid, task, wav, answer, tokens):
        user = AUDIO_TEMPLATE + ("\nPlease help me transcribe the audio." if task == "asr" else "")
        audio = json.dumps({"path": f"audio/{wav}", "token": AUDIO_PAD * tokens, "text": ""})
        return {"id": rid, "task": task, "system": "Be brief.", "audio": [audio],
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}

    rows = [record("france", "asr", "france.wav", SPOKEN, 60),
            record("spain", "asr", "spain.wav", "Tell me the capital of Portugal.", 50),  # a script it does not say
            record("qa", "qa", "france.wav", "Paris.", 60),
            record("silent", "asr", "spain.wav", "Nothing.", 0)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    committed = data / "readings.jsonl.gz"
    build = ["data", "build-mini", "--out", str(data), "--stage", "readings", "--readings", str(committed),
             "--no-progress", "--batch-size", "2"]

    assert cli_main(build + ["--model", str(reader_base)]) == 0
    read = {r["id"]: r for r in map(json.loads, (data / "train_read.jsonl").read_text().splitlines())}
    assert sorted(read) == ["france", "qa", "spain"]
    assert read["qa"] == rows[2]
    heard = normalize_english(read["france"]["messages"][-1]["content"])
    assert "capital" in heard and "france" in heard and read["france"]["meta"]["transcript"] == SPOKEN
    assert "spain" in read["spain"]["messages"][-1]["content"].lower()
    assert read["spain"]["meta"]["transcript"] == "Tell me the capital of Portugal."
    with gzip.open(committed, "rt") as f:
        table = {r["id"]: r["reading"] for r in map(json.loads, f)}
    assert table["silent"] == "" and table["france"] == read["france"]["messages"][-1]["content"]

    # interrupted after one clip: the rerun keeps what was read and reads the rest
    committed.unlink()
    (data / "readings.partial.jsonl").write_text(  # and one read at another slot rate, which does not count
        json.dumps({"id": "france", "reading": "Kept from before.", "slot_rate": 5.0}) + "\n" +
        json.dumps({"id": "spain", "reading": "Read for more slots.", "slot_rate": 7.5}) + "\n" +
        '{"id": "silent", "readi')  # a line cut by the interruption: read again
    assert cli_main(build + ["--model", str(reader_base)]) == 0
    with gzip.open(committed, "rt") as f:
        table = {r["id"]: r["reading"] for r in map(json.loads, f)}
    assert table["france"] == "Kept from before." and "spain" in table["spain"].lower() and table["silent"] == ""
    # the new reading starts a line of its own after the cut one
    assert json.loads((data / "readings.partial.jsonl").read_text().splitlines()[-1])["id"] == "silent"

    # no model: the committed readings are applied as they are
    (data / "train_read.jsonl").unlink()
    assert cli_main(build) == 0
    assert "reusing" in capsys.readouterr().out
    assert json.loads((data / "train_read.jsonl").read_text().splitlines()[0])["messages"][-1]["content"] == \
        "Kept from before."

    # a record file with a broken line: refused with its line number
    good = (data / "train.jsonl").read_text()
    (data / "train.jsonl").write_text(good + "{not json\n")
    assert cli_main(build) != 0
    assert "train.jsonl:5" in capsys.readouterr().err
    (data / "train.jsonl").write_text(good)

    # readings of another build, or none at all: refused with the command that makes them
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [record("new", "asr", "spain.wav",
                                                                                        "New.", 50)]))
    assert cli_main(build) != 0
    assert "has no reading" in capsys.readouterr().err
    committed.unlink()
    assert cli_main(build) != 0
    assert "--stage readings --model" in capsys.readouterr().err


def test_slot_rate_gives_user_audio_the_same_slots_in_the_engine_and_in_training(tmp_path):
    """word_reader.slot_rate: a reader model gives a user audio `slot_rate` slots a second, in the engine's prompt
    and in a training sample of the same record alike (the record's 25 Hz placeholders are rescaled); 5 is the
    released count; a rate outside [5, 25] is refused."""
    from helpers import make_word_tokenizer, write_wav

    from funaudiochat.engine.prompt import prompt_ids, speech_token_count
    from funaudiochat.model.presets import tiny
    from funaudiochat.text.tokenizer import AUDIO_PAD, AUDIO_TEMPLATE
    from funaudiochat.train.data import SampleBuilder

    tok = make_word_tokenizer(tmp_path / "tokenizer.json", "hello there")
    wav = load_audio(write_wav(tmp_path / "q.wav", 1.6, freq=200.0))
    n = speech_token_count(len(wav))
    record = {"messages": [{"role": "user", "content": AUDIO_TEMPLATE}, {"role": "assistant", "content": "hello"}],
              "audio": [json.dumps({"path": "q.wav", "token": AUDIO_PAD * n, "text": ""})]}
    slots = {}
    for rate in (5, 7.5):
        cfg = tiny()
        cfg.audio_config.word_reader = {"slot_rate": rate}
        ids, counts = prompt_ids(tok, cfg, [{"role": "user", "content": AUDIO_TEMPLATE}], [wav])
        sample = SampleBuilder(tok, cfg, max_len=512).sample(record, tmp_path, "test")
        assert len(sample.audios[0].speech_ids) == counts[0]  # training reads the audio as the engine does
        slots[rate] = ids.count(tok.special.audio)
        assert list(sample.input_ids).count(tok.special.audio) == slots[rate]
        assert slots[rate] == -(-counts[0] // cfg.audio_config.group_size)
    assert counts[0] == -(-n * 3 // 2) and slots[5] == -(-n // 5) < slots[7.5]
    for bad in (4, 30):
        with pytest.raises(ConfigError, match="slot_rate"):
            WordReaderConfig.from_dict({"slot_rate": bad})
