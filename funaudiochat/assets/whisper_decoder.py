"""Whisper tiny.en's decoder as the mini's word reader (model/word_reader.py), from the pip-shipped CTranslate2 files.

Name map (CTranslate2 `decoder/` -> `word_reader.`; `gamma`/`beta` -> `weight`/`bias`, `L` = `layer_i`):
    embeddings/weight (tied output projection)   embed_tokens.weight
    position_encodings/encodings                 embed_positions
    layer_norm                                   norm
    L/self_attention/{layer_norm,linear_0,linear_1}   layers.i.{self_norm, self_attn.qkv, self_attn.out}
    L/attention/{layer_norm,linear_0,linear_1,linear_2}  layers.i.{cross_norm, cross_attn.q, cross_attn.kv, cross_attn.out}
    L/ffn/{layer_norm,linear_0,linear_1}         layers.i.{ffn_norm, fc1, fc2}

`llm_ids` maps each Whisper token to the LLM tokenizer's pieces of the same bytes: both are byte-level BPEs over the
same byte alphabet, so a Whisper token's surface string is tokenized by the LLM's BPE model as is.
"""
from __future__ import annotations

from pathlib import Path

import torch

from funaudiochat.assets.ct2 import CT2Model, read_ct2
from funaudiochat.assets.whisper_encoder import whisper_model_dir
from funaudiochat.errors import CheckpointError
from funaudiochat.model.word_reader import WordReader, WordReaderConfig

PREFIX = "word_reader."
_LAYER_MAP = {"self_attention/layer_norm": "self_norm", "self_attention/linear_0": "self_attn.qkv",
              "self_attention/linear_1": "self_attn.out", "attention/layer_norm": "cross_norm",
              "attention/linear_0": "cross_attn.q", "attention/linear_1": "cross_attn.kv",
              "attention/linear_2": "cross_attn.out", "ffn/layer_norm": "ffn_norm", "ffn/linear_0": "fc1",
              "ffn/linear_1": "fc2"}


def reader_config(ct2: CT2Model, whisper_tokenizer) -> WordReaderConfig:
    emb = ct2.get("decoder/embeddings/weight")
    layers = sum(1 for name in ct2.variables if name.startswith("decoder/layer_") and name.endswith("ffn/linear_0/weight"))
    ids = [whisper_tokenizer.token_to_id(t) for t in ("<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>")]
    if None in ids:
        raise CheckpointError("the Whisper tokenizer has no <|startoftranscript|> / <|notimestamps|> / <|endoftext|>")
    return WordReaderConfig(vocab_size=emb.shape[0], width=emb.shape[1], layers=layers,
                            heads=int(ct2.get("decoder/num_heads")),
                            ffn_dim=ct2.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
                            max_positions=ct2.get("decoder/position_encodings/encodings").shape[0],
                            start_ids=(ids[0], ids[1]), end_id=ids[2])


def llm_ids_table(cfg: WordReaderConfig, whisper_tokenizer, llm_tokenizer) -> torch.Tensor:
    """[V, S]: each Whisper text token's LLM pieces (-1 past the last one; all -1 for Whisper's special tokens)."""
    table = torch.full((cfg.vocab_size, cfg.sub_tokens), -1, dtype=torch.long)
    bpe = llm_tokenizer.model
    for surface, v in whisper_tokenizer.get_vocab(with_added_tokens=False).items():
        if v >= cfg.end_id:  # <|endoftext|> and everything after it are Whisper's specials
            continue
        pieces = [t.id for t in bpe.tokenize(surface)][: cfg.sub_tokens]
        table[v, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
    return table


def reader_state_dict(ct2: CT2Model, cfg: WordReaderConfig) -> dict[str, torch.Tensor]:
    """`word_reader.*` fp32 tensors for Whisper's decoder (its `llm_ids` table excluded)."""
    t = lambda name: torch.from_numpy(ct2.get(name).copy()).float()
    out = {PREFIX + "embed_tokens.weight": t("decoder/embeddings/weight"),
           PREFIX + "embed_positions": t("decoder/position_encodings/encodings"),
           PREFIX + "norm.weight": t("decoder/layer_norm/gamma"), PREFIX + "norm.bias": t("decoder/layer_norm/beta")}
    for i in range(cfg.layers):
        for src, dst in _LAYER_MAP.items():
            base = f"decoder/layer_{i}/{src}/"
            is_norm = src.endswith("layer_norm")
            out[f"{PREFIX}layers.{i}.{dst}.weight"] = t(base + ("gamma" if is_norm else "weight"))
            out[f"{PREFIX}layers.{i}.{dst}.bias"] = t(base + ("beta" if is_norm else "bias"))
    return out


_SHAPE_FIELDS = ("vocab_size", "width", "layers", "heads", "ffn_dim", "max_positions", "start_ids", "end_id")


def attach_word_reader(model, llm_tokenizer, model_dir: str | Path | None = None,
                       settings: dict | None = None) -> None:
    """Give a mini model (Whisper tiny.en encoder) Whisper's decoder as its word reader, in place: config, weights,
    the token table. `settings`: the reader config a model was trained with (e.g. from a deltas file); default the
    current one."""
    import tokenizers

    directory = Path(model_dir) if model_dir is not None else whisper_model_dir()
    ct2 = read_ct2(directory / "model.bin")
    whisper_tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    cfg = reader_config(ct2, whisper_tokenizer)
    if settings is not None:
        wanted = WordReaderConfig.from_dict(settings, where="the trained model's word_reader")
        differ = [f for f in _SHAPE_FIELDS if getattr(wanted, f) != getattr(cfg, f)]
        if differ:
            raise CheckpointError(f"the model was trained with another Whisper decoder than {directory} ({differ})")
        cfg = wanted
    a = model.cfg.audio_config
    if cfg.width != a.d_model:
        raise CheckpointError(f"the Whisper decoder's width {cfg.width} is not the encoder's d_model {a.d_model}")
    a.word_reader = cfg.to_dict()
    reader = WordReader(cfg)
    state = reader_state_dict(ct2, cfg)
    missing, _ = reader.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, strict=False)
    if missing != ["llm_ids"]:
        raise CheckpointError(f"the Whisper decoder in {directory} lacks {missing}")
    reader.llm_ids.copy_(llm_ids_table(cfg, whisper_tokenizer, llm_tokenizer))
    model.word_reader = reader.to(next(model.parameters()).dtype)
