"""Grouping adapter (`audio_tower`): 25 Hz speech tokens and/or encoder features -> 5 Hz LLM vectors.

One LLM position carries a group of k=5 speech tokens: the mean of their embeddings goes through `output_matching`;
continuous encoder features are grouped the same way (or, `continuous_grouping: concat`, set side by side) through
`continual_output_matching` and either replace or are added to the discrete part (`continuous_features_mode`).
SPEC.md §3.2.

The embedding table is shared with the Speech Refined Head's output layer (tied weights).

Shape legend: A audios, N speech tokens (a multiple of k), G = N/k groups, D LLM width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.config import AudioConfig


class GroupingAdapter(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.group_size, self.mode = cfg.group_size, cfg.continuous_features_mode
        self.concat = cfg.continuous_grouping == "concat"
        self.output_rms = cfg.continuous_output_rms
        d = cfg.output_dim
        self.embed_tokens = nn.Embedding(cfg.codebook_size, d, padding_idx=cfg.pad_token_id)
        # training only (`train.speech_embedding_grad: head`): the speech fed back to the LLM reads the embedding
        # without a gradient, so only the SRH's loss trains it
        self.detach_fed_back_speech = False
        # `speech_opener` config: the LLM's input at the assistant's <|audio_bos|> ([D]; FunAudioChatModel.embed_inputs)
        self.speech_opener = nn.Parameter(torch.zeros(d)) if cfg.speech_opener else None
        self.output_matching = nn.Linear(d, d, bias=False)
        self.continual_output_matching = nn.Linear(d * self.group_size if self.concat else d, d, bias=False)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [A, N] -> per-token embeddings [A, N, D]."""
        return self.embed_tokens(ids)

    def group_mean(self, x: torch.Tensor) -> torch.Tensor:
        """[A, N, D] -> [A, N/k, D] (mean over each group of k)."""
        a, n, d = x.shape
        return x.view(a, n // self.group_size, self.group_size, d).mean(dim=2)

    def group_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder frames [A, N, D] -> the 5 Hz vectors [A, N/k, D] (`continuous_grouping`: the mean of each group
        of k, or its k frames side by side [A, N/k, k*D] before the matching layer)."""
        if self.concat:
            a, n, d = x.shape
            x = x.reshape(a, n // self.group_size, self.group_size * d)
        else:
            x = self.group_mean(x)
        x = self.continual_output_matching(x)
        if self.output_rms is not None:
            x = F.rms_norm(x, (x.shape[-1],), eps=1e-6) * self.output_rms
        return x

    def forward(self, ids: torch.Tensor, continuous: torch.Tensor | None = None,
                has_continuous: torch.Tensor | None = None) -> torch.Tensor:
        """ids [A, N]; continuous [A_c, N, D] for the rows where `has_continuous` [A] is True -> [A, G, D]."""
        if self.detach_fed_back_speech:
            tokens = F.embedding(ids, self.embed_tokens.weight.detach(), padding_idx=self.embed_tokens.padding_idx)
        else:
            tokens = self.embed_tokens(ids)
        groups = self.output_matching(self.group_mean(tokens))
        if continuous is not None:
            cont = self.group_continuous(continuous)
            rows = has_continuous if has_continuous is not None else torch.ones(ids.shape[0], dtype=torch.bool)
            groups = groups.clone()
            if self.mode == "add":
                groups[rows] = groups[rows] + cont
            else:
                groups[rows] = cont
        return groups


def regroup_continuous_weight(weight: torch.Tensor, k_from: int, concat_from: bool, k_to: int,
                              concat_to: bool) -> torch.Tensor:
    """A `continual_output_matching` weight for another group size or `continuous_grouping`. Mean -> concat is exact
    (W @ mean(x_1..x_k) = [W/k ... W/k] @ [x_1; ...; x_k]); concat -> mean keeps the sum of the k blocks (the
    weight a frame repeated k times sees); a new group size reuses that per-frame weight."""
    d = weight.shape[0]
    if concat_from:
        weight = weight.reshape(d, k_from, d).sum(dim=1)
    return torch.cat([weight / k_to] * k_to, dim=1) if concat_to else weight
