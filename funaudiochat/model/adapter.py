"""Grouping adapter (`audio_tower`): 25 Hz speech tokens and/or encoder features -> 5 Hz LLM vectors.

One LLM position carries a group of k=5 speech tokens: the mean of their embeddings goes through `output_matching`;
continuous encoder features are grouped the same way through `continual_output_matching` and either replace or are
added to the discrete part (`continuous_features_mode`). SPEC.md §3.2.

The embedding table is shared with the Speech Refined Head's output layer (tied weights).

Shape legend: A audios, N speech tokens (a multiple of k), G = N/k groups, D LLM width.
"""
from __future__ import annotations

import torch
from torch import nn

from funaudiochat.config import AudioConfig


class GroupingAdapter(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.group_size, self.mode = cfg.group_size, cfg.continuous_features_mode
        d = cfg.output_dim
        self.embed_tokens = nn.Embedding(cfg.codebook_size, d, padding_idx=cfg.pad_token_id)
        self.output_matching = nn.Linear(d, d, bias=False)
        self.continual_output_matching = nn.Linear(d, d, bias=False)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [A, N] -> per-token embeddings [A, N, D]."""
        return self.embed_tokens(ids)

    def group_mean(self, x: torch.Tensor) -> torch.Tensor:
        """[A, N, D] -> [A, N/k, D] (mean over each group of k)."""
        a, n, d = x.shape
        return x.view(a, n // self.group_size, self.group_size, d).mean(dim=2)

    def forward(self, ids: torch.Tensor, continuous: torch.Tensor | None = None,
                has_continuous: torch.Tensor | None = None) -> torch.Tensor:
        """ids [A, N]; continuous [A_c, N, D] for the rows where `has_continuous` [A] is True -> [A, G, D]."""
        groups = self.output_matching(self.group_mean(self.embed_tokens(ids)))
        if continuous is not None:
            cont = self.continual_output_matching(self.group_mean(continuous))
            rows = has_continuous if has_continuous is not None else torch.ones(ids.shape[0], dtype=torch.bool)
            groups = groups.clone()
            if self.mode == "add":
                groups[rows] = groups[rows] + cont
            else:
                groups[rows] = cont
        return groups
