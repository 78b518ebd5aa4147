"""The step loop: nothing in it waits on the device or on the other ranks beyond what DeepSpeed's
step needs. Tokens are counted on the host; the ranks agree on stopping and checkpointing through a
vote that overlaps the next step (agreement.py); what to do after each step is `cadence.py`'s, and
the validation loss is the `Evaluator`'s."""

from __future__ import annotations

import logging
import time
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer import faults, grace, process_group, token_loss
from finetune_trainer.agreement import StopFlag, StopOrCheckpointVote
from finetune_trainer.cadence import Cadence
from finetune_trainer.encoding import IGNORE_INDEX, Example, collate, model_inputs
from finetune_trainer.example_table import ExampleTable
from finetune_trainer.failures import Terminated
from finetune_trainer.process_group import Ranks
from finetune_trainer.sample_trace import SampleTrace
from finetune_trainer.startup import RankContext, Started

log = logging.getLogger(__name__)


def batch_inputs(config: TrainerConfig, examples: list[Example], device: Any) -> dict[str, Any]:
    pad_id = 0  # masked out of attention and loss, so any id serves
    columns = collate(
        examples,
        pad_id,
        config.dataset.max_seq_length,
        packed=config.dataset.packing,
        flatten=config.training.attention_implementation == "flash_attention_2",
    )
    return model_inputs(columns, device)


class Evaluator:
    def __init__(self, config: TrainerConfig, ranks: Ranks, device: Any, examples: ExampleTable) -> None:
        self.config = config
        self.ranks = ranks
        self.device = device
        self.examples = examples

    def loss(self, engine: Any) -> float | None:
        """Mean loss per target token over the validation set; equal shares per rank, since ZeRO-3
        gathers parameters collectively on every forward."""
        import torch

        examples = self.examples
        per_rank = len(examples) // self.ranks.world_size
        if per_rank == 0:
            return None
        first = self.ranks.rank * per_rank
        micro = self.config.schedule.micro_batch_size
        loss_sum, counted = 0.0, 0.0
        engine.eval()
        with torch.no_grad():
            for at in range(first, first + per_rank, micro):
                chosen = [examples[i] for i in range(at, min(at + micro, first + per_rank))]
                batch = batch_inputs(self.config, chosen, self.device)
                targets = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                loss_sum += float(engine(**batch).loss) * targets
                counted += targets
        engine.train()
        total, count = process_group.all_reduce([loss_sum, counted], "sum", self.device)
        return total / count if count else None


class StepLoop:
    def __init__(self, ctx: RankContext, started: Started, stop: StopFlag) -> None:
        self.ctx = ctx
        self.started = started
        self.stop = stop
        self.step = started.start  # the optimizer steps done: failures name it

    def train(self) -> None:
        """Every step from the resumed one to the last; a SIGTERM ends it with an emergency
        checkpoint, waited for until committed, and Terminated."""
        import torch

        ctx, run = self.ctx, self.started
        config, ranks, engine, data, steps = ctx.config, ctx.ranks, run.engine, run.data, run.steps
        if self.stop.requested:
            raise Terminated("terminated before the first step; nothing to save")
        trace = SampleTrace.from_env(ranks)
        cadence = Cadence.of(config, steps.total_steps, has_validation=bool(data.validation))
        evaluator = Evaluator(config, ranks, ctx.device, data.validation)
        micro = config.schedule.micro_batch_size  # in effect: the operator may have reduced it
        loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float64)
        tokens = targets_in_window = 0
        window_start = time.monotonic()
        vote = StopOrCheckpointVote(
            self.stop, every_seconds=config.checkpoint.every_minutes * 60, start=run.start,
            device=ctx.device, timeout=ctx.collective_timeout,
        )  # fmt: skip
        engine.train()
        for step in range(run.start, steps.total_steps):
            faults.before_step(step, ranks.rank, micro)
            indices = steps.rank_indices(step, ranks.rank)
            global_targets = data.train.targets(steps.global_indices(step))
            batches = [
                [data.train[i] for i in indices[at : at + micro]] for at in range(0, len(indices), micro)
            ]
            loss_sum += token_loss.step(
                engine,
                (batch_inputs(config, b, ctx.device) for b in batches),
                global_targets,
                ranks.world_size,
            )
            tokens += sum(len(e.input_ids) for b in batches for e in b)
            targets_in_window += global_targets
            done = self.step = step + 1
            trace.record(done, [data.train[i].id for i in indices])
            agreed = vote.agree(done, last=done == steps.total_steps)
            decisions = cadence.after(done, stop=agreed.stop, time_due=agreed.time_due)
            if decisions.log:
                total_loss, total_tokens = process_group.all_reduce(
                    [float(loss_sum), float(tokens)], "sum", ctx.device
                )
                elapsed = time.monotonic() - window_start
                run.reporter.step(
                    done,
                    loss=total_loss / max(targets_in_window, 1),  # token-weighted over the window
                    tokens_per_second=total_tokens / max(elapsed, 1e-9),
                    learning_rate=float(engine.get_lr()[0]),
                )
                loss_sum.zero_()
                tokens = targets_in_window = 0
                window_start = time.monotonic()
            if decisions.evaluate:
                eval_loss = evaluator.loss(engine)
                if eval_loss is not None:
                    run.reporter.evaluation(done, eval_loss)
            if decisions.stop:
                vote.settle()
                self._plan_emergency(done)
                run.checkpointer.save(done, steps.position(done, data.key), block=True)
                raise Terminated(f"terminated: emergency checkpoint at step {done} committed")
            if decisions.checkpoint:
                run.checkpointer.save(done, steps.position(done, data.key), block=False)
                vote.checkpointed(done)

    def _plan_emergency(self, done: int) -> None:
        """Every rank at once: start the emergency save only if it can commit before the SIGKILL
        (grace.py); otherwise end now, saying which checkpoint the next attempt resumes from."""
        checkpointer = self.started.checkpointer
        main = self.ctx.ranks.is_main
        planned = grace.agreed_plan(
            self.ctx.device,
            step=done,
            deadline_at=grace.deadline(self.stop.at),
            last_save=checkpointer.last_save_seconds if main else None,
            in_flight=checkpointer.in_flight_estimate() if main else None,
            last_committed=checkpointer.last_committed if main else None,
        )
        if not planned.save:
            log.warning("%s", planned.why)
            raise Terminated(f"terminated at step {done}: {planned.why}")
        if main:
            log.info("%s", planned.why)
