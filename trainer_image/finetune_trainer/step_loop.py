"""The step loop: nothing in it waits on the device or on the other ranks beyond what DeepSpeed's
step needs. Tokens are counted on the host; the ranks agree on stopping and checkpointing through a
vote that overlaps the next step (agreement.py); what to do after each step is `cadence.py`'s, and
what a step minimises, what it reports and how it evaluates is the objective's (objectives.py)."""

from __future__ import annotations

import logging
import time

from finetune_trainer import faults, grace, process_group, tensor_parallel
from finetune_trainer.agreement import StopFlag, StopOrCheckpointVote
from finetune_trainer.cadence import Cadence
from finetune_trainer.failures import Terminated
from finetune_trainer.sample_trace import SampleTrace
from finetune_trainer.startup import RankContext, Started

log = logging.getLogger(__name__)


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
        objective = run.objective
        micro = config.schedule.micro_batch_size  # in effect: the operator may have reduced it
        loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float64)
        metric_sums = torch.zeros(len(objective.metric_names), device=ctx.device, dtype=torch.float64)
        tokens = counted_in_window = 0
        window_start = time.monotonic()
        vote = StopOrCheckpointVote(
            self.stop, every_seconds=config.checkpoint.every_minutes * 60, start=run.start,
            device=ctx.device, timeout=ctx.collective_timeout,
        )  # fmt: skip
        engine.train()
        for step in range(run.start, steps.total_steps):
            faults.before_step(step, ranks.rank, micro)
            indices = steps.rank_indices(step, ctx.layout.data_rank)
            global_count = objective.count(data.train, steps.global_indices(step))
            micro_batches = [indices[at : at + micro] for at in range(0, len(indices), micro)]
            sums = objective.step(engine, micro_batches, global_count, ctx.layout.data_size)
            loss_sum += sums.loss
            metric_sums += sums.metrics
            if ctx.layout.model_rank == 0:  # a model-parallel group's ranks train the same examples
                tokens += data.train.token_count(indices)
            counted_in_window += global_count
            done = self.step = step + 1
            trace.record(done, [data.train[i].id for i in indices])
            agreed = vote.agree(done, last=done == steps.total_steps)
            decisions = cadence.after(done, stop=agreed.stop, time_due=agreed.time_due)
            if decisions.log:
                share = tensor_parallel.report_share(config, ctx.layout)  # a TP group's sums once
                sums = [share * v for v in (float(loss_sum), float(tokens), *metric_sums.tolist())]
                total_loss, total_tokens, *totals = process_group.all_reduce(sums, "sum", ctx.device)
                elapsed = time.monotonic() - window_start
                window = max(counted_in_window, 1)  # every rank counted the whole global batch
                run.reporter.step(
                    done,
                    loss=total_loss / window,  # token-weighted (pair-weighted for dpo) over the window
                    tokens_per_second=total_tokens / max(elapsed, 1e-9),
                    learning_rate=float(engine.get_lr()[0]),
                    metrics={n: v / window for n, v in zip(objective.metric_names, totals, strict=True)},
                )
                loss_sum.zero_()
                metric_sums.zero_()
                tokens = counted_in_window = 0
                window_start = time.monotonic()
            if decisions.evaluate:
                evaluation = objective.evaluate(engine, data.validation)
                if evaluation is not None:
                    run.reporter.evaluation(done, evaluation.loss, evaluation.metrics)
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
