"""How much a checkpoint hears: the LLM loss of held-out ASR records with their own audio against the same records
with each other's audio (each record takes the next one's clip). A model that hears scores far below the shuffled
figure; a deaf one scores the same. Cheap (two forwards), so it scores a training run's checkpoints as they come.

    .venv/bin/python bench/hearing_gap.py --model runs/mini/pre_align/checkpoints/step-200/model [--split test] [-n 16]

`--positions N` also prints both losses at each of the transcripts' first N tokens (where in a sentence the audio
is heard: a model that reads only the start of the clip helps the first tokens alone).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="checkpoint folder (a training checkpoint's model/)")
    ap.add_argument("--data", type=Path, default=Path("data/mini"), help="build-mini's output folder")
    ap.add_argument("--split", default="test", help="records file SPLIT.jsonl of --data (default test)")
    ap.add_argument("-n", type=int, default=16, help="ASR records scored (the split's first N; default 16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--positions", type=int, default=0, help="also the losses at the first N transcript tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from funaudiochat.config import FunAudioChatConfig
    from funaudiochat.model.checkpoint import load_model
    from funaudiochat.text.tokenizer import TextTokenizer
    from funaudiochat.train.batching import Collator
    from funaudiochat.train.data import SampleBuilder, load_records

    cfg = FunAudioChatConfig.load(args.model / "config.json")
    source = args.data / f"{args.split}.jsonl"
    asr = [r for r in map(json.loads, source.read_text(encoding="utf-8").splitlines()) if r["task"] == "asr"]
    if len(asr) < 2:
        raise SystemExit(f"{source}: fewer than 2 ASR records")
    # beside the records (their audio paths are relative); one file per process, so scorings can run side by side
    picked = args.data / f".hearing_gap_{args.split}_{os.getpid()}.jsonl"
    picked.write_text("".join(json.dumps(r) + "\n" for r in asr[: args.n]), encoding="utf-8")
    try:
        builder = SampleBuilder(TextTokenizer.from_file(args.model), cfg, 512)
        samples, _ = load_records([picked], builder.sample, "reject")
    finally:
        picked.unlink()
    model = load_model(args.model, dtype="fp32").eval()
    collate = Collator(cfg, 512, False)
    clips = [s.audios[0].wav for s in samples]
    shuffled = [dataclasses.replace(s, audios=[dataclasses.replace(s.audios[0], wav=clips[(i + 1) % len(clips)])])
                for i, s in enumerate(samples)]

    def losses(all_samples, batch: int = 16) -> tuple[float, list[float]]:
        """Mean loss of the target tokens, and the mean loss at each target position j < --positions; scored 16
        records at a time (a 49k-vocabulary head over every position of every record at once does not fit)."""
        total = count = 0.0
        at_sum, at_count = [0.0] * args.positions, [0] * args.positions
        for start in range(0, len(all_samples), batch):
            inputs = collate(all_samples[start:start + batch]).model_inputs("cpu")
            with torch.no_grad():
                out = model(**inputs, speech=False)
            labels = inputs["labels"][:, 1:]
            target = labels != -100
            per_token = F.cross_entropy(out.text_logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                        reduction="none")  # [B, L-1]
            total, count = total + float(per_token[target].sum()), count + int(target.sum())
            rank = target.cumsum(dim=1) - 1  # j of each target token within its row
            for j in range(args.positions):
                picked = per_token[target & (rank == j)]
                at_sum[j], at_count[j] = at_sum[j] + float(picked.sum()), at_count[j] + picked.numel()
        return total / count, [a / n if n else float("nan") for a, n in zip(at_sum, at_count)]

    (own, own_at), (other, other_at) = losses(samples), losses(shuffled)
    print(json.dumps({"model": str(args.model), "split": args.split, "records": len(samples),
                      "own_audio": round(own, 4), "shuffled_audio": round(other, 4), "gap": round(other - own, 4)}))
    for j, (a, b) in enumerate(zip(own_at, other_at)):
        print(json.dumps({"position": j, "own_audio": round(a, 3), "shuffled_audio": round(b, 3),
                          "gap": round(b - a, 3)}))


if __name__ == "__main__":
    main()
