"""The loss of knowledge distillation: how far the student's next-token distribution is from the teacher's.

At every target token both models predict a distribution over the vocabulary; the loss is their generalized
Jensen-Shannon divergence with interpolation `beta`, as TRL's GKD defines it (`GKDTrainer.
generalized_jsd_loss` in trl/experimental/gkd, the same convention as its chunked `DistillationTrainer`
kernel): `beta` 0 is the forward KL(teacher || student), which makes the student cover everything the
teacher deems likely; `beta` 1 the reverse KL(student || teacher), which makes it commit to the teacher's
modes; in between, `beta * KL(teacher || M) + (1 - beta) * KL(student || M)` with the mixture
`M = beta * teacher + (1 - beta) * student`. Both logits are divided by `temperature` first (no T^2
rescaling, as in TRL). tests/unit/test_objective_numerics.py checks it against TRL's own function.

The function returns the sum over target tokens, not a mean, and the count: like the causal-LM loss
(token_loss.py), the caller divides by the target count of the whole global batch, so that the gradient is
the global token-weighted mean however the batch is cut into micro batches and ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from finetune_trainer.chat_labels import IGNORE_INDEX


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    temperature: float,
) -> tuple[torch.Tensor, int]:
    """The generalized JSD between student and teacher summed over the target tokens (a float32 scalar that
    carries the student's gradient), and the number of target tokens.

    Logits (rows, positions, vocab) at position t predict the label at t + 1; labels equal to IGNORE_INDEX
    are not targets. Only the target positions are taken before anything vocab-sized is computed, in
    float32. The teacher is a fixed target: no gradient flows into its logits.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], not {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    if student_logits.shape != teacher_logits.shape or labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)} and labels "
            f"{tuple(labels.shape)} do not line up (the two models must share a vocabulary)"
        )
    is_target = labels[:, 1:] != IGNORE_INDEX
    count = int(is_target.sum())
    student = F.log_softmax(student_logits[:, :-1][is_target].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach()[:, :-1][is_target].float() / temperature, dim=-1)

    # F.kl_div(input, target) is KL(target || input): the argument order is the reverse of the notation.
    if beta == 0:
        return F.kl_div(student, teacher, reduction="sum", log_target=True), count
    if beta == 1:
        return F.kl_div(teacher, student, reduction="sum", log_target=True), count
    mixture = torch.logaddexp(student + math.log(1 - beta), teacher + math.log(beta))
    divergence = beta * F.kl_div(mixture, teacher, reduction="sum", log_target=True) + (1 - beta) * F.kl_div(
        mixture, student, reduction="sum", log_target=True
    )
    return divergence, count
