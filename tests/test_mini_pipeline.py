"""fun-audio-chat-mini end to end on a tiny random model and a hand-made dataset in build-mini's record layout:
pre-align -> hearing (LoRA) -> more hearing (LoRA on the MLPs too) -> Core-Cocktail stage 1 (LoRA) -> merge -> stage 2 (the recipes/mini/*.yaml files, shrunk by overrides)
-> deltas -> `assets mini` -> `eval mini`, each a real `funaudiochat` process; plus the deltas' checks and the
must-show scoring rules."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_checkpoint, write_wav

from funaudiochat.assets import mini_deltas
from funaudiochat.audio.io import load_audio
from funaudiochat.engine.prompt import speech_token_count
from funaudiochat.errors import CheckpointError, InputError
from funaudiochat.eval import mini as eval_mini
from funaudiochat.model import lora
from funaudiochat.model.checkpoint import read_state_dict
from funaudiochat.text.chat import ASR_INSTRUCTION
from funaudiochat.text.tokenizer import AUDIO_PAD, AUDIO_TEMPLATE

SYSTEM = "You are a friendly voice assistant."
QA = [("what is two plus two ?", "Two plus two is 4.", ["4"], "It is 4."),
      ("name the red planet .", "The red planet is Mars.", ["Mars"], "It is Venus."),
      ("how are you today ?", "I am fine, thank you.", [], "I am fine, thank you.")]
ASR = ["the cat sat on the mat .", "please open the door ."]
VOCAB = " ".join([SYSTEM, ASR_INSTRUCTION, *ASR] + [" ".join([q, a, t, *e]) for q, a, e, t in QA])
SHRINK = ["train.steps=2", "train.global_batch=2", "train.micro_batch=1",
          "data.max_len=256", "log.progress=false", "log.tensorboard=false", "optim.warmup_steps=0"]
ADAPTER = ["continuous_audio_tower.proj.*", "audio_tower.continual_output_matching.*"]


def _entry(folder: Path, name: str, text: str, seconds: float, seed: int) -> str:
    wav = write_wav(folder / "audio" / f"{name}.wav", seconds, seed=seed, freq=180.0 + 40 * seed)
    return json.dumps({"path": f"audio/{name}.wav", "text": "", "ref_path": "", "ref_text": text,
                       "token": AUDIO_PAD * speech_token_count(int(seconds * 16000))}, sort_keys=True)


def make_data(folder: Path) -> Path:
    """train/test/test_snr10/test_phone.jsonl as `data build-mini` writes them (QA and ASR records)."""
    for split in ("train", "test", "test_snr10", "test_phone"):
        rows = []
        for i, (q, a, expected, typed) in enumerate(QA):
            rows.append({"id": f"qa{i}", "task": "qa", "system": SYSTEM,  # same id in a test split's copies
                         "messages": [{"role": "user", "content": AUDIO_TEMPLATE}, {"role": "assistant", "content": a}],
                         "audio": [_entry(folder, f"{split}-qa{i}", q, 0.6, i)],
                         "meta": {"family": "facts", "expected": expected, "typed_answer": typed, "questions": [q],
                                  "gold": None, "reject": None}})
        for i, text in enumerate(ASR):
            rows.append({"id": f"{split}-asr{i}", "task": "asr", "system": SYSTEM,
                         "messages": [{"role": "user", "content": f"{AUDIO_TEMPLATE}\n{ASR_INSTRUCTION}"},
                                      {"role": "assistant", "content": text}],
                         "audio": [_entry(folder, f"{split}-asr{i}", text, 0.5, 10 + i)], "meta": {"family": "asr"}})
        rows = [r for r in rows if split != "test" or r["id"] != "qa2"] + \
            [r for r in rows if split == "test" and r["id"] == "qa2"]  # the gold items first
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "funaudiochat.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_scoring_rules():
    assert eval_mini.agrees("It is 4. Easy.", "It is 5. Easy.", []) is False  # first sentences differ
    assert eval_mini.agrees("It is 4. Easy.", "it is 4! Sure.", [])  # same first sentence (normalised)
    assert eval_mini.agrees("The answer: 4.", "Four is 4.", ["4"])      # same gold verdict (both right)
    assert eval_mini.agrees("Maybe 5.", "Maybe 6.", ["4"])              # same gold verdict (both wrong)
    assert not eval_mini.agrees("It is 4.", "Maybe 6.", ["4"])
    assert eval_mini.accuracy(["Mars, of course.", "Venus."], [["Mars"], ["Mars"]]) == 0.5
    assert eval_mini.percentile([1.0, 2.0, 3.0], 50) == 2.0


def test_agreement_is_scored_on_the_gold_subset():
    def rec(i, expected):
        return eval_mini.Record(id=f"q{i}", task="qa", system="", messages=[], wavs=[], answer="", questions=[],
                                expected=expected, typed_answer="")

    qa = [rec(0, ["4"]), rec(1, ["Mars"]), rec(2, []), rec(3, [])]
    spoken = {"q0": "It is 4.", "q1": "Venus.", "q2": "Sure, walk more.", "q3": "Sleep early."}
    typed = {"q0": "Four: 4.", "q1": "Mars.", "q2": "Sure, walk more!", "q3": "Drink water."}
    # gold: q0 agrees (both right), q1 does not; every item: q2 agrees by its first sentence, q3 does not
    assert eval_mini.agreement_shares(qa, spoken, typed) == (0.5, 0.5)
    spoken["q3"] = "Drink water."
    assert eval_mini.agreement_shares(qa, spoken, typed) == (0.5, 0.75)  # non-gold items never move the bar
    assert eval_mini.agreement_shares(qa[2:], spoken, typed) == (None, 1.0)  # no gold items: no agreement figure


def test_mini_pipeline(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base", VOCAB)
    data = make_data(tmp_path / "data")
    runs = tmp_path / "runs"
    common = [f"model.checkpoint={base}", f"data.train=[{data / 'train.jsonl'}]", *SHRINK]
    ok(cli("train", "recipes/mini/pre_align.yaml", *common, f"run_dir={runs / 'pre'}",
           f"train.trainable=[{', '.join(ADAPTER + ['continuous_audio_tower.layers.1.*'])}]"))
    lora_train = "train.trainable=" + json.dumps(["*.lora_A", "*.lora_B"] + ADAPTER)
    ok(cli("train", "recipes/mini/hear.yaml", *common, f"model.checkpoint={runs / 'pre/final'}",
           f"run_dir={runs / 'hear'}", lora_train, "lora.rank=2"))
    # hear2 adds adapters on all seven projections (the MLPs too) on top of hear's attention-only delta
    ok(cli("train", "recipes/mini/hear2.yaml", *common, f"model.checkpoint={runs / 'hear/final'}",
           f"run_dir={runs / 'hear2'}", lora_train, "lora.rank=2"))
    first, second = lora.load_delta(runs / "hear/final"), lora.load_delta(runs / "hear2/final")
    assert set(lora.modules_of(first)) < set(lora.modules_of(second))
    assert any(".mlp." in m for m in lora.modules_of(second)) and not any(".mlp." in m for m in lora.modules_of(first))
    ok(cli("train", "recipes/mini/core_cocktail_stage1.yaml", *common, f"model.checkpoint={runs / 'hear2/final'}",
           f"run_dir={runs / 's1'}", lora_train, "lora.rank=2"))
    out = ok(cli("merge", runs / "hear2/final", runs / "s1/final", runs / "merged", "--alpha", "0.5"))
    assert "LoRA: BASE + 0.5 x STAGE1's delta" in out
    name = lora.modules_of(first)[0]  # the merge keeps the hearing stages' delta whole, halves stage 1's
    merged_delta = lora.load_delta(runs / "merged")
    n = second[name + ".lora_A"].shape[0]
    torch.testing.assert_close(merged_delta[name + ".lora_A"][:n], second[name + ".lora_A"], rtol=0, atol=0)
    # a stage's deltas name it, and the checkpoint assembled from them (what the pipeline restores on a fresh
    # machine) is the stage's output, its LLM delta recorded so that stage 2 on it still ships as one delta
    snap = tmp_path / "snapshot"
    ok(cli("assets", "mini-deltas", runs / "merged", snap, "--base", base, "--stage", "core_cocktail_merged"))
    assert mini_deltas.read(snap)[1]["stage"] == "core_cocktail_merged"
    out = ok(cli("assets", "mini", runs / "restored", "--deltas", snap, "--base", base))
    assert "'core_cocktail_merged' stage of the training recipe, not a release" in out  # said, not hidden
    restored, merged = read_state_dict(runs / "restored"), read_state_dict(runs / "merged")
    for k in merged:
        torch.testing.assert_close(restored[k], merged[k], rtol=0, atol=1e-5)
    assert lora.load_delta(runs / "restored").keys() == lora.load_delta(runs / "merged").keys()
    ok(cli("train", "recipes/mini/core_cocktail_stage2.yaml", *common, f"model.checkpoint={runs / 'restored'}",
           f"run_dir={runs / 's2'}", lora_train, "lora.rank=2"))
    final = runs / "s2" / "final"
    assert lora.load_delta(final)  # stage 1's merged delta + stage 2's

    models = tmp_path / "models" / "mini"
    ok(cli("assets", "mini-deltas", final, models, "--base", base))
    deltas, meta = mini_deltas.read(models)
    assert json.loads(meta["trained"]) == {"hearing": True, "speaking": False}
    assert not any(k.startswith("language_model.") and not lora.is_adapter(k) for k in deltas)  # LLM: factors only
    assert any(k.startswith("continuous_audio_tower.layers.1.") for k in deltas)  # the pre-aligned encoder layer
    assert not any(k.startswith("audio_invert_tower.") for k in deltas)  # untrained parts are not shipped

    ckpt = tmp_path / "checkpoints" / "mini"
    ok(cli("assets", "mini", ckpt, "--deltas", models, "--base", base))
    assembled, trained = read_state_dict(ckpt), read_state_dict(final)
    for k in trained:
        torch.testing.assert_close(assembled[k], trained[k], rtol=0, atol=1e-5)
    assert json.loads((ckpt / "config.json").read_text())["trained"] == {"hearing": True, "speaking": False}
    # the assembled model answers under the system prompt of its training data unless told otherwise
    from funaudiochat.config import FunAudioChatConfig
    from funaudiochat.data.build_mini import MINI_SYSTEM
    from funaudiochat.engine.presets import default_system

    assert default_system("s2t", FunAudioChatConfig.load(ckpt)) == MINI_SYSTEM != default_system("s2t")
    assert default_system("s2t", FunAudioChatConfig.load(base)) == default_system("s2t")

    report_dir = tmp_path / "report"
    out = ok(cli("eval", "mini", "--model", ckpt, "--data", data, "--split", "test", "--limit", "2",
                 "--latency", "2", "--max-new-tokens", "4", "--out", report_dir, "--dtype", "bf16"))
    report = json.loads((report_dir / "report.json").read_text())
    assert report["counts"] == {"asr": 2, "qa": 2, "gold": 2} and report["dtype"] == "bf16" and "(bf16)" in out
    assert report["spoken_qa"]["accuracy_base_typed"] == 0.5  # the recorded typed answers: one right, one wrong
    figures = [r["figure"] for r in report["summary"]]
    assert figures[0] == "ASR WER" and "latency p50 (eager), s" in figures
    assert {"robustness snr10 / clean", "robustness phone / clean"} <= set(figures)
    assert report["robustness"]["snr10"]["n"] == report["robustness"]["phone"]["n"] == 2
    for name, r in report["robustness"].items():  # against a clean accuracy of 0 a ratio says nothing: n/a
        assert (r["ratio"] is None) == (r["clean_accuracy"] == 0), (name, r)
        row = next(x for x in report["summary"] if x["figure"] == f"robustness {name} / clean")
        assert row["pass"] is None or r["ratio"] is not None  # never a pass on nothing
    assert report["asr"]["wer"] >= 0 and report["asr"]["whisper_tiny_en_wer"] >= 0
    assert 0 < report["latency"]["eager"]["p50_s"] < 30
    assert "| ASR WER |" in out and (report_dir / "report.md").read_text() in out
    # the latency is a new conversation's, as `chat` and `serve` run one: the system turn computed once per engine
    me = eval_mini.Answerer(ckpt, max_new_tokens=4)
    rec = next(r for r in eval_mini.read_split(data, "test") if r.task == "qa")
    audio = eval_mini.five_seconds(load_audio(rec.wavs[0], eval_mini.RATE))
    assert rec.system and len(me.engine.prefixes) == 0
    assert next(me.engine.model.parameters()).dtype == torch.float32  # as stored (the eval above: --dtype bf16)
    assert me.first_text_latency(rec.system, audio) > 0 and len(me.engine.prefixes) == 1

    # errors: one line each, nothing written
    bad = cli("assets", "mini", tmp_path / "x", "--deltas", tmp_path / "nowhere", "--base", base)
    assert bad.returncode == 1 and "funaudiochat assets mini: error:" in bad.stderr and "nowhere" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="dev.jsonl: no such split file"):
        eval_mini.read_split(data, "dev")


def test_deltas_must_fit(tmp_path, monkeypatch):
    base = make_tiny_checkpoint(tmp_path / "base")
    state = read_state_dict(base)
    key = "continuous_audio_tower.proj.weight"
    deltas = {key: state[key] + 1.0}
    meta = {"format": mini_deltas.FORMAT, "seed": "0", "trained": "{}"}
    mini_deltas.write(deltas, meta, tmp_path / "m")
    from funaudiochat.model.checkpoint import load_model

    model = load_model(base)
    with pytest.raises(CheckpointError, match="does not fit"):
        mini_deltas.apply_deltas(model, {key: torch.zeros(3, 3)}, "d")
    with pytest.raises(CheckpointError, match="d: audio_config.*srh_token_scale"):  # a bad setting in the metadata
        mini_deltas.with_audio_settings(model, {"srh_token_scale": -1}, "d", {})
    with pytest.raises(CheckpointError, match="does not fit"):
        mini_deltas.apply_deltas(model, {"language_model.model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 7),
                                         "language_model.model.layers.0.self_attn.q_proj.lora_B": torch.zeros(9, 2)},
                                 "d")
    monkeypatch.setattr(mini_deltas, "MAX_BYTES", 100)
    with pytest.raises(CheckpointError, match="budget"):
        mini_deltas.read(tmp_path / "m")
    with pytest.raises(CheckpointError, match="budget"):
        mini_deltas.write(deltas, meta, tmp_path / "m2")
    # a trained checkpoint whose LLM changed outside LoRA cannot ship small
    tuned = tmp_path / "tuned"
    make_tiny_checkpoint(tuned, seed=0)
    changed = read_state_dict(tuned)
    changed["language_model.model.layers.0.mlp.up_proj.weight"] += 0.5
    from safetensors.torch import save_file
    save_file(changed, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="outside low-rank adapters"):
        mini_deltas.extract(tuned, base)


def test_a_head_trained_with_the_answers_prosody_is_assembled_with_its_speedup_calibration(tmp_path):
    """`MINI_PROSODY`: a checkpoint whose deltas trained the answer's prosody gets `srh_speedup_scale` (a setting
    the deltas record themselves wins); one without the prosody gets none."""
    from funaudiochat.model.checkpoint import load_model, save_model
    from funaudiochat.model.funaudiochat import FunAudioChatModel

    base = make_tiny_checkpoint(tmp_path / "base")
    model = load_model(base)
    cfg = model.cfg
    cfg.audio_config.srh_answer_style = cfg.audio_config.srh_answer_prosody = True
    trained = FunAudioChatModel(cfg)
    state = trained.state_dict()
    state.update(model.state_dict())
    trained.load_state_dict(state)
    with torch.no_grad():
        trained.audio_invert_tower.answer_prosody.weight.normal_()
    save_model(trained, tmp_path / "trained")
    deltas, meta = mini_deltas.extract(tmp_path / "trained", base)
    scale = mini_deltas.MINI_PROSODY["srh_speedup_scale"]
    for name, recorded, expected in (("calibrated", {}, scale), ("own", {"srh_speedup_scale": 3.0}, 3.0)):
        settings = {**json.loads(meta["audio_config"]), **recorded}
        mini_deltas.write(deltas, {**meta, "audio_config": json.dumps(settings)}, tmp_path / name)
        rebuilt = load_model(mini_deltas.assemble(tmp_path / f"out_{name}", tmp_path / name, base_dir=base))
        assert rebuilt.cfg.audio_config.srh_speedup_scale == rebuilt.audio_invert_tower.speedup_scale == expected
    assert scale > 1.0
    mini_deltas.write({k: v for k, v in deltas.items() if "answer_" not in k},
                      {**meta, "audio_config": "{}"}, tmp_path / "none")
    without = load_model(mini_deltas.assemble(tmp_path / "out_none", tmp_path / "none", base_dir=base))
    assert not without.cfg.audio_config.srh_answer_prosody and without.cfg.audio_config.srh_speedup_scale == 1.0


def test_deltas_carry_the_tensors_a_trained_setting_adds(tmp_path):
    """A head trained with the pending-units view (audio_config.srh_pending_units) ships its view's embeddings in
    full, and assembly rebuilds the model with the setting before it applies them."""
    from funaudiochat.model.checkpoint import load_model, save_model
    from funaudiochat.model.funaudiochat import FunAudioChatModel

    base = make_tiny_checkpoint(tmp_path / "base")
    model = load_model(base)
    cfg = model.cfg
    cfg.audio_config.srh_pending_units = 2
    trained = FunAudioChatModel(cfg)
    state = {**model.state_dict(), **{k: v for k, v in trained.state_dict().items() if "pending_embed" in k}}
    trained.load_state_dict(state)
    with torch.no_grad():
        trained.audio_invert_tower.pending_embed.weight.normal_()
        trained.audio_invert_tower.lm_head.weight.add_(0.1)
    save_model(trained, tmp_path / "trained")
    deltas, meta = mini_deltas.extract(tmp_path / "trained", base)
    assert "audio_invert_tower.pending_embed.weight" in deltas
    assert json.loads(meta["audio_config"]) == {"srh_pending_units": 2}
    mini_deltas.write(deltas, meta, tmp_path / "deltas")
    rebuilt = load_model(mini_deltas.assemble(tmp_path / "out", tmp_path / "deltas", base_dir=base))
    assert rebuilt.audio_invert_tower.pending_width == 2
    for key, value in trained.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    half = mini_deltas.write(deltas, meta, tmp_path / "half", bf16=True)  # --bf16: half the bytes, rounded weights
    assert half.stat().st_size < 0.6 * (tmp_path / "deltas" / mini_deltas.DELTAS_FILE).stat().st_size
    rounded = load_model(mini_deltas.assemble(tmp_path / "out_half", tmp_path / "half", base_dir=base)).state_dict()
    for key, value in trained.state_dict().items():
        assert torch.allclose(rounded[key], value, rtol=1e-2, atol=1e-2), key
    assert not torch.equal(rounded["audio_invert_tower.pending_embed.weight"],
                           trained.state_dict()["audio_invert_tower.pending_embed.weight"])
