"""The loss of an optimizer step as the mean over every target token of the global batch.

A causal-LM loss that is a mean over each micro batch's own targets, averaged over accumulation and
over the data-parallel ranks, weighs a token of a short answer in a sparse micro batch more than a
token of a long one: the gradient then depends on how the global batch was cut. Hugging Face fixed
this in transformers 4.46 (`num_items_in_batch`); we do what its Trainer does with DeepSpeed
(transformers/trainer.py `training_step`/`compute_loss`): every micro batch's loss is its summed
cross-entropy over the target count of the whole global batch (all micro batches, all ranks),
multiplied by the data-parallel world size because DeepSpeed averages gradients over the ranks
(ZeRO 0-3 alike), and handed to `engine.backward(..., scale_wrt_gas=False)` because DeepSpeed would
otherwise divide it by the accumulation steps again. The sum of those gradients is the gradient of
the global batch's token-weighted mean, however the batch is cut.

The target count needs no collective: the batch schedule is a pure function of the step, so every rank
counts the targets of the whole global batch from the memory-mapped labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from finetune_trainer.encoding import IGNORE_INDEX


def targets_of(labels: Sequence[int] | Any) -> int:
    """The tokens an example is trained to predict: transformers' causal-LM loss shifts labels, so
    the first label is never a target (the count `num_items_in_batch` uses, `labels[..., 1:]`)."""
    import numpy as np

    return int(np.count_nonzero(np.asarray(labels[1:]) != IGNORE_INDEX))


def step(engine: Any, micro_batches: Iterable[dict[str, Any]], global_targets: int, world_size: int) -> Any:
    """One optimizer step over this rank's micro batches; its summed cross-entropy (a detached
    float64 tensor) for the reported token-weighted loss."""
    import torch

    total = None
    for batch in micro_batches:
        loss = engine(**batch, num_items_in_batch=global_targets).loss
        engine.backward(loss * world_size, scale_wrt_gas=False)
        engine.step()
        summed = loss.detach().to(torch.float64) * global_targets
        total = summed if total is None else total + summed
    return total
