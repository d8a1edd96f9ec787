"""The data factory: synthetic speech (synth.py) and its augmentations (augment.py)."""
