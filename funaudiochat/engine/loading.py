"""Load what inference needs from a checkpoint folder: model, tokenizer, engine (and optionally a detokenizer)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from funaudiochat.config import FunAudioChatConfig
from funaudiochat.engine.device import resolve_device
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.errors import CheckpointError, ConfigError, InputError
from funaudiochat.model.checkpoint import load_model
from funaudiochat.text.tokenizer import TextTokenizer


@dataclass
class Runtime:
    engine: Engine
    tokenizer: TextTokenizer
    detokenizer: object | None = None


def load_runtime(model_dir: str | Path, dtype: str | None = None, device: str = "cpu", speech: bool = True,
                 detokenizer_dir: str | Path | None = None, speaker=None, max_seq_len: int = 4096,
                 compile: bool = False, tokenizer: TextTokenizer | None = None) -> Runtime:
    device = resolve_device(device, "device")
    model_dir = Path(model_dir)
    read_config(model_dir)
    tokenizer = tokenizer or TextTokenizer.from_file(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device, speech_head=speech)
    detok = None
    if detokenizer_dir is not None:
        from funaudiochat.speech.detokenizer import Detokenizer

        detok = Detokenizer.from_dir(detokenizer_dir, speaker=speaker, device=device)
    with torch.no_grad():
        engine = Engine(model, max_seq_len=max_seq_len, compile=compile)
    return Runtime(engine, tokenizer, detok)


def read_config(model_dir: str | Path) -> FunAudioChatConfig:
    """The checkpoint's config.json (cheap: lets a CLI check its inputs against the model before loading it)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: checkpoint directory not found")
    return FunAudioChatConfig.load(model_dir)


def add_runtime_arguments(p) -> None:
    p.add_argument("--model", required=True, type=Path,
                   help="checkpoint folder: config.json, *.safetensors, tokenizer.json")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16", "int8"],
                   help="cast weights (default: as stored); int8: the LLM's and speech head's linears as int8 weights "
                        "with per-channel scales, activations fp32 (fastest CPU decoding)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--max-seq-len", type=int, default=4096, help="context budget (prompt + answer), tokens")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (faster decoding after a one-time compile of ~20 s per graph)")
    p.add_argument("--detokenizer", type=Path, default=None,
                   help="CosyVoice3 folder (flow.pt, hift.pt, spk2info.pt) to turn speech tokens into a wav")
    p.add_argument("--speaker", default=None, help="speaker name in spk2info.pt, a .pt/.npy 192-d vector, or a wav")
    p.add_argument("--allow-untrained", action="store_true",
                   help="use parts that config.json marks as never trained (audio input, speech output) anyway")


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
    """The generation flags given on the command line, each checked now (before any loading) under its flag name."""
    out = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               repetition_penalty=args.repetition_penalty, seed=args.seed)
    for name, value in out.items():
        if value is None:
            continue
        try:
            GenerationConfig(**{name: value})
        except ConfigError as err:
            reason = str(err).replace("set do_sample=False", "use --greedy")  # the flag, not the API field
            raise InputError(f"--{name.replace('_', '-')}: {reason}") from None
    if args.greedy:
        out["do_sample"] = False
    return out


def check_runtime_arguments(args) -> torch.device:
    """Validate the runtime flags shared by `infer` and `chat` before anything is loaded; returns the device."""
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.max_seq_len < 1:
        raise InputError(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    device = resolve_device(args.device)
    if args.detokenizer is not None and not args.detokenizer.is_dir():
        raise InputError(f"--detokenizer {args.detokenizer}: no such folder (a CosyVoice3 folder holds flow.pt, "
                         f"hift.pt, spk2info.pt)")
    return device
