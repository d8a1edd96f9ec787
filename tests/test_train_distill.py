"""Distillation in stage sft (recipe `distill`): a spoken record's typed twin, the teacher's targets matched to the
student's through packing, the KL it trains on, and a tiny run that brings the student's distribution to the
teacher's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_tokenizer, tiny_recipe, words, write_wav

from funaudiochat.errors import ConfigError
from funaudiochat.model import presets
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.text.tokenizer import AUDIO_TEMPLATE
from funaudiochat.train import loop
from funaudiochat.train.batching import Collator, DistillCollator
from funaudiochat.train.config import recipe_from_dict
from funaudiochat.train.data import DistillItem, SampleBuilder, load_records, typed_record
from funaudiochat.train.losses import distill_kl
from funaudiochat.train.metrics import read_metrics


def user_audio(wav, script: str, seconds: float) -> str:
    return json.dumps({"path": str(wav), "text": "", "token": "<|audio_pad|>" * int(seconds * 25),
                       "ref_text": script})


def spoken_records(folder, n: int = 6, seed: int = 0) -> list[dict]:
    """Spoken questions (tones) with their scripts and text answers, every third a two-turn follow-up, plus an ASR
    record after every question (no typed twin)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        wav = write_wav(folder / f"q{i}.wav", 0.6, seed=i, freq=220.0 + 40 * i)
        question, answer = words(rng.integers(30, 200, 4)), words(rng.integers(200, 400, int(rng.integers(2, 6))))
        messages = [{"role": "user", "content": AUDIO_TEMPLATE}, {"role": "assistant", "content": answer}]
        audio = [user_audio(wav, question, 0.6)]
        if i % 3 == 2:
            wav2 = write_wav(folder / f"q{i}b.wav", 0.4, seed=100 + i, freq=500.0)
            messages += [{"role": "user", "content": AUDIO_TEMPLATE}, {"role": "assistant", "content": words([41, 42])}]
            audio.append(user_audio(wav2, words([43, 44, 45]), 0.4))
        records.append({"task": "qa", "system": words([40]), "messages": messages, "audio": audio})
        records.append({"task": "asr", "system": words([40]), "audio": [user_audio(wav, question, 0.6)],
                        "messages": [{"role": "user", "content": AUDIO_TEMPLATE}, {"role": "assistant",
                                                                                  "content": question}]})
    return records


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_typed_record_writes_out_each_spoken_question_and_refuses_what_has_no_typed_twin(tmp_path):
    qa, asr = spoken_records(tmp_path, n=3)[4:6]
    typed = typed_record(qa)
    assert "audio" not in typed and typed["system"] == qa["system"]
    scripts = [json.loads(a)["ref_text"] for a in qa["audio"]]
    assert [m["content"] for m in typed["messages"]] == [scripts[0], qa["messages"][1]["content"], scripts[1],
                                                         qa["messages"][3]["content"]]
    assert typed_record(asr) is None  # the answer is the script itself
    no_script = {**qa, "audio": [json.dumps({**json.loads(a), "ref_text": ""}) for a in qa["audio"]]}
    assert typed_record(no_script) is None
    mixed = {**qa, "messages": [{"role": "user", "content": AUDIO_TEMPLATE + " and w41"}] + qa["messages"][1:]}
    assert typed_record(mixed) is None
    spoken_answer = {**qa, "messages": qa["messages"][:1] + [{"role": "assistant", "content": AUDIO_TEMPLATE}]}
    assert typed_record(spoken_answer) is None
    assert typed_record({"messages": [{"role": "user", "content": "w41"}, {"role": "assistant", "content": "w42"}]}) \
        is None  # nothing spoken


def test_packed_kl_equals_each_record_scored_alone(tmp_path):
    """The KL of a packed micro-batch (twins packed differently from their records, ASR records without twins)
    equals the sum of each record's KL computed from its own sample and twin alone."""
    tok = make_tiny_tokenizer(tmp_path / "tok.json")
    cfg = presets.tiny()
    torch.manual_seed(0)
    student, teacher = FunAudioChatModel(cfg), FunAudioChatModel(cfg)
    student.init_weights(0.02)
    teacher.init_weights(0.05)
    items, _ = load_records([write_jsonl(tmp_path / "d.jsonl", spoken_records(tmp_path))],
                            SampleBuilder(tok, cfg, 256).distill_item)
    assert sum(it.typed is not None for it in items) == 6 and len(items) == 12
    # typed students: each twin also a record of its own, in the same batch as its spoken record (so the teacher's
    # batch holds the same twin object twice)
    items += [DistillItem(it.typed, it.typed) for it in items[:6] if it.typed is not None]
    collate = Collator(cfg, 256, packing=True)

    def targets(model, batch, owners):
        trace: dict = {}
        with torch.no_grad():
            out = model(**batch.model_inputs("cpu"), text_logits="targets", speech=False, trace=trace)
        return out.text_logits, loop._target_owners(owners, trace["lm_labels"], cfg.ignore_index)

    batch = DistillCollator(collate)(items)
    assert batch.input_ids.shape[0] < len(items)  # packed
    kl, n = distill_kl(*targets(student, batch, batch.owners), *targets(teacher, batch.teacher, batch.teacher.owners))

    expect, count = 0.0, 0
    for it in items:
        if it.typed is None:
            continue
        s, t = collate([it.sample]), collate([it.typed])
        s_logits, _ = targets(student, s, s.owners)
        t_logits, _ = targets(teacher, t, t.owners)
        assert s_logits.shape == t_logits.shape
        p = F.log_softmax(t_logits, -1)
        expect += float((p.exp() * (p - F.log_softmax(s_logits, -1))).sum())
        count += len(s_logits)
    assert n == count and n > 0
    assert float(kl) == pytest.approx(expect, rel=1e-4)
    # a teacher that is the student, reading the same sample, gives no KL
    same, _ = distill_kl(*targets(student, batch, batch.owners), *targets(student, batch, batch.owners))
    assert abs(float(same)) < 1e-3


def mean_kl(model_dir, teacher_dir, data, tok) -> float:
    """KL(teacher || model) per matched text target over every record of `data`, the teacher reading the twins."""
    from funaudiochat.model.checkpoint import load_model

    model, teacher = load_model(model_dir), load_model(teacher_dir)
    items, _ = load_records([data], SampleBuilder(tok, model.cfg, 256).distill_item)
    batch = DistillCollator(Collator(model.cfg, 256, packing=True))(items)
    sides = []
    for m, b in ((model, batch), (teacher, batch.teacher)):
        trace: dict = {}
        with torch.no_grad():
            out = m(**b.model_inputs("cpu"), text_logits="targets", speech=False, trace=trace)
        sides += [out.text_logits, loop._target_owners(b.owners, trace["lm_labels"], m.cfg.ignore_index)]
    kl, n = distill_kl(*sides)
    return float(kl) / n


def test_distilled_run_brings_the_students_distribution_to_the_teachers(tmp_path, one_thread):
    """The same run with and without the teacher: the distilled student ends far closer to the teacher's
    next-token distributions (a teacher trained on other answers, so far from the targets the CE pulls to)."""
    data = write_jsonl(tmp_path / "d.jsonl", spoken_records(tmp_path))
    other = write_jsonl(tmp_path / "other.jsonl", spoken_records(tmp_path / "other", seed=1))
    runs = {"teacher": (other, {"train": {"steps": 20, "seed": 1}}),
            "plain": (data, {"train": {"steps": 16}}),
            "distilled": (data, {"train": {"steps": 16},
                                 "distill": {"teacher": str(tmp_path / "teacher" / "final"), "weight": 2.0}})}
    for name, (records, sections) in runs.items():
        recipe = tiny_recipe(tmp_path, records, **sections)
        recipe["run_dir"] = str(tmp_path / name)
        loop.run(recipe_from_dict(recipe))
    rows = read_metrics(tmp_path / "distilled")
    assert all(np.isfinite(r["distill_kl"]) and r["distill_kl"] >= 0 for r in rows)
    tok = make_tiny_tokenizer(tmp_path / "tok.json")
    plain, distilled = (mean_kl(tmp_path / name / "final", tmp_path / "teacher" / "final", data, tok)
                        for name in ("plain", "distilled"))
    assert distilled < 0.5 * plain, (plain, distilled)


def test_distill_recipes_are_checked(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", spoken_records(tmp_path, n=2))
    with pytest.raises(ConfigError, match="distill.weight"):
        recipe_from_dict(tiny_recipe(tmp_path, data, distill={"teacher": str(tmp_path), "weight": 0})).validate()
    with pytest.raises(ConfigError, match="stage sft option"):
        recipe_from_dict(tiny_recipe(tmp_path, data, "dpo", distill={"teacher": str(tmp_path)},
                                     data={"packing": False})).validate()
    with pytest.raises(ConfigError, match="distill.teacher: .*no checkpoint folder"):
        loop.run(recipe_from_dict(tiny_recipe(tmp_path, data, distill={"teacher": str(tmp_path / "none")})))
    asr_only = write_jsonl(tmp_path / "asr.jsonl", [r for r in spoken_records(tmp_path, n=4) if r["task"] == "asr"])
    teacher = tiny_recipe(tmp_path, asr_only, train={"steps": 1})
    teacher["run_dir"] = str(tmp_path / "t")
    loop.run(recipe_from_dict(teacher))
    with pytest.raises(ConfigError, match="none of the 4 records has a typed twin"):
        loop.run(recipe_from_dict(tiny_recipe(tmp_path, asr_only, distill={"teacher": str(tmp_path / "t" / "final")})))


def test_typed_students_read_each_twin_as_a_record_of_its_own(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", spoken_records(tmp_path))
    teacher = tiny_recipe(tmp_path, data, train={"steps": 1})
    teacher["run_dir"] = str(tmp_path / "t")
    loop.run(recipe_from_dict(teacher))
    counts = {}
    for typed in (False, True):
        recipe = tiny_recipe(tmp_path, data, distill={"teacher": str(tmp_path / "t" / "final"),
                                                      "typed_students": typed})
        recipe["run_dir"] = str(tmp_path / f"s{typed}")
        trainer = loop.Trainer(recipe_from_dict(recipe))
        trainer.setup()
        counts[typed] = len(trainer.items)
        if typed:
            own = trainer.items[12:]
            assert all(it.sample is it.typed and not it.sample.audios for it in own)
    assert counts == {False: 12, True: 18}

