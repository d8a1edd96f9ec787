"""Load what inference needs from a checkpoint folder: model, tokenizer, engine (and optionally a detokenizer)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from funaudiochat.engine.generate import Engine
from funaudiochat.model.checkpoint import load_model
from funaudiochat.text.tokenizer import TextTokenizer


@dataclass
class Runtime:
    engine: Engine
    tokenizer: TextTokenizer
    detokenizer: object | None = None


def load_runtime(model_dir: str | Path, dtype: str | None = None, device: str = "cpu", speech: bool = True,
                 detokenizer_dir: str | Path | None = None, speaker=None, max_seq_len: int = 4096,
                 compile: bool = False) -> Runtime:
    model_dir = Path(model_dir)
    tokenizer = TextTokenizer.from_file(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device, speech_head=speech)
    detok = None
    if detokenizer_dir is not None:
        from funaudiochat.speech.detokenizer import Detokenizer

        detok = Detokenizer.from_dir(detokenizer_dir, speaker=speaker, device=device)
    with torch.no_grad():
        engine = Engine(model, max_seq_len=max_seq_len, compile=compile)
    return Runtime(engine, tokenizer, detok)


def add_runtime_arguments(p) -> None:
    p.add_argument("--model", required=True, type=Path,
                   help="checkpoint folder: config.json, *.safetensors, tokenizer.json")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="cast weights (default: as stored)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--max-seq-len", type=int, default=4096, help="context budget (prompt + answer), tokens")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (faster decoding after a one-time compile of ~20 s per graph)")
    p.add_argument("--detokenizer", type=Path, default=None,
                   help="CosyVoice3 folder (flow.pt, hift.pt, spk2info.pt) to turn speech tokens into a wav")
    p.add_argument("--speaker", default=None, help="speaker name in spk2info.pt, a .pt/.npy 192-d vector, or a wav")


def add_sampling_arguments(p) -> None:
    g = p.add_argument_group("generation (defaults: the mode's released preset)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--greedy", action="store_true", help="no sampling (text and speech argmax)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def sampling_overrides(args) -> dict:
    out = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.greedy:
        out["do_sample"] = False
    return out
