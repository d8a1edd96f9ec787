"""Training objectives on top of the model's forward.

SFT: the released loss is text_loss + speech_loss, each a mean over its targets. Over a global batch split into
micro-batches and processes, we weight each micro-batch's means by its share of the global target counts, so the
step's loss and gradient are those of the whole global batch at once, whatever the split.

DPO: log pi(response) is the joint text + speech log-probability of the assistant part (the targets of the
model's rewritten labels, SPEC §6.2); loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))).

Distillation (SFT with a teacher): at the text targets of records with a typed twin, KL(teacher || student) of the
next-token distributions, the teacher reading the twin; summed, and normalised like the text loss.

Shape legend: B rows, L tokens, V text vocab, k group size, Vs speech codebook, P pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from funaudiochat.model.funaudiochat import ModelOutput


@dataclass
class GlobalCounts:
    """Targets of the whole global batch (all micro-batches of all processes)."""

    text: int
    speech: int
    micro_batches: int  # number of micro-batches over all processes (for the MoE aux-loss mean)


def sft_loss(out: ModelOutput, n_text: int, n_speech: int, total: GlobalCounts,
             aux_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the global-batch loss, and its detached parts (sums over targets)."""
    zero = out.text_logits.sum() * 0.0  # keeps every head in the graph when a part has no targets here
    if out.speech_logits is not None:
        zero = zero + out.speech_logits.sum() * 0.0
    text_ce = out.text_loss - aux_coef * out.aux_loss if out.aux_loss is not None else out.text_loss
    text_sum = text_ce * n_text if n_text else zero
    speech_sum = out.speech_loss * n_speech if n_speech and out.speech_loss is not None else zero
    loss = text_sum / max(total.text, 1) + speech_sum / max(total.speech, 1)
    aux = out.aux_loss.detach() if out.aux_loss is not None else torch.zeros(())
    if out.aux_loss is not None:
        loss = loss + aux_coef * out.aux_loss / total.micro_batches
    return loss, {"text_sum": text_sum.detach(), "speech_sum": speech_sum.detach(), "aux_sum": aux}


def sequence_logps(out: ModelOutput, trace: dict, group_size: int, ignore_index: int = -100) -> torch.Tensor:
    """Per-row sum of the log-probabilities of every text and speech target -> [B] (fp32).

    `trace` is the dict the forward filled (`lm_labels`: rewritten text labels [B, L]; `crq_speech_labels` [B, kL])."""
    labels = trace["lm_labels"][:, 1:]
    total = _target_logps(out.text_logits[:, :-1], labels, ignore_index)
    if out.speech_logits is not None and trace.get("crq_speech_labels") is not None:
        targets = F.pad(trace["crq_speech_labels"], (0, group_size), value=ignore_index)[:, group_size:]
        total = total + _target_logps(out.speech_logits, targets, ignore_index)
    return total


def _target_logps(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> [B] sum of log p(target) over non-ignored targets."""
    valid = targets != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.masked_fill(~valid, 0)[..., None])[..., 0]  # [B, T]
    return (picked * valid).sum(-1)


@dataclass
class DPOOutput:
    losses: torch.Tensor            # [P]
    chosen_rewards: torch.Tensor    # [P] beta * (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor  # [P]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DPOOutput:
    """Sigmoid DPO (Rafailov et al. 2023) on sequence log-probabilities [P]."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    return DPOOutput(-F.logsigmoid(beta * logits), beta * (policy_chosen - ref_chosen).detach(),
                     beta * (policy_rejected - ref_rejected).detach())


def distill_kl(student_logits: torch.Tensor, student_owners: torch.Tensor, teacher_logits: torch.Tensor,
               teacher_owners: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over matched targets of KL(teacher || student), in fp32, and how many were matched.

    `*_logits` [N, V] at each side's text targets, `*_owners` [N] the sample each target belongs to. A sample's
    targets are in order within its row, so sorting stably by owner lines up the student's targets of every sample
    the teacher saw with the teacher's; the student's other targets (no typed twin) are left out.
    """
    s_order = torch.argsort(student_owners, stable=True)
    s_order = s_order[torch.isin(student_owners[s_order], teacher_owners)]
    t_order = torch.argsort(teacher_owners, stable=True)
    if not torch.equal(student_owners[s_order], teacher_owners[t_order]):
        raise ValueError(f"distillation: the teacher's {len(t_order)} targets do not line up with the student's "
                         f"{len(s_order)} of the same samples")
    student = F.log_softmax(student_logits[s_order].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[t_order].float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(), int(s_order.numel())
