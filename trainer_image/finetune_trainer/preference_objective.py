"""dpo: the DPO loss of each pair (preference_loss.py) against the reference table (reference.py),
a mean over the pairs of the global batch.

A pair is one example of the table (preferences.py: chosen then rejected, two segments), so the batch
schedule, the exact resume position and the sample trace work on pairs as they do on examples. Each
micro batch runs chosen and rejected rows through the model in one forward, as TRL does. The loss is
per pair, not per token, so `count` is the global batch's pairs: every micro batch's summed loss over
that count, times the data-parallel world size (DeepSpeed averages gradients over the ranks), sums to
the gradient of the global batch's mean however it is cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from finetune_operator.api import TrainerConfig
from finetune_operator.api.spec import DpoSpec

from finetune_trainer import tensor_parallel
from finetune_trainer.encoding import model_inputs
from finetune_trainer.example_table import ExampleTable
from finetune_trainer.objectives import Evaluation, StepSums, accumulate, evaluation_share, held_out
from finetune_trainer.parallel_layout import Layout
from finetune_trainer.preference_loss import dpo_terms, sequence_logps
from finetune_trainer.preferences import pair_columns
from finetune_trainer.reference import ReferenceTable, reference_tables

if TYPE_CHECKING:
    from finetune_trainer.startup import RankContext


class Preference:
    metric_names = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")

    def __init__(self, config: TrainerConfig, layout: Layout, device: Any, train: ExampleTable,
                 references: dict[str, ReferenceTable]) -> None:  # fmt: skip
        self.config, self.layout, self.device, self.train = config, layout, device, train
        self.settings = config.training.dpo or DpoSpec()
        self.references = references

    @classmethod
    def prepare(cls, ctx: RankContext, engine: Any, data: Any, store: Any) -> Preference:
        """Before any checkpoint is loaded: the engine holds the reference's weights."""
        splits = {"train": data.train, "validation": data.validation}
        references = reference_tables(ctx.config, engine, splits, data_key=data.key, store=store,
                                      scratch=ctx.scratch, phases=ctx.phases, device=ctx.device)  # fmt: skip
        return cls(ctx.config, ctx.layout, ctx.device, data.train, references)

    def count(self, table: ExampleTable, indices: Sequence[int]) -> int:
        return len(indices)

    def _sums(self, engine: Any, table: ExampleTable, reference: ReferenceTable, indices: list[int]
              ) -> tuple[Any, Any]:  # fmt: skip
        """The micro batch's summed pair loss (with its graph) and its metric sums (detached)."""
        import torch

        columns = pair_columns([table[i] for i in indices], pad_id=0)
        labels = torch.tensor(columns.pop("labels"), device=self.device)
        logits = engine(**model_inputs(columns, self.device)).logits
        logps, tokens = sequence_logps(logits, labels)
        pairs = len(indices)
        chosen, rejected = (
            torch.tensor(v, dtype=logps.dtype, device=self.device) for v in reference[indices]
        )
        s = self.settings
        terms = dpo_terms(
            logps[:pairs], logps[pairs:], chosen, rejected, beta=s.beta, loss_type=s.loss_type,
            label_smoothing=s.label_smoothing, chosen_tokens=tokens[:pairs], rejected_tokens=tokens[pairs:],
        )  # fmt: skip
        won, lost = terms.chosen_rewards.double(), terms.rejected_rewards.double()
        metrics = torch.stack([won.sum(), lost.sum(), (won - lost).sum(), (won > lost).double().sum()])
        return terms.losses.sum(), metrics

    def step(self, engine: Any, micro_batches: list[list[int]], global_count: int, world_size: int
             ) -> StepSums:  # fmt: skip
        def sums(indices: list[int]) -> tuple[Any, Any]:
            return self._sums(engine, self.train, self.references["train"], indices)

        return accumulate(engine, micro_batches, global_count, world_size, sums, len(self.metric_names),
                          self.device)  # fmt: skip

    def evaluate(self, engine: Any, examples: ExampleTable) -> Evaluation | None:
        """Mean pair loss, reward margin and reward accuracy over the held-out pairs."""
        batches = evaluation_share(examples, self.layout, self.config.schedule.micro_batch_size)
        if batches is None:
            return None

        def part(indices: list[int]) -> tuple[float, float, list[float]]:
            loss, metrics = self._sums(engine, examples, self.references["validation"], indices)
            return float(loss), float(len(indices)), [float(metrics[2]), float(metrics[3])]

        share = tensor_parallel.report_share(self.config, self.layout)  # a TP group's sums once
        return held_out(engine, batches, part, ("rewards_margin", "rewards_accuracy"), self.device, share)
