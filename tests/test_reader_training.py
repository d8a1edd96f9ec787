"""Training the word reader (recipe `stage: reader`, recipes/mini/reader_noisy.yaml): Whisper tiny.en's encoder and
decoder learn the scripts of the training clips, roughened by noise and the telephone band.

Oracles: the reader's own step-by-step read (teacher forcing computes the logits it computes one step at a time),
the clip's script in Whisper's tokens, and the checkpoint the stage started from (what must not move).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from test_mini_pipeline import cli, ok
from test_word_reader import SPOKEN, speak, spoken, whisper  # noqa: F401 (fixtures)

from funaudiochat.audio.io import save_wav
from funaudiochat.audio.mel import WhisperFrontend
from funaudiochat.errors import ConfigError
from funaudiochat.model.checkpoint import read_state_dict
from funaudiochat.model.word_reader import WordReader
from funaudiochat.train.config import ReaderSection, load_recipe
from funaudiochat.train.metrics import read_metrics
from funaudiochat.train.reader_data import IGNORE, ReaderCollator, load_reader_clips

SENTENCES = [SPOKEN, "How many legs does a spider have?", "Please tell me a joke about cats."]
TRAINED = ("continuous_audio_tower.layers.", "word_reader.layers.", "word_reader.norm.")


def test_teacher_forcing_computes_what_the_step_by_step_read_computes(whisper, spoken):
    """The logits of every position in one causal pass equal those of `read`'s incremental steps (fp32), and their
    argmax over the greedy reading of the clip is that reading, then its end."""
    cfg, tok, encoder, reader = whisper
    greedy_reader = WordReader(dataclasses.replace(cfg, beam_size=1))
    greedy_reader.load_state_dict(reader.state_dict())
    greedy_reader.set_compute_dtype("fp32")
    padded, _ = WhisperFrontend(80)([spoken], padding="max_length")
    with torch.no_grad():
        memory = encoder.ln_post(encoder.encode_frames(padded, torch.tensor([padded.shape[-1]]))[0])[None]
        read, count = greedy_reader.read(memory, 100)
        words = read[0, : int(count[0])].tolist()
        assert "france" in tok.decode(words).lower()
        tokens = torch.tensor([[*cfg.start_ids, *words]])
        forced = reader.teacher_forced(memory, tokens)  # [1, L, V]
        k_cache = torch.zeros(len(reader.layers), 1, cfg.heads, tokens.shape[1], cfg.width // cfg.heads)
        v_cache = torch.zeros_like(k_cache)
        cross = [tuple(layer.cross_attn.split(t) for t in layer.cross_attn.kv(memory).chunk(2, dim=-1))
                 for layer in reader.layers]
        stepped = torch.stack([reader._word_logits(reader._step(tokens[:, p], p, k_cache, v_cache, cross),
                                                   "plain")[0] for p in range(tokens.shape[1])])
    # (a read scores the words and the end token only: the rows up to end_id)
    torch.testing.assert_close(forced[0, :, : cfg.end_id + 1], stepped, rtol=1e-4, atol=1e-3)
    assert forced[0, len(cfg.start_ids) - 1:].argmax(-1).tolist() == [*words, cfg.end_id]


def _records(folder, sentences, extra=()):
    """train.jsonl as build-mini writes it: one ASR record per clip, its script in the audio entry's ref_text."""
    rows = []
    for i, text in enumerate(sentences):
        wav = speak(text)
        save_wav(folder / f"c{i}.wav", wav, 16000)
        entry = {"path": f"c{i}.wav", "ref_text": text, "text": "", "token": "<|audio_pad|>" * (len(wav) // 640)}
        rows.append({"id": f"c{i}", "task": "asr", "messages": [{"role": "user", "content": "x"},
                                                                {"role": "assistant", "content": text}],
                     "audio": [json.dumps(entry)]})
    rows += list(extra)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_clips_targets_and_seeded_roughening(whisper, tmp_path):
    """Each distinct clip once, with its script in Whisper's tokens; records without a script or with a clip past the
    reader's window are reported; the roughening is fixed by (seed, step, micro-batch) and changes with them."""
    cfg, tok, _, _ = whisper
    long_wav = np.zeros(16000 * (cfg.window_s + 1), dtype=np.float32)
    save_wav(tmp_path / "long.wav", long_wav, 16000)
    extra = [{"id": "again", "audio": [{"path": "c0.wav", "ref_text": SPOKEN}]},  # the same clip in another record
             {"id": "answer", "audio": [{"path": "", "text": "Paris."}]},           # no user clip with a script
             {"id": "long", "audio": [{"path": "long.wav", "ref_text": "nothing"}]}]
    data = _records(tmp_path, SENTENCES[:2], extra)
    clips, report = load_reader_clips([data], cfg, tok)
    assert [c.wav for c in clips] == [str(tmp_path / "c0.wav"), str(tmp_path / "c1.wav")]
    assert report.counts() == {"no script": 1, "too long": 1}
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")  # a corrupt clip is reported, not a crash
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "bad", "audio": [{"path": "bad.wav", "ref_text": "x"}]}))
    assert load_reader_clips([tmp_path / "bad.jsonl"], cfg, tok)[1].counts() == {"bad audio": 1}
    words = tok.encode(" " + SENTENCES[1], add_special_tokens=False).ids
    assert clips[1].ids == (*cfg.start_ids, *words, cfg.end_id)

    noisy = ReaderCollator(80, cfg, ReaderSection(noise=1.0, snr_db=[5.0, 5.0], telephone=0.0), seed=3)
    a, b, c = noisy(clips, (7, 0)), noisy(clips, (7, 0)), noisy(clips, (8, 0))
    assert torch.equal(a.features, b.features) and not torch.equal(a.features, c.features)
    clean = ReaderCollator(80, cfg, ReaderSection(noise=0.0, telephone=0.0), seed=3)(clips, (7, 0))
    assert not torch.equal(a.features, clean.features)
    # inputs: the prompt and the script; targets: the script and the end, each one position ahead
    row = clips[1].ids
    assert clean.inputs[1, : len(row) - 1].tolist() == list(row[:-1])
    scored = clean.targets[1][clean.targets[1] != IGNORE].tolist()
    assert scored == [*words, cfg.end_id] and clean.n_targets == sum(len(x.ids) - len(cfg.start_ids) for x in clips)


def test_reader_stage_trains_whisper_alone_and_ships_it(tmp_path):
    """reader_noisy.yaml on three spoken sentences: the loss falls, only Whisper's layers move, and the deltas ship
    them (bf16) so that assembly over the pip-shipped reader gives them back. The stage refuses a model without a
    reader and LLM adapters."""
    from funaudiochat.cli import main as cli_main

    base = tmp_path / "base"
    assert cli_main(["assets", "smollm2", str(base), "--word-reader"]) == 0
    data = _records(tmp_path, SENTENCES)
    common = [f"model.checkpoint={base}", f"data.train=[{data}]", "train.steps=6", "train.global_batch=3",
              "train.micro_batch=3", "optim.lr=1e-4", "optim.warmup_steps=0", "reader.noise=0", "reader.telephone=0",
              "log.every=1", "checkpoint.every=0", "train.precision=fp32"]
    ok(cli("train", "recipes/mini/reader_noisy.yaml", *common, f"run_dir={tmp_path / 'run'}"))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    final = tmp_path / "run" / "final"
    start, after = read_state_dict(base), read_state_dict(final)
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    assert any(k.startswith("word_reader.") for k in moved) and any(k.startswith("continuous_") for k in moved)
    assert all(k.startswith(TRAINED) for k in moved), sorted(moved - {k for k in moved if k.startswith(TRAINED)})

    models = tmp_path / "models"
    ok(cli("assets", "mini-deltas", final, models, "--base", base, "--stage", "reader_noisy", "--bf16"))
    ok(cli("assets", "mini", tmp_path / "mini", "--deltas", models, "--base", base))
    assembled = read_state_dict(tmp_path / "mini")
    for k in moved:  # bf16 deltas: within their rounding
        torch.testing.assert_close(assembled[k].float(), after[k].float(), rtol=1e-2, atol=1e-2)
        assert not torch.equal(assembled[k].float(), start[k].float()), k

    # refused before anything trains: LLM adapters in a reader stage; a model without a reader
    with pytest.raises(ConfigError, match="lora.rank"):
        load_recipe("recipes/mini/reader_noisy.yaml", ["lora.rank=8"])
    with pytest.raises(ConfigError, match=r"reader.noise \+ reader.telephone"):
        load_recipe("recipes/mini/reader_noisy.yaml", ["reader.noise=0.8", "reader.telephone=0.3"])
    tiny = tmp_path / "tiny"
    from helpers import make_tiny_checkpoint
    make_tiny_checkpoint(tiny)
    bad = cli("train", "recipes/mini/reader_noisy.yaml", *common[1:], f"model.checkpoint={tiny}",
              f"run_dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "has no word reader" in bad.stderr and "Traceback" not in bad.stderr
