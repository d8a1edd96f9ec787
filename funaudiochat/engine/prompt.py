"""A model-ready prompt: token ids plus the audio inputs for its `<|AUDIO|>` placeholders.

Shape legend: B batch, P prompt length (left padded), A audios in order of appearance, N speech tokens,
M mel bins, T mel frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prompt:
    input_ids: torch.Tensor                              # [B, P] left padded
    attention_mask: torch.Tensor | None = None           # [B, P] 1 token / 0 pad
    speech_ids: torch.Tensor | None = None               # [A, N] (pad ids for user audio at inference)
    speech_attention_mask: torch.Tensor | None = None    # [A, N]
    input_features: torch.Tensor | None = None           # [A_c, M, T] log-mel of audios with features
    feature_attention_mask: torch.Tensor | None = None   # [A_c, T]
    feature_exist_mask: torch.Tensor | None = None       # [A] audio has continuous features

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Prompt":
        """From a dict named like the released `generate` inputs (e.g. a golden inputs.safetensors)."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in tensors.items() if k in names})
