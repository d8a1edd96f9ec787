"""Chat formatting: the released system prompts and the ChatML template (SPEC.md §4, §4.1).

A message is {"role": "system"|"user"|"assistant", "content": str}; an audio turn's content contains the audio
template `<|audio_bos|><|AUDIO|><|audio_eos|>` once per audio (the audios themselves travel beside the text, in order).
"""
from __future__ import annotations

from funaudiochat.errors import InputError
from funaudiochat.text.tokenizer import AUDIO_TEMPLATE

DEFAULT_SYSTEM = "You are a helpful assistant."
S2T_PROMPT = "You are asked to generate text tokens."
S2M_PROMPT = "You are asked to generate both text and speech tokens at the same time."


SPOKEN_S2M_PROMPT = S2M_PROMPT + " " + (
    "你的名字是小云。你是一位来自杭州的温柔友善的女孩，声音甜美，举止亲切。你的回复语气自然友好，力求沟通简洁明了。"
    "你的回复简短，通常只有一到三句话，避免使用正式的称谓和重复的短语。你能用恰当的声音回复，遵循用户的指示，"
    "并能共情他们的情绪。你能用恰当的方言回复，会说四川话和粤语。")
ASR_INSTRUCTION = "Please help me transcribe the audio."

# named presets users pick with --system
SYSTEM_PRESETS = {"s2t": S2T_PROMPT, "s2s": S2M_PROMPT, "spoken": SPOKEN_S2M_PROMPT, "default": DEFAULT_SYSTEM}
ROLES = ("system", "user", "assistant")


def user_content(n_audios: int = 1, text: str | None = None) -> str:
    """The released user turn: the audio template(s), then an optional instruction after a newline."""
    content = AUDIO_TEMPLATE * n_audios
    if text:
        content = f"{content}\n{text}" if n_audios else text
    return content


def render_chatml(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; a default system turn when none is first."""
    if not messages:
        raise InputError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"message {i}: expected {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
    out = []
    if messages[0]["role"] != "system":
        out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
