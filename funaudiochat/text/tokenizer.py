"""Text tokenizer: a HF `tokenizer.json` (the `tokenizers` library) plus the ids of the special tokens we use.

The released checkpoints ship the Qwen3 tokenizer with the audio specials added (SPEC.md §2.1). Special tokens are
looked up by name, so a small test vocabulary with other ids works the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from funaudiochat.errors import CheckpointError, InputError

AUDIO = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
AUDIO_PAD = "<|audio_pad|>"
SIL = "<|sil|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
AUDIO_TEMPLATE = AUDIO_BOS + AUDIO + AUDIO_EOS


@dataclass(frozen=True)
class SpecialIds:
    im_start: int
    im_end: int
    audio: int
    audio_bos: int
    audio_eos: int
    sil: int | None
    endoftext: int | None


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer"):
        self.tk = tokenizer
        self.source = source
        self.special = SpecialIds(
            im_start=self.token_id(IM_START), im_end=self.token_id(IM_END), audio=self.token_id(AUDIO),
            audio_bos=self.token_id(AUDIO_BOS), audio_eos=self.token_id(AUDIO_EOS),
            sil=self.tk.token_to_id(SIL), endoftext=self.tk.token_to_id(ENDOFTEXT))
        added = self.tk.get_added_tokens_decoder()
        self._special_ids = {i for i, t in added.items() if t.special} | {
            i for i in (self.special.audio, self.special.audio_bos, self.special.audio_eos, self.special.sil,
                        self.special.im_start, self.special.im_end, self.special.endoftext) if i is not None}

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{path}: tokenizer.json not found (a checkpoint folder ships its tokenizer.json)")
        try:
            return cls(Tokenizer.from_file(str(path)), str(path))
        except Exception as err:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{path}: cannot read tokenizer ({err})") from err

    def token_id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise CheckpointError(f"{self.source}: the vocabulary has no {token!r} token; Fun-Audio-Chat needs the "
                                  f"ChatML and audio special tokens (see SPEC §2.1)")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text (special tokens written literally are recognised) -> ids, no BOS/EOS added."""
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        return self.tk.encode(text, add_special_tokens=False).ids

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """The character span [start, end) in `text` of each id `encode(text)` returns."""
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        return [tuple(o) for o in self.tk.encode(text, add_special_tokens=False).offsets]

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self.tk.decode(ids, skip_special_tokens=False)

    def is_special(self, i: int) -> bool:
        return int(i) in self._special_ids

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._special_ids)
