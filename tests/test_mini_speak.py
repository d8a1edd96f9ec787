"""fun-audio-chat-mini's speaking stages (issue 14 item 3) on a tiny random model and made-up S2S records, each a
real `funaudiochat` process: recipes/mini/speak_srh.yaml trains the SRH alone, speak.yaml the SRH with the speech
opener (config `trained.speaking` becomes true; the LLM and the hearing adapter stay frozen), `assets mini-deltas`
ships the SRH and the opener, `assets mini` writes the Piper detokenizer.json; speak_srh.yaml at group size 1 (the
LLM at 25 Hz) is the DRSR comparison's line."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import make_tiny_checkpoint, synthetic_s2s
from test_mini_pipeline import SHRINK, cli, ok

from funaudiochat.assets import mini_deltas
from funaudiochat.data.build_mini import MINI_SYSTEM
from funaudiochat.engine.loading import read_config
from funaudiochat.engine.presets import default_system, generation_preset
from funaudiochat.errors import ConfigError
from funaudiochat.model.checkpoint import read_state_dict
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.speech import piper_tokens as pt
from funaudiochat.text.tokenizer import TextTokenizer
from funaudiochat.train import loop
from funaudiochat.train.metrics import read_metrics


def _untrained_base(folder):
    """A tiny checkpoint marked as `assets smollm2` marks the mini's start: nothing of hearing or speaking trained;
    its speech codebook holds the Piper vocabulary (the recipes start its embeddings factorized)."""
    base = make_tiny_checkpoint(folder, codebook=pt.VOCAB_SIZE + 8)
    cfg = json.loads((base / "config.json").read_text())
    cfg["trained"] = {"hearing": False, "speaking": False}
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_speak_stages_train_and_ship_the_srh(tmp_path):
    """speak_srh.yaml trains the head alone on the frozen hearing model; speak.yaml then trains it with the speech
    opener, the LLM and the hearing adapter frozen; the deltas ship the head, the opener and the settings they were
    trained with (srh_token_scale, the pending-units view, no speech fed back to the LLM, the opener)."""
    base = _untrained_base(tmp_path / "base")
    data = synthetic_s2s(tmp_path / "data", n=4)
    common = [f"data.train=[{data}]", *SHRINK]
    ok(cli("train", "recipes/mini/speak_srh.yaml", f"model.checkpoint={base}", *common, f"run_dir={tmp_path / 'srh'}"))
    head = tmp_path / "srh" / "final"
    scale = yaml.safe_load(open("recipes/mini/speak_srh.yaml"))["model"]["srh_token_scale"]
    head_cfg = json.loads((head / "config.json").read_text())
    assert head_cfg["trained"] == {"hearing": False, "speaking": True}  # the head alone
    assert head_cfg["audio_config"]["srh_token_scale"] == scale
    before, after = read_state_dict(base), read_state_dict(head)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("audio_invert_tower.", "audio_tower.embed_tokens.")) for k in changed)

    ok(cli("train", "recipes/mini/speak.yaml", f"model.checkpoint={head}", *common, f"run_dir={tmp_path / 'speak'}"))
    final = tmp_path / "speak" / "final"
    trained_cfg = json.loads((final / "config.json").read_text())
    assert trained_cfg["trained"] == {"hearing": False, "speaking": True}  # hearing as it started: not trained here
    assert trained_cfg["audio_config"]["srh_token_scale"] == scale  # carried from the head's checkpoint
    assert trained_cfg["audio_config"]["speech_feedback"] is False
    assert trained_cfg["audio_config"]["speech_opener"] is True
    start, speak = read_state_dict(head), read_state_dict(final)
    moved = {k for k in start if not torch.equal(start[k], speak[k])}
    assert moved and all(k.startswith(("audio_invert_tower.", "audio_tower.embed_tokens.")) for k in moved)
    abos = trained_cfg["text_config"]["audio_bos_index"]  # the opener moved from where it started
    assert not torch.equal(speak["audio_tower.speech_opener"], start["language_model.model.embed_tokens.weight"][abos])
    rows = read_metrics(tmp_path / "speak")
    assert rows and all(r["speech_loss"] > 0 and r["text_loss"] > 0 for r in rows)  # both losses counted

    models = tmp_path / "models"
    ok(cli("assets", "mini-deltas", final, models, "--base", base))
    deltas, meta = mini_deltas.read(models)
    assert json.loads(meta["trained"]) == {"hearing": False, "speaking": True}
    width = yaml.safe_load(open("recipes/mini/speak_srh.yaml"))["model"]["srh_pending_units"]
    assert json.loads(meta["audio_config"]) == {"srh_token_scale": scale, "srh_pending_units": width,
                                                "speech_feedback": False, "speech_opener": True}  # the
    # settings the head was trained with (and the view's embeddings and the opener: they ship too)
    assert {"audio_invert_tower.pending_embed.weight", "audio_tower.speech_opener"} <= deltas.keys()
    assert any(k.startswith("audio_invert_tower.crq_transformer.") for k in deltas)
    ckpt = tmp_path / "mini"
    ok(cli("assets", "mini", ckpt, "--deltas", models, "--base", base))
    assert json.loads((ckpt / "detokenizer.json").read_text()) == {"kind": "piper-joe"}
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["audio_config"]["srh_token_scale"] == scale
    mini_cfg = read_config(ckpt)  # every mode gets the system prompt the records were trained under
    assert default_system("s2s", mini_cfg) == default_system("s2t", mini_cfg) == MINI_SYSTEM
    tok = TextTokenizer.from_file(ckpt / "tokenizer.json")  # and the generation defaults it ships (the loop stop,
    gen = generation_preset("s2s", tok, mini_cfg)          # the text lead)
    shipped = mini_deltas.MINI_GENERATION
    assert (gen.text_loop_stop, gen.text_lead) == (shipped["text_loop_stop"], shipped["text_lead"]) != (0, 0)
    assembled, trained = read_state_dict(ckpt), read_state_dict(final)
    for k in trained:
        torch.testing.assert_close(assembled[k], trained[k], rtol=0, atol=1e-5)


def test_speak_at_group_size_1(tmp_path):
    """The k = 1 line: speak_srh.yaml rebuilds the hearing model at group size 1 (a new pre_matching shape, every
    other tensor carried over) and trains its head (the DRSR comparison, recipes/mini/pipeline.sh K1=1)."""
    base = _untrained_base(tmp_path / "base")
    data = synthetic_s2s(tmp_path / "data", n=4)
    common = [f"data.train=[{data}]", *SHRINK, "data.max_len=512"]
    ok(cli("train", "recipes/mini/speak_srh.yaml", f"model.checkpoint={base}", *common, "model.group_size=1",
           f"run_dir={tmp_path / 'srh_k1'}"))
    head = tmp_path / "srh_k1" / "final"
    cfg = json.loads((head / "config.json").read_text())
    assert cfg["audio_config"]["group_size"] == 1
    assert cfg["trained"] == {"hearing": False, "speaking": True}  # the SRH alone trained: hearing stays untrained
    before, after = read_state_dict(base), read_state_dict(head)
    d = before["audio_invert_tower.pre_matching.weight"].shape[1]
    assert after["audio_invert_tower.pre_matching.weight"].shape == (d, d)  # one vector per LLM state (k=5: 5d)
    key = "continuous_audio_tower.layers.0.fc1.weight"  # not trained: carried over from the k=5 model
    torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    rows = read_metrics(tmp_path / "srh_k1")
    assert rows and all(r["speech_loss"] > 0 for r in rows)
    # the k=1 model is not the shipped shape: one clear error
    bad = cli("assets", "mini-deltas", head, tmp_path / "m", "--base", base)
    assert bad.returncode == 1 and "pre_matching" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("train", "recipes/mini/speak_srh.yaml", f"model.checkpoint={base}", *common, "model.group_size=0",
              f"run_dir={tmp_path / 'x'}")
    assert bad.returncode == 1 and "model.group_size" in bad.stderr and "Traceback" not in bad.stderr


def test_speech_embeddings_start_factorized_over_the_piper_vocabulary():
    """`model.speech_embeddings_at_start: piper-factorized`: every continue token is its start token plus one
    shared vector, every gain level one shared shift; the rows keep their scale; specials stay; a codebook smaller
    than the vocabulary is a clear error."""
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny(codebook=pt.VOCAB_SIZE + 8))
    model.init_weights(0.02)
    table = model.audio_tower.embed_tokens.weight
    before = table.detach().clone()
    loop._piper_factorized_speech_embeddings(model, seed=0)
    e = table.detach()
    codes = torch.arange(0, pt.VOCAB_SIZE, 2)
    mark = e[codes + 1] - e[codes]  # continue - start, for every unit and gain
    torch.testing.assert_close(mark, mark[:1].expand_as(mark), rtol=0, atol=1e-6)
    loud = e[2 * pt.NUM_UNITS: 4 * pt.NUM_UNITS] - e[: 2 * pt.NUM_UNITS]  # gain 1 - gain 0, same unit and mark
    torch.testing.assert_close(loud, loud[:1].expand_as(loud), rtol=0, atol=1e-6)
    assert e[:pt.VOCAB_SIZE].std().item() == pytest.approx(before[:pt.VOCAB_SIZE].std().item(), rel=0.2)
    assert torch.equal(e[pt.VOCAB_SIZE:], before[pt.VOCAB_SIZE:])
    assert not torch.equal(e[0], e[2])  # units differ
    with pytest.raises(ConfigError, match="smaller than the Piper vocabulary"):
        loop._piper_factorized_speech_embeddings(FunAudioChatModel(tiny()), seed=0)


def test_speak_srh_with_the_pending_units_view(tmp_path):
    """`model.srh_pending_units` gives the head the next units not yet started; training starts that view random
    and trains it; `load_runtime` generates with it, and a bare Engine without the view refuses it clearly."""
    from funaudiochat.engine.generate import Engine, GenerationConfig
    from funaudiochat.engine.loading import load_runtime
    from funaudiochat.engine.prompt import build_prompt
    from funaudiochat.model.checkpoint import load_model

    base = _untrained_base(tmp_path / "base")
    data = synthetic_s2s(tmp_path / "data", n=4)
    common = [f"data.train=[{data}]", *SHRINK]
    ok(cli("train", "recipes/mini/speak_srh.yaml", f"model.checkpoint={base}", *common, "model.srh_pending_units=3",
           f"run_dir={tmp_path / 'srh'}"))
    head = tmp_path / "srh" / "final"
    assert json.loads((head / "config.json").read_text())["audio_config"]["srh_pending_units"] == 3
    weights = read_state_dict(head)["audio_invert_tower.pending_embed.weight"]
    assert weights.shape[0] == 3 * (pt.NUM_UNITS + 1) and 0.3 < float(weights.std()) < 1.0
    rows = read_metrics(tmp_path / "srh")
    assert rows and all(r["speech_loss"] > 0 for r in rows)
    with pytest.raises(ConfigError, match="pending units"):
        Engine(load_model(head))  # without the view it needs
    runtime = load_runtime(head)  # builds the view from the checkpoint's tokenizer and the voice's phonemizer
    assert runtime.engine.pending_view.width == 3
    prompt = build_prompt(runtime.tokenizer, runtime.engine.cfg, [{"role": "user", "content": "Say something."}], [])
    out = runtime.engine.generate(prompt, GenerationConfig(max_new_tokens=6, force_text_abos=True,
                                                           eos_token_id=runtime.tokenizer.special.im_end,
                                                           pad_token_id=runtime.tokenizer.special.endoftext))
    assert len(out.speech_ids[0]) > 0
    bad = cli("train", "recipes/mini/speak_srh.yaml", f"model.checkpoint={base}", *common,
              "model.srh_pending_units=99", f"run_dir={tmp_path / 'x'}")
    assert bad.returncode == 1 and "model.srh_pending_units" in bad.stderr and "Traceback" not in bad.stderr


def test_speak_prosody_trains_only_its_projections_and_ships_them(tmp_path):
    """speak_prosody.yaml gives a speaking head the answer's cue and its prosody (both from zero) and trains those
    two projections only (the opener's own style projection stays at zero); the deltas ship them with the settings,
    and `assets mini` reassembles the trained checkpoint."""
    base = _untrained_base(tmp_path / "base")
    data = synthetic_s2s(tmp_path / "data", n=4)
    common = [f"data.train=[{data}]", *SHRINK]
    ok(cli("train", "recipes/mini/speak_srh.yaml", f"model.checkpoint={base}", *common, f"run_dir={tmp_path / 'srh'}"))
    head = tmp_path / "srh" / "final"
    ok(cli("train", "recipes/mini/speak_prosody.yaml", f"model.checkpoint={head}", *common,
           f"run_dir={tmp_path / 'prosody'}"))
    final = tmp_path / "prosody" / "final"
    settings = ("srh_answer_style", "srh_answer_cue", "srh_answer_prosody")
    assert all(json.loads((final / "config.json").read_text())["audio_config"][name] is True for name in settings)
    start, after = read_state_dict(head), read_state_dict(final)
    added = after.keys() - start.keys()
    assert added == {f"audio_invert_tower.{name}.weight" for name in ("answer_style", "answer_cue", "answer_prosody")}
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    assert not moved  # the head, the LLM and hearing are the start's
    assert not after["audio_invert_tower.answer_style.weight"].any()  # not trained: the style is the cue's alone
    assert after["audio_invert_tower.answer_cue.weight"].any() and after["audio_invert_tower.answer_prosody.weight"].any()

    models = tmp_path / "models"
    ok(cli("assets", "mini-deltas", final, models, "--base", base, "--stage", "speak_prosody"))
    deltas, meta = mini_deltas.read(models)
    assert all(json.loads(meta["audio_config"])[name] is True for name in settings)
    assert added <= deltas.keys()
    ckpt = tmp_path / "mini"
    ok(cli("assets", "mini", ckpt, "--deltas", models, "--base", base))
    assembled = read_state_dict(ckpt)
    for k in after:
        torch.testing.assert_close(assembled[k], after[k], rtol=0, atol=1e-5)


def test_hear_copy_trains_only_the_llm_adapters_on_the_readings_and_ships_them(tmp_path):
    """hear_copy.yaml polishes the release's LLM through a fresh LoRA on train_read.jsonl (ASR targets as the reader
    read them): the head, its projections and hearing stay as they were; the deltas ship the LLM's factors with the
    head's tensors, and `assets mini --stage`-checked assembly gives the trained checkpoint back."""
    from test_mini_pipeline import make_data

    from funaudiochat.model import lora

    base = _untrained_base(tmp_path / "base")
    data = make_data(tmp_path / "data") / "train.jsonl"
    common = [f"model.checkpoint={base}", f"data.train=[{data}]", *SHRINK, f"run_dir={tmp_path / 'copy'}"]
    bad = cli("train", "recipes/mini/hear_copy.yaml", *common)  # the recipe's slot rate needs a word reader
    assert bad.returncode == 1 and "has no word reader" in bad.stderr and "Traceback" not in bad.stderr
    ok(cli("train", "recipes/mini/hear_copy.yaml", *common, "model.reader_slot_rate=null"))  # this tiny model has none
    final = tmp_path / "copy" / "final"
    start, after = read_state_dict(base), read_state_dict(final)
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    assert moved and all(k.startswith(lora.LLM_PREFIX) for k in moved)  # the LLM alone, through its adapters
    rows = read_metrics(tmp_path / "copy")
    assert rows and all(r["text_loss"] > 0 for r in rows)

    models = tmp_path / "models"
    ok(cli("assets", "mini-deltas", final, models, "--base", base, "--stage", "hear_copy", "--bf16"))
    deltas, meta = mini_deltas.read(models)
    assert meta["stage"] == "hear_copy" and any(lora.is_adapter(k) for k in deltas)
    ckpt = tmp_path / "mini"
    ok(cli("assets", "mini", ckpt, "--deltas", models, "--base", base))
    assembled = read_state_dict(ckpt)
    for k in after:  # bf16 factors: the LLM within their rounding
        torch.testing.assert_close(assembled[k].float(), after[k].float(), rtol=0.02, atol=2e-3)
