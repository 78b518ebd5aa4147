"""The loss of preference training (DPO and IPO) from per-sequence log-probabilities, as TRL computes it.

DPO trains the policy to prefer the chosen completion of a pair over the rejected one by more than a frozen
reference does: both are scored by the sum of their completion tokens' log-probabilities, and the loss of a
pair depends only on the four sums (policy and reference, chosen and rejected). So the math is kept here,
pure and apart from the step loop: the policy's sums come from `sequence_logps` over its logits, the
reference's from the same function run once ahead of training (and cached), and `dpo_terms` turns them
into one loss per pair.

TRL's `DPOTrainer` (trl/trainer/dpo_trainer.py, `_compute_loss`) is the reference implementation, and
tests/unit/test_objective_numerics.py checks this module against it, conventions included:

- the rewards reported for a pair are `beta * (policy - reference)` of each completion, for every loss type;
- IPO compares log-ratios averaged over each completion's tokens, not summed (TRL normalises by the
  completion length, having confirmed it with the IPO authors), so it takes the token counts;
- label smoothing is conservative DPO (cDPO): the preference label is taken as flipped with probability
  `label_smoothing`. TRL 1.x no longer applies `label_smoothing` to its sigmoid loss (it silently ignores
  it there); the formula is the one TRL 0.x used for sigmoid and TRL 1.x keeps in its `aot` loss, which is
  what the tests compare against.

Every loss is per pair: the caller reduces them (a sum over its pairs divided by the global pair count
keeps the gradient independent of how the global batch is cut).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from finetune_trainer.chat_labels import IGNORE_INDEX

LossType = Literal["sigmoid", "ipo"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


@dataclass(frozen=True)
class DpoTerms:
    """Per pair: the loss to reduce and backpropagate, and the implicit rewards to report (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a causal LM's `logits` (rows, positions, vocab): the summed log-probability of its
    target tokens (float32) and how many there are (int64).

    The logits at position t predict the label at t + 1; labels equal to IGNORE_INDEX (the prompt,
    padding) are not targets. Only the target positions are taken from the logits, one row at a time, and
    cast to float32 there: a bf16 (rows, positions, vocab) tensor is never copied whole to float32, and the
    log-sum-exp temporaries stay within one row.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up")
    targets = labels[:, 1:]
    is_target = targets != IGNORE_INDEX
    sums = []
    for row in range(logits.size(0)):
        picked = logits[row, :-1][is_target[row]].float()
        chosen = picked.gather(-1, targets[row][is_target[row]].unsqueeze(-1)).squeeze(-1)
        # log_softmax(x)[y] = x[y] - logsumexp(x): the vocab-sized log_softmax is never built.
        sums.append((chosen - picked.logsumexp(dim=-1)).sum())
    return torch.stack(sums), is_target.sum(dim=1)


def dpo_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: LossType,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> DpoTerms:
    """The DPO loss of each pair from the summed log-probabilities of its completions (`sequence_logps`).

    `loss_type` "sigmoid" is DPO (with cDPO when `label_smoothing` > 0), "ipo" is IPO, whose `beta` is the
    paper's regulariser tau and which needs `chosen_tokens` and `rejected_tokens`: the completion token
    counts it averages the log-ratios over.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, not {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected

    if loss_type == "sigmoid":
        if not 0.0 <= label_smoothing < 0.5:
            # At 0.5 a flipped label is as likely as the given one: the loss no longer prefers either.
            raise ValueError(f"label_smoothing must lie in [0, 0.5), not {label_smoothing}")
        margin = beta * (chosen_logratios - rejected_logratios)
        losses = -F.logsigmoid(margin)
        if label_smoothing > 0:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-margin)
    else:
        if label_smoothing != 0:
            # TRL ignores label_smoothing for IPO; refusing it keeps a setting from doing nothing silently.
            raise ValueError("label_smoothing applies to the sigmoid loss only, not to ipo")
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(
                "the ipo loss averages over completion tokens: pass chosen_tokens and rejected_tokens"
            )
        # A completion truncated to nothing contributes a zero log-ratio rather than 0/0.
        chosen_mean = chosen_logratios / chosen_tokens.clamp(min=1)
        rejected_mean = rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (chosen_mean - rejected_mean - 1 / (2 * beta)) ** 2

    return DpoTerms(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )
