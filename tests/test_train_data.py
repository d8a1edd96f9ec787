"""Training data: released sharegpt records -> model inputs (golden parity), malformed records, batching, packing,
`funaudiochat data prepare`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_tiny_tokenizer, sharegpt_record, synthetic_s2s, words, write_wav

from funaudiochat.cli import main as cli_main
from funaudiochat.config import FunAudioChatConfig
from funaudiochat.errors import InputError
from funaudiochat.model import presets
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.train.batching import Collator, EpochPlan, pack, split_global_batch
from funaudiochat.train.data import SampleBuilder, assistant_token_string, load_records


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def model_targets(model, batch):
    """Text / speech target counts of the model's own rewritten labels."""
    trace = {}
    with torch.no_grad():
        model(**batch.model_inputs("cpu"), trace=trace)
    k = model.group_size
    speech = torch.nn.functional.pad(trace["crq_speech_labels"], (0, k), value=-100)[:, k:]
    return int((trace["lm_labels"][:, 1:] != -100).sum()), int((speech != -100).sum())


# ---- the released record format ------------------------------------------------------------------------------------

def test_sharegpt_records_reproduce_golden_batch(shared_dir, tok, tmp_path):
    """The two conversations of the train_fwd golden, written as released sharegpt records, give the golden's
    input_ids / labels / speech / transcript tensors exactly, and (with its features) its losses."""
    from safetensors.torch import load_file

    from funaudiochat.model.checkpoint import load_model

    gold = shared_dir / "golden" / "tiny-dense"
    inp = load_file(gold / "train_fwd" / "inputs.safetensors")
    ref = load_file(gold / "train_fwd" / "outputs.safetensors")
    model = load_model(gold / "model")
    systems, extra_user, seconds = [inp["input_ids"][0, 3:9], inp["input_ids"][1, 3:6]], ["", words([116, 33, 361])], \
        [2.64, 1.30]
    lines = []
    for i in range(2):
        n_speech = int(inp["speech_attention_mask"][2 * i + 1].sum())
        codes = inp["speech_ids"][2 * i + 1, 10:n_speech].tolist()
        answer = [t for t in inp["text_ids"][2 * i + 1].tolist() if t != 500]
        wav = write_wav(tmp_path / f"u{i}.wav", seconds[i], seed=i)
        lines.append(json.dumps(sharegpt_record(words(systems[i]), wav, answer, codes, seconds[i], extra_user[i])))
    (tmp_path / "g.jsonl").write_text("\n".join(lines) + "\n")
    samples, report = load_records([tmp_path / "g.jsonl"], SampleBuilder(tok, model.cfg, 4096).sample)
    assert report.kept == 2 and not report.problems

    batch = Collator(model.cfg, 4096, packing=False)(samples)
    for name in ("input_ids", "attention_mask", "labels", "speech_ids", "speech_attention_mask", "text_ids",
                 "text_attention_mask", "feature_exist_mask"):
        assert torch.equal(getattr(batch, name), inp[name]), name
    assert torch.equal(batch.feature_attention_mask.sum(-1), inp["feature_attention_mask"].sum(-1))
    inputs = {**batch.model_inputs("cpu"), "input_features": inp["input_features"],
              "feature_attention_mask": inp["feature_attention_mask"]}
    with torch.no_grad():
        out = model(**inputs)
    for name in ("loss", "text_loss", "speech_loss"):
        assert torch.allclose(getattr(out, name), ref[name], rtol=1e-4), name
    assert (batch.n_text_targets, batch.n_speech_targets) == model_targets(model, batch)


def test_released_record_loads_multiturn_and_packs(tok, tmp_path):
    """A multi-turn released record (system in messages, a typed second turn answered in text): labels cover each
    assistant part `content<|im_end|>\\n`; packing gives the same loss as padding; target counts match the model's."""
    cfg = presets.tiny()
    wav = write_wav(tmp_path / "q.wav", 0.5)
    rec = sharegpt_record(words([40]), wav, [60, 61, 62], list(range(11)), 0.5)
    rec["messages"] = [{"role": "system", "content": words([41, 42])}] + rec["messages"] + \
        [{"role": "user", "content": words([70, 71])}, {"role": "assistant", "content": words([80, 81])}]
    del rec["system"]
    other = sharegpt_record(words([43]), wav, [90], [1, 2, 3, 4, 5, 6], 0.5, extra_user_text=words([44]))
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(other) + "\n")
    samples, _ = load_records([tmp_path / "d.jsonl"], SampleBuilder(tok, cfg, 512).sample)
    s = samples[0]
    system = tok.encode("<|im_start|>system\nw41 w42<|im_end|>\n")
    assert s.input_ids[:len(system)].tolist() == system
    assert (s.input_ids == tok.special.audio).sum() == 3 + 5  # ceil(12 / 5) user groups + ceil((10 + 11) / 5)
    trained = "<|audio_bos|>" + "<|AUDIO|>" * 5 + "<|audio_eos|><|im_end|>\nw80 w81<|im_end|>\n"
    assert s.labels[s.labels != -100].tolist() == tok.encode(trained)
    assert [len(a.speech_ids) for a in s.audios] == [12, 21] and s.audios[1].wav is None
    assert s.audios[0].wav == str(wav) and len(s.audios[0].text_ids) == 0

    model = FunAudioChatModel(cfg)
    model.init_weights(0.2)
    padded = Collator(cfg, 512, packing=False)(samples)
    packed = Collator(cfg, 512, packing=True)(samples)
    assert packed.input_ids.shape[0] == 1 and packed.attention_mask.max() == 2
    assert packed.position_ids[0, len(samples[0])] == 0
    with torch.no_grad():
        a, b = model(**padded.model_inputs("cpu")), model(**packed.model_inputs("cpu"))
    assert torch.isfinite(a.loss) and torch.allclose(a.loss, b.loss, rtol=1e-5)
    assert (padded.n_text_targets, padded.n_speech_targets) == model_targets(model, padded)
    assert (packed.n_text_targets, packed.n_speech_targets) == model_targets(model, packed)


def test_malformed_records_are_reported_with_line_numbers(tok, tmp_path):
    cfg = presets.tiny()
    wav = write_wav(tmp_path / "q.wav", 0.4)
    good = sharegpt_record(words([40]), wav, [60], [1, 2, 3], 0.4)

    def variant(**changes):
        return json.dumps({**good, **changes})

    bad_roles = [{"role": "assistant", "content": "w50"}, {"role": "user", "content": "w51"}]
    one_audio = good["audio"][:1]
    bad_token = [good["audio"][0], json.dumps({"path": "", "text": "w60", "token": "<|audio_bos|>[XX01]"})]
    missing = [json.dumps({"path": str(tmp_path / "nope.wav"), "token": "<|audio_pad|>" * 10}), good["audio"][1]]
    too_long = [good["audio"][0], json.dumps({"path": "", "text": "w60", "token": assistant_token_string([1] * 900)})]
    lines = [json.dumps(good), "{not json", variant(messages=bad_roles), variant(audio=one_audio),
             variant(audio=bad_token), variant(audio=missing), "", variant(audio=too_long),
             json.dumps({"turns": [{"role": "user", "text": "w1"}]}), json.dumps(good)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    build = SampleBuilder(tok, cfg, 128).sample

    samples, report = load_records([path], build, on_error="skip")
    assert len(samples) == 2 and [s.source for s in samples] == [f"{path}:1", f"{path}:10"]
    got = {p.source.rsplit(":", 1)[1]: p.kind for p in report.problems}
    assert got == {"2": "invalid json", "3": "bad format", "4": "bad format", "5": "bad speech tokens",
                   "6": "missing file", "8": "too long", "9": "bad format"}
    assert "data prepare" in next(p.message for p in report.problems if p.source.endswith(":9"))
    assert "2 of 9 records kept" in report.summary()

    with pytest.raises(InputError, match=r"bad\.jsonl:2: not valid JSON"):
        load_records([path], build, on_error="reject")


# ---- batching ------------------------------------------------------------------------------------------------------

def test_epoch_plan_is_seeded_bucketed_and_split_evenly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=103).tolist()
    plan = EpochPlan(lengths, global_batch=8, seed=3, bucket_batches=4)
    assert plan.batches_per_epoch == 12
    epoch0 = np.concatenate(plan.epoch(0))
    assert len(set(epoch0.tolist())) == 96  # no sample twice within an epoch
    assert all(np.array_equal(a, b) for a, b in zip(plan.epoch(0), EpochPlan(lengths, 8, 3, 4).epoch(0)))
    assert not np.array_equal(epoch0, np.concatenate(EpochPlan(lengths, 8, 4, 4).epoch(0)))
    assert not np.array_equal(epoch0, np.concatenate(plan.epoch(1)))
    assert np.array_equal(plan.step(13), plan.epoch(1)[1])
    # bucketing: less padding than the same batches without sorting
    arr = np.asarray(lengths)
    padded = sum(arr[b].max() * len(b) for b in plan.epoch(0))
    unsorted = EpochPlan(lengths, 8, 3, bucket_batches=1)  # windows of one batch: no cross-batch sorting
    assert padded < sum(arr[b].max() * len(b) for b in unsorted.epoch(0))

    # the same global batch split over (processes x accumulation) gives the same micro-batches per slot
    batch = plan.step(0)
    one = split_global_batch(batch, arr, rank=0, world=1, accum=4)
    two = [split_global_batch(batch, arr, rank=r, world=2, accum=2) for r in range(2)]
    assert [m.tolist() for m in one] == [two[0][0].tolist(), two[1][0].tolist(), two[0][1].tolist(),
                                         two[1][1].tolist()]
    assert sorted(np.concatenate(one).tolist()) == sorted(batch.tolist())


def test_pack_fills_rows_without_exceeding_max_len():
    class S:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    items = [S(n) for n in (90, 60, 50, 40, 30, 10, 100)]
    rows = pack(items, 100)
    assert all(sum(map(len, r)) <= 100 for r in rows)
    assert sorted(id(s) for r in rows for s in r) == sorted(map(id, items))
    assert len(rows) == 4  # 380 tokens: first-fit decreasing reaches the optimum here


# ---- data prepare --------------------------------------------------------------------------------------------------

def test_data_prepare_tokenizes_validates_and_reports(tok, tmp_path, capsys):
    from funaudiochat.speech.s3onnx import export_onnx
    from funaudiochat.speech.s3tokenizer import S3Tokenizer, S3TokenizerConfig, tokenize_audio

    s3 = S3Tokenizer(S3TokenizerConfig(n_audio_state=64, n_audio_head=2, n_audio_layer=1)).eval()
    onnx_path = export_onnx(s3, tmp_path / "s3.onnx")
    write_wav(tmp_path / "wavs/q.wav", 0.8, seed=1)
    answer = write_wav(tmp_path / "wavs/a.wav", 1.2, seed=2, freq=220)
    (tmp_path / "wavs/broken.wav").write_text("not audio")
    tok_path = tmp_path / "tok.json"
    make_tiny_tokenizer(tok_path)

    def native(user, assistant, **kw):
        return json.dumps({"turns": [user, assistant], **kw})

    lines = [
        native({"role": "user", "audio": "wavs/q.wav", "text": "what?"}, {"role": "assistant", "text": "w60 w61",
                                                                          "audio": "wavs/a.wav"}, system="w40"),
        native({"role": "user", "text": "w70"}, {"role": "assistant", "text": "w71", "speech_tokens": [5, 6, 7]}),
        native({"role": "user", "audio": "wavs/missing.wav"}, {"role": "assistant", "text": "w60"}),
        native({"role": "user", "audio": "wavs/broken.wav"}, {"role": "assistant", "text": "w60"}),
        native({"role": "user", "text": "w70"}, {"role": "assistant", "text": "  ", "speech_tokens": [1]}),
        native({"role": "user", "text": " ".join(["w70"] * 300)}, {"role": "assistant", "text": "w71"}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    args = ["data", "prepare", str(tmp_path / "in.jsonl"), str(out), "--tokenizer", str(tok_path),
            "--speech-tokenizer", str(onnx_path), "--max-len", "256", "--report", str(report), "--no-progress"]
    assert cli_main(args) == 0
    assert "2 of 6 records kept" in capsys.readouterr().out
    kinds = {p["source"].rsplit(":", 1)[1]: p["kind"] for p in json.loads(report.read_text())["problems"]}
    assert kinds == {"3": "missing file", "4": "unreadable audio", "5": "empty text", "6": "too long"}

    records = [json.loads(line) for line in out.read_text().splitlines()]
    user, reply = (json.loads(e) for e in records[0]["audio"])
    from funaudiochat.audio.io import load_audio

    codes = tokenize_audio(load_audio(answer, 16000), s3)
    assert reply["token"] == assistant_token_string(codes) and reply["ref_path"] == str(answer)
    assert user["token"] == "<|audio_pad|>" * 20 and user["ref_text"] == "what?"
    assert records[0]["system"] == "w40" and records[1]["messages"][0]["content"] == "w70"
    samples, rep = load_records([out], SampleBuilder(tok, FunAudioChatConfig(), 256).sample)
    assert rep.kept == 2 and len(samples[0].audios[1].speech_ids) == 10 + len(codes)

    assert cli_main(args + ["--on-error", "reject"]) == 1
    assert "in.jsonl:3" in capsys.readouterr().err


def test_unreadable_audio_at_collate_names_the_record(tok, tmp_path):
    cfg = presets.tiny()
    data = synthetic_s2s(tmp_path, n=2)
    samples, _ = load_records([data], SampleBuilder(tok, cfg, 256).sample)
    (tmp_path / "q0.wav").write_text("garbage")
    with pytest.raises(InputError, match=r"train\.jsonl:1: .*data prepare"):
        Collator(cfg, 256, packing=True)(samples)


def test_text_logits_at_targets_only_give_the_same_loss_and_gradients(tok, tmp_path):
    """Training computes the text head only at text targets (`text_logits="targets"`): the loss and every parameter's
    gradient equal the full-sequence head's, to fp32 rounding, on packed S2S rows with user audio."""
    cfg = presets.tiny()
    samples, _ = load_records([synthetic_s2s(tmp_path, n=4)], SampleBuilder(tok, cfg, 256).sample)
    batch = Collator(cfg, 256, packing=True)(samples)
    model = FunAudioChatModel(cfg)
    model.init_weights(0.2)

    def loss_and_grads(**kw):
        model.zero_grad(set_to_none=True)
        out = model(**batch.model_inputs("cpu"), **kw)
        out.loss.backward()
        return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    full, g_full = loss_and_grads()
    at, g_at = loss_and_grads(text_logits="targets")
    assert at.text_logits.shape == (batch.n_text_targets, cfg.text_config.vocab_size)
    assert torch.allclose(at.loss, full.loss, rtol=1e-6) and torch.allclose(at.text_loss, full.text_loss, rtol=1e-6)
    assert g_at.keys() == g_full.keys() and len(g_at) > 10
    for k in g_full:
        assert torch.allclose(g_at[k], g_full[k], rtol=1e-4, atol=1e-7), k
    with pytest.raises(ValueError, match="text_logits"):
        model(**{k: v for k, v in batch.model_inputs("cpu").items() if k != "labels"}, text_logits="targets")
