"""`funaudiochat train RECIPE [--resume] [key=value ...]`: run one training stage from a recipe (recipes/*.yaml).

One process: `funaudiochat train recipes/core_cocktail_stage1.yaml`.
Several (one per GPU, or gloo on CPU): `torchrun --nproc_per_node=8 -m funaudiochat.cli train RECIPE`
(dist.strategy: fsdp or ddp). Overrides set recipe fields, e.g. `optim.lr=1e-4 train.steps=200 run_dir=runs/x`.
"""
from __future__ import annotations

import argparse

from funaudiochat.train.config import load_recipe

INTERMIXED = True  # `--resume` may come before, between or after the overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="recipe fields to override, as section.key=value")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in run_dir (starts from step 0 if there is none)")


def main(args: argparse.Namespace) -> int:
    from funaudiochat.train import loop, parallel

    recipe = load_recipe(args.recipe, args.overrides)
    trainer = loop.run(recipe, resume=args.resume)
    parallel.exit_process(trainer.info, 0)
    return 0
