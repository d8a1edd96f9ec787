"""The data factory: text distillation (distill.py), synthetic speech (synth.py) and its augmentations (augment.py)."""
