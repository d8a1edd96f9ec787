"""A Hugging Face `tokenizer.json` from a GGUF file's tokenizer metadata (byte-level BPE, `tokenizer.ggml.model`
= "gpt2"), plus Fun-Audio-Chat's audio special tokens.

- vocabulary: `tokenizer.ggml.tokens` (already written in GPT-2's byte-to-unicode alphabet), id = position;
- merges: `tokenizer.ggml.merges` ("left right" strings, best first);
- tokens of type CONTROL (3), e.g. `<|im_start|>`, become special added tokens so text containing them encodes
  to their single ids; USER_DEFINED (4) tokens become plain added tokens;
- pre-tokenisation follows llama.cpp's `tokenizer.ggml.pre`: "smollm" (also starcoder, refact, ...) isolates
  every digit, then applies GPT-2's split; "gpt2" is GPT-2's split alone. (transformers' GGUF loader, 5.24, has no
  "smollm" entry and uses GPT-2's split only; SmolLM2's vocabulary has no multi-digit tokens, so ids agree.)

The audio specials are appended after the vocabulary (ids V .. V+4), in the order of `AUDIO_SPECIALS`.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from funaudiochat import fileio
from funaudiochat.assets.gguf_file import GGUFFile
from funaudiochat.errors import CheckpointError
from funaudiochat.text.tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, AUDIO_PAD, SIL

AUDIO_SPECIALS = (AUDIO, AUDIO_BOS, AUDIO_EOS, AUDIO_PAD, SIL)
_CONTROL, _USER_DEFINED = 3, 4
# llama.cpp pre-tokenizer types whose first step isolates each digit (llama-vocab.cpp)
_DIGIT_SPLIT = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


def _pre_tokenizer(kind: str, source: Path):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if kind in _DIGIT_SPLIT:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level])
    if kind == "gpt2":
        return byte_level
    raise CheckpointError(f"{source}: tokenizer.ggml.pre = {kind!r} is not supported (supported: gpt2, "
                          f"{', '.join(_DIGIT_SPLIT)})")


def tokenizer_from_gguf(gguf: GGUFFile, extra_specials: tuple[str, ...] = AUDIO_SPECIALS) -> Tokenizer:
    """The GGUF's byte-level BPE tokenizer, with `extra_specials` appended as special tokens."""
    kind = gguf.meta("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{gguf.path}: tokenizer.ggml.model = {kind!r}; only byte-level BPE ('gpt2') is "
                              f"supported")
    tokens = gguf.meta("tokenizer.ggml.tokens")
    types = gguf.metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in gguf.meta("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{gguf.path}: the vocabulary has duplicate tokens")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = _pre_tokenizer(gguf.meta("tokenizer.ggml.pre"), gguf.path)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind_ in zip(tokens, types) if kind_ == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, kind_ in zip(tokens, types) if kind_ == _USER_DEFINED])
    for token in extra_specials:
        if tk.token_to_id(token) is not None:
            raise CheckpointError(f"{gguf.path}: the vocabulary already has {token!r}")
        tk.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return tk


def tokenizer_config(gguf: GGUFFile, tk: Tokenizer) -> dict:
    """`tokenizer_config.json` for transformers: special tokens and the GGUF's chat template."""
    tokens = gguf.meta("tokenizer.ggml.tokens")

    def token(key: str):
        i = gguf.metadata.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    added = tk.get_added_tokens_decoder()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(gguf.metadata.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf.metadata.get("llama.context_length", 8192)),
        "added_tokens_decoder": {str(i): {"content": t.content, "special": t.special, "normalized": False,
                                          "lstrip": False, "rstrip": False, "single_word": False}
                                 for i, t in sorted(added.items())},
        "chat_template": gguf.metadata.get("tokenizer.chat_template"),
    }


def write_tokenizer(gguf: GGUFFile, out_dir: str | Path, tk: Tokenizer | None = None) -> list[Path]:
    """Write `tokenizer.json` + `tokenizer_config.json` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tk = tk or tokenizer_from_gguf(gguf)
    paths = [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]
    with fileio.atomic_path(paths[0]) as tmp:  # temporary names, renamed when complete (fileio)
        tk.save(str(tmp))
    fileio.write_text(paths[1], json.dumps(tokenizer_config(gguf, tk), indent=2, ensure_ascii=False) + "\n")
    return paths
