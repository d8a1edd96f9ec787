"""Spoken answers for fun-audio-chat-mini's S2S training data (issue 14 item 2): a text answer record -> the same
record with every assistant answer spoken in the mini's voice, as 25 Hz Piper tokens aligned to the text stream.

The record format is the released sharegpt one (train/data.py, SPEC §8.1) that `build_mini.training_record` writes:
an assistant answer becomes `<|audio_bos|><|AUDIO|><|audio_eos|>` with the audio entry
{"path": "", "text": answer, "token": "<|audio_bos|>" x 10 + "[AU####]"..., ...}. The training forward then lays
the answer's text ids along the speech groups (SPEC §6.4): text token i rides on group i, the speech lags by the
10-token (2-group) delay, `<|sil|>` pads the text once it has ended, and text beyond the last group would be cut.
So the speech is made long enough to carry the whole text: when an answer has more text tokens than groups (a fast
variant of a short, number-heavy answer), its final silence (the last "$" unit) is held longer.

Two layouts of the text along the speech (`LAYOUTS`):
- "released" (the default): the one above, text token i on group i; the text runs ahead of the speech by up to
  seconds, and the head has to find the word being spoken in the LLM's history.
- "word": each written word's first text token rides `WORD_LEAD` groups before the group its speech starts in, its
  other tokens on the groups after, `<|sil|>` in between. The entry's "text_at" gives, for each text id, the first
  speech token of its group (the delay counted), so the record serves any group size. The text still leads and
  `<|sil|>` still pads; only where it pads changes, so the format, the training forward and generation are the
  released ones. docs/mini.md ("Where the text rides") has the measurement: about 0.1 nats on start tokens.

Speech instructions (`INSTRUCTIONS`): "slower" / "faster" / "louder" / "quieter" are appended to the last user turn
and realised in its answer's tokens through the voice's durations (`speed`) and the tokens' gain level.

    piper = PiperTokenizer()
    for variant in (None, "slower", "louder"):
        out = speak_record(record, piper, text_tokenizer, instruction=variant)
"""
from __future__ import annotations

import bisect
import json
import re
import zlib
from difflib import SequenceMatcher

import numpy as np

from funaudiochat.errors import InputError
from funaudiochat.speech.piper_tokens import EOS, NUM_UNITS, UNITS, sound_starts
from funaudiochat.text.tokenizer import AUDIO_TEMPLATE
from funaudiochat.train.data import SPEECH_DELAY, assistant_token_string, audio_entries

GROUP = 5  # speech tokens per LLM step (the mini's group size)
LAYOUTS = ("released", "word")
WORD_LEAD = 2  # layout "word": groups between a word's first text token and the group its speech starts in
# instruction -> (phrasings appended to the question, how the answer is spoken). The voice's durations follow
# `speed` sublinearly (answers of 36-78 tokens: speed 0.7 -> x1.28-1.36 tokens, 0.6 -> x1.47-1.55; 1.4 -> x0.77-0.80,
# 1.5 / 1.6 -> ~x0.7), so 0.6 / 1.5 leave a margin over the >= 20 % rate change issue 14 asks for.
INSTRUCTIONS = {
    "slower": (("Please say it slowly.", "Answer slowly, please."), {"speed": 0.6}),
    "faster": (("Please say it quickly.", "Answer quickly, please."), {"speed": 1.5}),
    "louder": (("Please say it louder.", "Answer loudly, please."), {"gain": "loud"}),
    "quieter": (("Please say it quietly.", "Answer quietly, please."), {"gain": "quiet"}),
}


def groups_of(n_codes: int, delay: int = SPEECH_DELAY, k: int = GROUP) -> int:
    """LLM positions (`<|AUDIO|>` groups) of an assistant answer of `n_codes` speech tokens after the delay."""
    return -(-(delay + n_codes) // k)


def fit_text(codes: list[int], n_text: int, delay: int = SPEECH_DELAY, k: int = GROUP) -> list[int]:
    """`codes` held long enough for `n_text` text tokens to ride on its groups (one per group, SPEC §6.4): the final
    "$" unit (the sentence's closing silence) is continued as needed. Codes that already fit come back unchanged."""
    missing = max(0, n_text * k - delay - len(codes))
    if missing and (not codes or UNITS[(codes[-1] // 2) % NUM_UNITS] != EOS):
        raise InputError("speech tokens must end with the sentence end unit \"$\" to be lengthened")
    return list(codes) + [codes[-1] | 1] * missing  # bit 0 set: a later frame of the same unit, same gain


def word_groups(answer: str, codes: list[int], piper, text_tokenizer, lead: int = WORD_LEAD,
                delay: int = SPEECH_DELAY, k: int = GROUP) -> list[int]:
    """Layout "word": the group (0 = the first `<|AUDIO|>` of the answer) each text id of `answer` rides on. A
    written word's first id goes `lead` groups before the group its speech starts in, its later ids on the groups
    after; every id at least one group after the one before, the first on group 0 (generation starts the text at
    once). Where a word's speech starts: its phonemes said alone, matched against what `codes` say
    (`sound_starts`, after the `delay`); a word matched nowhere starts where the word before it did."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", answer)]
    said, char_token = sound_starts(codes)
    if not words or not said:
        raise InputError(f"nothing spoken to align the text with in {answer[:60]!r}")
    word_sounds = piper.word_sounds([answer[a:b] for a, b in words])
    owner = [w for w, chars in enumerate(word_sounds) for _ in chars]
    word_token = [None] * len(words)
    for a, b, n in SequenceMatcher(None, "".join(word_sounds), said, autojunk=False).get_matching_blocks():
        for j in range(n):
            if word_token[owner[a + j]] is None:
                word_token[owner[a + j]] = char_token[b + j]
    word_token = np.maximum.accumulate([t if t is not None else -1 for t in word_token]).clip(min=char_token[0])
    ends = [b for _, b in words]
    groups, last_word = [], None
    for i, (a, b) in enumerate(text_tokenizer.offsets(answer)):
        char = a + len(answer[a:b]) - len(answer[a:b].lstrip())  # a leading space belongs to no word
        w = min(bisect.bisect_right(ends, char), len(words) - 1)
        wanted = (delay + int(word_token[w])) // k - lead if w != last_word else 0
        groups.append(0 if i == 0 else max(groups[-1] + 1, wanted))
        last_word = w
    return groups


def spoken_entry(answer: str, piper, text_tokenizer, speed: float = 1.0, gain: str = "normal",
                 delay: int = SPEECH_DELAY, k: int = GROUP, layout: str = "released") -> dict:
    """An answer -> its assistant audio entry (released format), the text fitted to the speech groups."""
    if layout not in LAYOUTS:
        raise InputError(f"unknown text layout {layout!r}; known: {', '.join(LAYOUTS)}")
    codes = piper.tokenize(answer, speed, gain)
    entry = {"path": "", "text": answer, "ref_path": "", "ref_text": ""}
    if layout == "word":
        groups = word_groups(answer, codes, piper, text_tokenizer, delay=delay, k=k)
        entry["text_at"] = [g * k for g in groups]
        n_text = groups[-1] + 1
    else:
        n_text = len(text_tokenizer.encode(answer))
    return {**entry, "token": assistant_token_string(fit_text(codes, n_text, delay, k), delay)}


def speak_record(record: dict, piper, text_tokenizer, instruction: str | None = None,
                 delay: int = SPEECH_DELAY, k: int = GROUP, layout: str = "released") -> dict:
    """A sharegpt record with text answers -> the S2S record: every assistant text answer spoken (`spoken_entry`);
    with `instruction` (a key of INSTRUCTIONS) its phrasing is appended to the last user turn and the last answer
    is spoken accordingly. The id gets ".<instruction>" and meta.speech says how each answer was spoken; the system
    prompt stays the text record's (the assistant's `<|audio_bos|>` marks the spoken answer)."""
    if instruction is not None and instruction not in INSTRUCTIONS:
        raise InputError(f"unknown speech instruction {instruction!r}; known: {', '.join(INSTRUCTIONS)}")
    messages, entries = record["messages"], iter(audio_entries(record))
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last_answer < last_user:
        raise InputError(f"record {record.get('id')}: no assistant answer after the last user turn")
    phrasings, how = INSTRUCTIONS.get(instruction, ((), {}))
    out_messages, out_audio, spoken = [], [], []
    for i, m in enumerate(messages):
        content = m["content"]
        out_audio += [next(entries) for _ in range(content.count(AUDIO_TEMPLATE))]
        if m["role"] == "user" and i == last_user and instruction is not None:
            key = zlib.crc32(f"{record.get('id')}|{instruction}".encode())  # the same phrasing on every run
            content = f"{content}\n{phrasings[key % len(phrasings)]}"
        elif m["role"] == "assistant" and AUDIO_TEMPLATE not in content:
            style = how if i == last_answer else {}
            out_audio.append(spoken_entry(content, piper, text_tokenizer, delay=delay, k=k, layout=layout,
                                           **style))
            spoken.append({"speed": style.get("speed", 1.0), "gain": style.get("gain", "normal")})
            content = AUDIO_TEMPLATE
        out_messages.append({**m, "content": content})
    if not spoken:
        raise InputError(f"record {record.get('id')}: no text answer to speak")
    meta = {**record.get("meta", {}), "speech": spoken, "speech_instruction": instruction}
    out = {**record, "messages": out_messages, "meta": meta,
           "audio": [json.dumps(e, ensure_ascii=False, sort_keys=True) for e in out_audio]}
    out.pop("audios", None)  # (the entries now live under "audio")
    if instruction is not None and "id" in record:
        out["id"] = f"{record['id']}.{instruction}"
    return out
