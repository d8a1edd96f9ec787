"""Training stages on a made-up speech-to-speech task with a random tiny model: pre-alignment, Core-Cocktail
stage 1, merge, stage 2, multi-task DPO; recipes; LR schedule; exact resume after kill -9; plot."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_tiny_tokenizer, synthetic_pairs, synthetic_s2s, tiny_recipe

from funaudiochat.cli import main as cli_main
from funaudiochat.errors import ConfigError
from funaudiochat.model import presets
from funaudiochat.model.checkpoint import load_model, read_state_dict
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.train import loop
from funaudiochat.train.batching import Collator
from funaudiochat.train.config import OptimSection, load_recipe, recipe_from_dict, resolve_precision
from funaudiochat.train.data import SampleBuilder, load_records
from funaudiochat.train.losses import sequence_logps
from funaudiochat.train.metrics import read_metrics
from funaudiochat.train.optim import lr_at

REPO = Path(__file__).resolve().parents[1]


def train(tmp, name, data, stage="sft", **sections) -> Path:
    recipe = tiny_recipe(tmp, data, stage, **sections)
    recipe["run_dir"] = str(tmp / name)
    loop.run(recipe_from_dict(recipe))
    return tmp / name


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [row[key] for row in read_metrics(run_dir)]


def from_checkpoint(path: Path) -> dict:
    return {"checkpoint": str(path), "preset": None}


def pair_margins(model_dir: Path, pairs: Path, tok) -> torch.Tensor:
    """log p(chosen) - log p(rejected) (joint text + speech) of every training pair under a saved model."""
    model = load_model(model_dir)
    items, _ = load_records([pairs], SampleBuilder(tok, model.cfg, 256).pair)
    batch = Collator(model.cfg, 256, packing=False)([p.chosen for p in items] + [p.rejected for p in items])
    trace = {}
    with torch.no_grad():
        logps = sequence_logps(model(**batch.model_inputs("cpu"), trace=trace), trace, model.group_size)
    return logps[:len(items)] - logps[len(items):]


def test_recipe_stages_lower_loss_merge_exactly_and_dpo_raises_margin(tmp_path, one_thread):
    data = synthetic_s2s(tmp_path / "data", n=8)
    tok = make_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json")

    # pre-alignment: LLM frozen (bit for bit), encoder / adapter / SRH trained
    pre = train(tmp_path, "pre", data, train={"steps": 10, "frozen": ["language_model.*"]})
    torch.manual_seed(0)
    init = FunAudioChatModel(presets.tiny())
    init.init_weights(0.02)
    start, after = init.state_dict(), read_state_dict(pre / "final")
    llm = [k for k in after if k.startswith("language_model.")]
    assert llm and all(torch.equal(after[k], start[k]) for k in llm)
    for k in ("continuous_audio_tower.layers.0.fc1.weight", "audio_tower.output_matching.weight",
              "audio_invert_tower.crq_transformer.layers.0.mlp.up_proj.weight"):
        assert not torch.equal(after[k], start[k]), k
    pre_losses = losses(pre)
    assert sum(pre_losses[-3:]) < sum(pre_losses[:3]) - 0.3, pre_losses

    # Core-Cocktail stage 1 (full fine-tune), merge, stage 2 from the merged model
    s1 = train(tmp_path, "s1", data, model=from_checkpoint(pre / "final"), train={"steps": 10})
    assert sum(losses(s1)[-3:]) < sum(losses(s1)[:3]) - 0.5, losses(s1)
    assert cli_main(["merge", str(pre / "final"), str(s1 / "final"), str(tmp_path / "merged"), "--alpha", "0.3"]) == 0
    m0, m1, merged = (read_state_dict(p) for p in (pre / "final", s1 / "final", tmp_path / "merged"))
    assert merged.keys() == m1.keys()
    for k in merged:
        expect = 0.3 * m1[k] + (1 - 0.3) * m0[k] if k.startswith("language_model.") else m1[k]
        assert torch.equal(merged[k], expect), k
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    s2 = train(tmp_path, "s2", data, model=from_checkpoint(tmp_path / "merged"), train={"steps": 8},
               optim={"lr": 1e-3, "min_lr": 1e-4})
    assert sum(losses(s2)[-3:]) < sum(losses(s2)[:3]) - 0.1, losses(s2)

    # multi-task DPO against the frozen stage-2 model
    pairs = synthetic_pairs(tmp_path / "pairs", n=8)
    dpo = train(tmp_path, "dpo", pairs, stage="dpo", model=from_checkpoint(s2 / "final"), train={"steps": 8},
                optim={"lr": 1e-3, "min_lr": 1e-4}, dpo={"beta": 0.1})
    before, after = pair_margins(s2 / "final", pairs, tok), pair_margins(dpo / "final", pairs, tok)
    assert after.mean() > before.mean() + 1.0 and (after > before).float().mean() >= 0.75, (before, after)
    rows = read_metrics(dpo)
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at step 1
    assert rows[-1]["reward_margin"] > 0.1 and rows[-1]["loss"] < rows[0]["loss"]
    tasks = {k.split("/")[1] for r in rows for k in r if k.startswith("accuracy/")}
    assert tasks == {"robustness", "instruction_following", "audio_understanding", "empathy"}

    assert cli_main(["plot", str(dpo)]) == 0
    assert (dpo / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_kill_9_is_bit_exact(tmp_path):
    """A real subprocess killed with SIGKILL mid-run, then `--resume`d, ends with the uninterrupted run's weights."""
    data = synthetic_s2s(tmp_path / "data", n=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def recipe(name):
        r = tiny_recipe(tmp_path, data, train={"steps": 12, "deterministic": True}, checkpoint={"every": 2})
        r["run_dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        return path

    cmd = [sys.executable, "-m", "funaudiochat.cli", "train"]
    whole = subprocess.Popen(cmd + [str(recipe("whole"))], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    killed = recipe("killed")
    proc = subprocess.Popen(cmd + [str(killed)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed/checkpoints/step-4").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run ended before it could be killed"
    with pytest.raises(ConfigError, match="--resume"):
        loop.run(load_recipe(killed))
    subprocess.run(cmd + [str(killed), "--resume"], cwd=REPO, env=env, check=True, capture_output=True)
    assert whole.wait() == 0, whole.stderr.read()[-3000:]

    whole, resumed = read_state_dict(tmp_path / "whole/final"), read_state_dict(tmp_path / "killed/final")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == list(range(1, 13))
    assert sorted(p.name for p in (tmp_path / "killed/checkpoints").iterdir()) == ["step-10", "step-12"]


def test_recipes_parse_and_overrides_are_typed(tmp_path):
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.model.checkpoint, path
    r = load_recipe(REPO / "recipes" / "pre_align.yaml", ["optim.lr=1e-4", "train.steps=3", "data.train=x.jsonl"])
    assert r.optim.lr == 1e-4 and r.train.steps == 3 and r.data.train == ["x.jsonl"]
    assert r.train.frozen == ["language_model.*"]
    with pytest.raises(ConfigError) as err:
        load_recipe(REPO / "recipes" / "dpo.yaml", ["optim.lrr=1", "train.steps=many", "data.packing=true"])
    assert all(s in str(err.value) for s in ("optim.lrr: unknown key", "train.steps: expected an integer"))
    with pytest.raises(ConfigError, match="packing"):
        load_recipe(REPO / "recipes" / "dpo.yaml", ["data.packing=true"])
    with pytest.raises(ConfigError, match="fp32, bf16 or auto"):
        load_recipe(REPO / "recipes" / "dpo.yaml", ["train.precision=fp16"])
    data = synthetic_s2s(tmp_path / "d", n=4)
    with pytest.raises(ConfigError, match="match no parameter"):
        loop.run(recipe_from_dict(tiny_recipe(tmp_path, data, train={"frozen": ["llm.*"]})))


def test_precision_auto_is_bf16_where_the_cpu_computes_it_natively():
    """`train.precision: auto` (the mini's recipes) takes bf16 on a CPU whose flags name AMX or AVX-512 BF16, fp32
    elsewhere; fp32 and bf16 are kept as given."""
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), set())
    else:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    native = bool(flags & {"amx_tile", "avx512_bf16"})
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_lr_schedule_warmup_then_cosine_to_min():
    stage1 = OptimSection(lr=1e-4, min_lr=1e-5, warmup_steps=10)
    lrs = [lr_at(s, 100, stage1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert lrs[-1] == pytest.approx(1e-5) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[54] == pytest.approx(0.5 * (1e-4 + 1e-5), rel=0.02)
    assert lr_at(50, 100, OptimSection(lr=3.0, schedule="constant", warmup_ratio=0.1)) == 3.0



def test_lr_scale_trains_matching_parameters_at_a_multiple_of_the_rate(tmp_path, one_thread):
    """`optim.lr_scale`: groups by the first matching pattern (a tied tensor matches by any of its names), the
    scheduled rate times the factor in the loop; a pattern that matches nothing or a factor <= 0 is an error."""
    from funaudiochat.train.optim import build_optimizer, set_lr

    torch.manual_seed(0)
    model = FunAudioChatModel(presets.tiny())
    cfg = OptimSection(lr=1e-3, lr_scale={"audio_invert_tower.lm_head.*": 8, "audio_invert_tower.*": 4})
    opt = build_optimizer(model, cfg)
    set_lr(opt, 1e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.audio_tower.embed_tokens.weight)] == pytest.approx(8e-3)  # tied to the SRH's lm_head
    assert lr_of[id(model.audio_invert_tower.pre_matching.weight)] == pytest.approx(4e-3)
    assert lr_of[id(model.language_model.lm_head.weight)] == pytest.approx(1e-3)
    assert [g["weight_decay"] for g in build_optimizer(model, OptimSection(weight_decay=0.1)).param_groups] == [0.1, 0]
    with pytest.raises(ConfigError, match="pattern 'srh.x' matches no trainable parameter"):
        build_optimizer(model, OptimSection(lr_scale={"srh.x": 2}))
    data = synthetic_s2s(tmp_path / "data", n=4)
    with pytest.raises(ConfigError, match=r"optim.lr_scale\['x'\]: must be a finite number in \(0, inf\)"):
        recipe_from_dict(tiny_recipe(tmp_path, data, optim={"lr_scale": {"x": 0}}))
    # in the loop: a part at 1e-9 x the rate does not move while the rest trains
    start = train(tmp_path, "start", data, train={"steps": 1})
    run = train(tmp_path, "scaled", data, model=from_checkpoint(start / "final"), train={"steps": 2},
                optim={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "lr_scale": {"audio_invert_tower.*": 1e-9}})
    before, after = read_state_dict(start / "final"), read_state_dict(run / "final")
    key = "audio_invert_tower.pre_matching.weight"
    torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-7)
    assert not torch.equal(after["audio_tower.output_matching.weight"], before["audio_tower.output_matching.weight"])


def test_speech_embedding_grad_head_keeps_the_llm_loss_off_the_speech_embedding(tmp_path):
    """`train.speech_embedding_grad: head`: the speech embedding (tied to the SRH's output) gets no gradient from the
    text loss through the speech fed back to the LLM, and still gets the SRH's; "all" (released) gets both."""
    data = synthetic_s2s(tmp_path / "data", n=2)
    tok = make_tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = FunAudioChatModel(presets.tiny())
    items, _ = load_records([data], SampleBuilder(tok, model.cfg, 256).sample)
    inputs = Collator(model.cfg, 256, packing=False)(items).model_inputs("cpu")
    table = model.audio_tower.embed_tokens.weight

    def grad_norm(loss_name: str, head_only: bool) -> float:
        model.zero_grad()
        model.audio_tower.detach_fed_back_speech = head_only
        getattr(model(**inputs), loss_name).backward()
        return 0.0 if table.grad is None else float(table.grad.norm())

    assert grad_norm("text_loss", head_only=False) > 0
    assert grad_norm("text_loss", head_only=True) == 0.0
    assert grad_norm("speech_loss", head_only=True) > 0
    with pytest.raises(ConfigError, match="train.speech_embedding_grad"):
        recipe_from_dict(tiny_recipe(tmp_path, data, train={"speech_embedding_grad": "llm"}))


def test_speech_feedback_off_the_llm_reads_its_text_alone(tmp_path):
    """`audio_config.speech_feedback` false: at the assistant's speech positions the LLM reads the text id alone, at
    full scale, so other speech codes leave its text logits unchanged (on, as released, they move them); user audio
    still enters as before, and a decode step's input is the text embedding whether or not the row fuses."""
    from funaudiochat.engine.compiled import step_input

    data = synthetic_s2s(tmp_path / "data", n=2)
    tok = make_tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = FunAudioChatModel(presets.tiny()).eval()
    items, _ = load_records([data], SampleBuilder(tok, model.cfg, 256).sample)
    inputs = Collator(model.cfg, 256, packing=False)(items).model_inputs("cpu")
    answers = inputs["text_attention_mask"]  # the audio rows that carry text: the spoken answers
    other = dict(inputs, speech_ids=torch.where(answers[:, None] & (inputs["speech_ids"] < 290),
                                                (inputs["speech_ids"] + 101) % 290, inputs["speech_ids"]))
    other_user = dict(inputs, input_features=inputs["input_features"].flip(-1))

    def text_logits(batch, feedback: bool) -> torch.Tensor:
        model.cfg.audio_config.speech_feedback = feedback
        with torch.no_grad():
            return model(**batch).text_logits

    assert not torch.equal(text_logits(inputs, True), text_logits(other, True))
    torch.testing.assert_close(text_logits(inputs, False), text_logits(other, False), rtol=0, atol=0)
    assert not torch.equal(text_logits(inputs, False), text_logits(other_user, False))  # the user is still heard

    token, group = torch.tensor([5, 6]), torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    fuse = torch.tensor([True, False])
    text_embed = model.language_model.embed(token)[:, None]
    x, _ = step_input(model, token, group, fuse)
    torch.testing.assert_close(x, text_embed, rtol=0, atol=0)
    model.cfg.audio_config.speech_feedback = True
    x, _ = step_input(model, token, group, fuse)
    assert not torch.equal(x[0], text_embed[0]) and torch.equal(x[1], text_embed[1])
    with pytest.raises(ConfigError, match="model.speech_feedback"):
        recipe_from_dict(tiny_recipe(tmp_path, data, model={"preset": "tiny", "speech_feedback": "no"}))


def tiny_s2s_batch(tmp, codebook: int = 300, **audio_settings) -> tuple[FunAudioChatModel, dict]:
    """A random tiny model with these `audio_config` settings, and a batch of two made-up S2S records."""
    data = synthetic_s2s(tmp / "data", n=2)
    tok = make_tiny_tokenizer(tmp / "tok")
    cfg = presets.tiny(codebook=codebook)
    for name, value in audio_settings.items():
        setattr(cfg.audio_config, name, value)
    torch.manual_seed(0)
    model = FunAudioChatModel(cfg).eval()
    items, _ = load_records([data], SampleBuilder(tok, model.cfg, 256).sample)
    return model, Collator(model.cfg, 256, packing=False)(items).model_inputs("cpu")


def test_speech_opener_is_read_at_the_assistants_audio_bos_only(tmp_path):
    """`audio_config.speech_opener`: the LLM reads the learned vector at the `<|audio_bos|>` that opens the
    assistant's speech, in training and in both decode paths; the user audio's `<|audio_bos|>` and every position
    before the answer read as before."""
    from funaudiochat.engine.compiled import step_input

    model, inputs = tiny_s2s_batch(tmp_path, speech_opener=True)
    cfg = model.cfg
    ids, abos = inputs["input_ids"], cfg.text_config.audio_bos_index
    slots = ids == cfg.audio_token_index
    with torch.no_grad():
        model.audio_tower.speech_opener.copy_(model.language_model.embed(torch.tensor(abos)))
        same = model(**inputs).text_logits
        model.audio_tower.speech_opener.normal_()
        moved = model(**inputs).text_logits
    for row in range(ids.shape[0]):
        bos = (ids[row] == abos).nonzero().flatten().tolist()
        user, answer = [p for p in bos if slots[row, p + 1]][:2]  # the user's audio, then the assistant's speech
        torch.testing.assert_close(moved[row, :answer], same[row, :answer], rtol=0, atol=0)
        assert not torch.allclose(moved[row, answer:], same[row, answer:])

    prompt = torch.tensor([[1, abos, cfg.audio_token_index, 2, abos]])
    assert model.prompt_openers(prompt).tolist() == [[False, False, False, False, True]]
    x, text_embed = step_input(model, torch.tensor([abos, 5]), None, torch.tensor([False, False]))
    torch.testing.assert_close(x[0, 0], model.audio_tower.speech_opener, rtol=0, atol=0)
    torch.testing.assert_close(x[1], model.language_model.embed(torch.tensor([5])), rtol=0, atol=0)
    assert torch.equal(x, text_embed)  # the SRH's text input reads the opener too


def _head_input(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The SRH's input and the LLM's last hidden states of a training forward."""
    trace = {}
    with torch.no_grad():
        model(**inputs, trace=trace)
    return trace["crq_inputs_embeds"], trace["lm_last_hidden"]


def _spoken_answer(ids: torch.Tensor, cfg) -> tuple[int, int]:
    """(opener, <|audio_eos|>) positions of the assistant's spoken answer in a record's ids [L] (the user's audio
    opens first)."""
    slots, t = ids == cfg.audio_token_index, cfg.text_config
    opener = [p for p in (ids == t.audio_bos_index).nonzero().flatten().tolist() if slots[p + 1]][1]
    return opener, int((ids == t.audio_eos_index).nonzero().flatten()[-1])


def test_the_answer_style_spans_each_spoken_answer_in_training_and_in_every_decode_split(tmp_path):
    """`audio_config.srh_answer_style`: in training the head's input gains the projected LLM state at the answer's
    opener from that opener up to its <|audio_eos|>, nothing elsewhere; the same function computed in pieces with
    the style carried between them (prefill chunks, then one decode position at a time) gives the same styles."""
    model, inputs = tiny_s2s_batch(tmp_path, srh_answer_style=True)
    cfg, head = model.cfg, model.audio_invert_tower
    assert not head.answer_style.weight.any()  # a new style starts at zero: the head is unchanged
    ids, t = inputs["input_ids"], cfg.text_config

    plain, hidden = _head_input(model, inputs)
    with torch.no_grad():
        head.answer_style.weight.normal_()
    styled, _ = _head_input(model, inputs)
    added = styled - plain
    for row in range(ids.shape[0]):
        opener, close = _spoken_answer(ids[row], cfg)
        assert opener < close
        expected = head.answer_style(hidden[row, opener]).detach()
        torch.testing.assert_close(added[row, opener:close], expected.expand(close - opener, -1))
        assert not added[row, :opener].any() and not added[row, close:].any()

    opens = model.prompt_openers(torch.tensor([[1, t.audio_bos_index, 7, 8, t.audio_eos_index, 9, t.audio_bos_index,
                                                3]]))
    closes = torch.zeros_like(opens)
    closes[0, 4] = True
    states = torch.randn(1, 8, cfg.text_config.hidden_size)
    with torch.no_grad():
        whole, last = head.answer_styles(states, opens, closes)
        assert whole[0, 1:4].abs().sum() > 0 and not whole[0, [0, 4, 5]].any()
        carried, pieces = torch.zeros(1, states.shape[-1]), []
        for a, b in ((0, 3), (3, 4), (4, 7), (7, 8)):  # a prefill in chunks, then one position at a time
            styles, carried = head.answer_styles(states[:, a:b], opens[:, a:b], closes[:, a:b], carried)
            pieces.append(styles)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)  # (matmul shapes differ)
    torch.testing.assert_close(carried, last, rtol=1e-5, atol=1e-5)


def test_a_new_speech_opener_starts_as_audio_bos_and_trains_alone(tmp_path, one_thread):
    """`model.speech_opener: true` on a checkpoint without one: the run starts from <|audio_bos|>'s embedding (the
    model's function unchanged), trains the opener alone when it is the only trainable part, and the export keeps
    it; `train.text_stream_targets: text` trains a spoken answer's text stream as a text answer: its text, then the
    end of turn where the text ends, and nothing after (the engine writes <|sil|> and <|audio_eos|> itself)."""
    data = synthetic_s2s(tmp_path / "data", n=4)
    start = train(tmp_path, "start", data, train={"steps": 1})
    recipe = tiny_recipe(tmp_path, data, model={**from_checkpoint(start / "final"), "speech_opener": True},
                         train={"steps": 3, "trainable": ["audio_tower.speech_opener"], "text_stream_targets": "text"})
    recipe["run_dir"] = str(tmp_path / "opener")
    trainer = loop.Trainer(recipe_from_dict(recipe))
    try:
        trainer.setup()
        model, cfg = trainer.model, trainer.model.cfg
        t, ign = cfg.text_config, -100
        first = model.audio_tower.speech_opener.detach().clone()
        torch.testing.assert_close(first, model.language_model.embed(torch.tensor(t.audio_bos_index)).detach(),
                                   rtol=0, atol=0)
        items, _ = load_records([data], SampleBuilder(trainer.tokenizer, cfg, 256).sample)
        batch = Collator(cfg, 256, packing=False)(items).model_inputs("cpu")

        def labels(targets: str) -> torch.Tensor:
            model.text_stream_targets, trace = targets, {}
            with torch.no_grad():
                model(**batch, trace=trace)
            return trace["lm_labels"]

        released, text = labels("released"), labels("text")
        for row in range(released.shape[0]):
            sil = (released[row] == t.sil_index).nonzero().flatten()
            end = int(sil[0]) if len(sil) else int((released[row] == t.audio_eos_index).nonzero()[0])
            assert text[row, end] == t.eos_token_id  # the text ends where its padding starts
            torch.testing.assert_close(text[row, :end], released[row, :end], rtol=0, atol=0)  # prompt, text as before
            after = text[row, end + 1:]
            answer_end = int((released[row, end:] == trainer.tokenizer.special.im_end).nonzero()[0]) + end
            assert (after[:answer_end - end] == ign).all()  # <|sil|> x n, <|audio_eos|>, the turn's end: untrained
        model.text_stream_targets = "text"
        trainer.train()
    finally:
        trainer.cleanup()
    trained = read_state_dict(tmp_path / "opener" / "final")
    before = read_state_dict(start / "final")
    assert not torch.equal(trained["audio_tower.speech_opener"], first)
    assert all(torch.equal(trained[k], v) for k, v in before.items())  # nothing else moved
    assert load_model(tmp_path / "opener" / "final").cfg.audio_config.speech_opener


def test_recipe_srh_token_scale_applies_to_the_loaded_model(tmp_path, one_thread):
    """`model.srh_token_scale` on a checkpoint trained at another scale: the model the run trains uses the recipe's
    (it once kept the checkpoint's while recording the recipe's in its config)."""
    data = synthetic_s2s(tmp_path / "data", n=4)
    start = train(tmp_path, "start", data, train={"steps": 1})
    recipe = tiny_recipe(tmp_path, data, model={**from_checkpoint(start / "final"), "srh_token_scale": 7},
                         train={"steps": 1})
    recipe["run_dir"] = str(tmp_path / "scaled")
    trainer = loop.Trainer(recipe_from_dict(recipe))
    try:
        trainer.setup()
        assert trainer.model.audio_invert_tower.token_scale == 7
        trainer.train()
    finally:
        trainer.cleanup()
    assert load_model(tmp_path / "scaled" / "final").audio_invert_tower.token_scale == 7


def test_the_answer_cue_is_the_mean_of_the_users_last_words_and_carries_through_pieces(tmp_path):
    """`audio_config.srh_answer_cue`: an answer's style also gains the projected mean input embedding of the text
    from the user audio's <|audio_eos|> up to the answer's opener (its audio slots and padding not counted); the
    running cue computed in pieces with its sum carried equals the whole."""
    model, inputs = tiny_s2s_batch(tmp_path, srh_answer_style=True, srh_answer_cue=True)
    cfg, head = model.cfg, model.audio_invert_tower
    assert not head.answer_cue.weight.any()  # a new cue starts at zero: the head is unchanged
    ids, t = inputs["input_ids"], cfg.text_config

    with torch.no_grad():
        head.answer_style.weight.normal_()
    plain, hidden = _head_input(model, inputs)
    with torch.no_grad():
        head.answer_cue.weight.normal_()
    added = _head_input(model, inputs)[0] - plain
    words = model.language_model.embed(ids)
    slots = ids == cfg.audio_token_index
    for row in range(ids.shape[0]):
        opener, close = _spoken_answer(ids[row], cfg)
        user_eos = max(p for p in (ids[row] == t.audio_eos_index).nonzero().flatten().tolist() if p < opener)
        span = [p for p in range(user_eos, opener + 1) if not slots[row, p]]
        expected = head.answer_cue(words[row, span].mean(0)).detach()
        torch.testing.assert_close(added[row, opener:close], expected.expand(close - opener, -1),
                                   rtol=1e-4, atol=1e-4)
        assert not added[row, :opener].any() and not added[row, close:].any()

    resets = ids == t.audio_eos_index
    with torch.no_grad():
        whole, last = model._running_cue(ids, resets, None, None)
        carried, pieces = None, []
        for a, b in ((0, 5), (5, 6), (6, ids.shape[1] - 3), (ids.shape[1] - 3, ids.shape[1])):
            cues, carried = model._running_cue(ids[:, a:b], resets[:, a:b], None, carried)
            pieces.append(cues)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(carried, last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.answer_cue_after(ids), last)


def test_the_answer_prosody_biases_unit_starts_and_loudness_levels_by_the_style_in_force(tmp_path):
    """`audio_config.srh_answer_prosody`: inside a spoken answer, the head's logits at the 5 fine positions of each
    LLM position gain the projected style in force: its rate bias on every Piper token that starts a unit, its
    level's bias (times `srh_level_scale`) on every Piper token of that loudness; nothing on the specials, nothing
    outside the answer. `srh_speedup_scale` multiplies the rate bias where it is positive only."""
    from funaudiochat.speech.piper_tokens import GAINS, NUM_UNITS, VOCAB_SIZE

    model, inputs = tiny_s2s_batch(tmp_path, codebook=VOCAB_SIZE + 8, srh_answer_style=True, srh_answer_prosody=True)
    cfg, head, k = model.cfg, model.audio_invert_tower, model.group_size
    assert not head.answer_prosody.weight.any()  # a new prosody starts at zero: the head is unchanged
    with torch.no_grad():
        head.answer_style.weight.normal_()
        plain = model(**inputs).speech_logits
        head.answer_prosody.weight.normal_()
        added = model(**inputs).speech_logits - plain
        head.level_scale = 2.0  # config srh_level_scale: the levels' biases doubled, the rate's as learned
        doubled = model(**inputs).speech_logits - plain
        head.speedup_scale = 1.5  # config srh_speedup_scale: a positive rate bias x1.5, a negative one as learned
        sped = model(**inputs).speech_logits - plain
        head.answer_prosody.weight[0].neg_()  # the rate bias of the other sign
        sped_other = model(**inputs).speech_logits - plain
        head.answer_prosody.weight[0].neg_()  # (back: the rate read below is the first one)
    hidden = _head_input(model, inputs)[1]
    ids = inputs["input_ids"]
    codes = torch.arange(VOCAB_SIZE + 8)
    level = (codes // (2 * NUM_UNITS)).clamp(max=len(GAINS) - 1)
    for row in range(ids.shape[0]):
        opener, close = _spoken_answer(ids[row], cfg)
        rate, *levels = head.answer_prosody(head.answer_style(hidden[row, opener])).tolist()
        speedup = [(rate * 1.5 if rate > 0 else rate), (-rate * 1.5 if rate < 0 else -rate)]
        for scale, rate_bias, got in ((1.0, rate, added), (2.0, rate, doubled), (2.0, speedup[0], sped),
                                      (2.0, speedup[1], sped_other)):
            expected = scale * torch.tensor(levels)[level] + rate_bias * (codes % 2 == 0)
            expected[VOCAB_SIZE:] = 0.0
            torch.testing.assert_close(got[row, k * opener:k * close], expected.expand(k * (close - opener), -1),
                                       rtol=1e-4, atol=1e-4)
        assert abs(rate) > 1e-3 and len({round(x, 4) for x in levels}) == len(GAINS)  # a real test of each part
        assert not added[row, :k * opener].any() and not added[row, k * close:].any()
