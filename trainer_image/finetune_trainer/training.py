"""One rank's run: set up, resume, train step by step, checkpoint, evaluate, export.

Every decision that all ranks must share (stop for SIGTERM, checkpoint because time is up) is taken
together: after each optimizer step the ranks all-reduce two flags, so no rank ever waits in a
collective the others skipped.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from finetune_operator import contract
from finetune_operator.api import TrainerConfig

from finetune_trainer import ranks as dist
from finetune_trainer import token_loss
from finetune_trainer.agreement import StopFlag, StopOrCheckpointVote
from finetune_trainer.cadence import Cadence
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.checkpointing import Checkpointer
from finetune_trainer.coordination import Coordinator
from finetune_trainer.dropped import summary as data_summary
from finetune_trainer.ds_config import check as check_deepspeed_config
from finetune_trainer.ds_config import deepspeed_config, lr_at, parameter_groups, warmup_steps
from finetune_trainer.encoding import IGNORE_INDEX, Example, collate, model_inputs
from finetune_trainer.example_table import ExampleTable
from finetune_trainer.export import export, exported_step
from finetune_trainer.failures import Terminated
from finetune_trainer.model import load_model, load_tokenizer, local_source
from finetune_trainer.position import DataPosition
from finetune_trainer.prepared_data import PreparedData, prepare
from finetune_trainer.reporting import Reporter
from finetune_trainer.sample_trace import SampleTrace
from finetune_trainer.step_plan import StepPlan, plan
from finetune_trainer.storage import opener

log = logging.getLogger("finetune_trainer")


def scratch_dir(config: TrainerConfig, ranks: dist.Ranks) -> Path:
    configured = os.environ.get(contract.ENV_SCRATCH_DIR)
    if configured:
        return Path(configured)
    return (
        Path(tempfile.gettempdir()) / f"ftjob-{config.job.namespace}-{config.job.name}-node{ranks.node_rank}"
    )


class Run:
    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        self.stop = StopFlag()
        self.ranks = dist.from_env()
        self.collective_timeout = timedelta(seconds=config.timeouts.collective_seconds)
        self.device = dist.init(self.ranks, self.collective_timeout)
        self.phases = Coordinator(dist.default_store(), self.ranks, deadline=config.timeouts.phase_seconds)
        self.scratch = scratch_dir(config, self.ranks)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.step = 0
        # Every store the run touches is opened with the job's endpoint and region, by this one route.
        self._open = opener(config.checkpoint.endpoint_url, config.checkpoint.region)

    def execute(self) -> None:
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        config, ranks = self.config, self.ranks
        job_store = self._open(config.checkpoint.job_uri)
        model_source = local_source(config.model.source, self.scratch / "models", self.phases, self._open)
        tokenizer_source = (
            local_source(config.model.tokenizer, self.scratch / "models", self.phases, self._open)
            if config.model.tokenizer
            else model_source
        )
        tokenizer = load_tokenizer(config, tokenizer_source, self._open)
        data = prepare(config, tokenizer, job_store, self.scratch, self.phases, self._open)
        steps = plan(config, len(data.train))
        ds_config = deepspeed_config(config, cpu=dist.on_cpu())
        check_deepspeed_config(config, ds_config)  # before any weight loads: a bad override fails fast
        model, keep_alive = load_model(config, model_source, ds_config)
        warmup = warmup_steps(config, steps.total_steps)

        def schedule(optimizer: Any) -> Any:
            return LambdaLR(
                optimizer,
                lambda s: lr_at(
                    s, total_steps=steps.total_steps, warmup=warmup, schedule=config.training.lr_schedule
                ),
            )

        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=parameter_groups(model.named_parameters(), config.training.weight_decay),
            config=ds_config,
            lr_scheduler=schedule,
        )
        checkpointer = Checkpointer(
            engine,
            CheckpointStore(job_store),
            ranks,
            nnodes=config.world.nnodes,
            local_root=self.scratch / "checkpoints",
            job_uri=config.checkpoint.job_uri,
            keep_last=config.checkpoint.keep_last,
            phases=self.phases,
        )
        position = checkpointer.resume(config.checkpoint.resume, lambda uri: CheckpointStore(self._open(uri)))
        start = position.global_step if position else 0
        if position and position.data_key not in (None, data.key):
            log.warning("the data changed since step %d was saved; continuing at the same position", start)
        log.info(
            "%s at step %d of %d | %d train / %d validation examples | world %d",
            "resuming" if position else "starting", start, steps.total_steps,
            len(data.train), len(data.validation), ranks.world_size,
        )  # fmt: skip
        # Built once resumed: its ETA clock measures training, not the checkpoint download.
        reporter = Reporter(
            enabled=ranks.is_main,
            total_steps=steps.total_steps,
            start_step=start,
            tensorboard_dir=self.scratch
            / "tensorboard"
            / f"attempt-{os.environ.get(contract.ENV_ATTEMPT, '0')}",
            data=data_summary(data.report),
            tensorboard_store=job_store,
        )
        checkpointer.report_to(reporter)
        self.step = start
        self._train(engine, data, steps, checkpointer, reporter, start)
        checkpointer.save_last(steps.total_steps, self._position(steps, steps.total_steps, data))
        output = self._open(config.output_uri)
        # Rank 0 decides for all: a rank that looked later could see the new export's manifest and
        # skip the gather (a collective under ZeRO-3) the others are waiting in.
        exported = self.phases.on_main("the export check", lambda: exported_step(output) == steps.total_steps)
        if not exported:
            export(config, engine, step=steps.total_steps, base_source=model_source, tokenizer=tokenizer,
                   store=output, scratch=self.scratch, phases=self.phases)  # fmt: skip
        reporter.close()  # and its last TensorBoard upload
        del keep_alive
        dist.shutdown()

    def _position(self, steps: StepPlan, step: int, data: PreparedData) -> DataPosition:
        return steps.position(step, data.key)

    def _batch(self, examples: list[Example]) -> dict[str, Any]:
        pad_id = 0  # masked out of attention and loss, so any id serves
        columns = collate(
            examples,
            pad_id,
            self.config.dataset.max_seq_length,
            packed=self.config.dataset.packing,
            flatten=self.config.training.attention_implementation == "flash_attention_2",
        )
        return model_inputs(columns, self.device)

    def _train(self, engine: Any, data: PreparedData, steps: StepPlan, checkpointer: Checkpointer,
               reporter: Reporter, start: int) -> None:  # fmt: skip
        """The step loop: nothing in it waits on the device or on the other ranks beyond what
        DeepSpeed's step needs. Tokens are counted on the host, and the ranks agree on stopping and
        checkpointing through a vote that overlaps the next step (agreement.py)."""
        import torch

        config, ranks = self.config, self.ranks
        if self.stop.requested:
            raise Terminated("terminated before the first step; nothing to save")
        trace = SampleTrace.from_env(ranks)
        cadence = Cadence.of(config, steps.total_steps, has_validation=bool(data.validation))
        micro = config.training.micro_batch_size
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens = targets_in_window = 0
        window_start = time.monotonic()
        vote = StopOrCheckpointVote(
            self.stop, every_seconds=config.checkpoint.every_minutes * 60, start=start,
            device=self.device, timeout=self.collective_timeout,
        )  # fmt: skip
        engine.train()
        for step in range(start, steps.total_steps):
            indices = steps.rank_indices(step, ranks.rank)
            global_targets = data.train.targets(steps.global_indices(step))
            batches = [
                [data.train[i] for i in indices[at : at + micro]] for at in range(0, len(indices), micro)
            ]
            loss_sum += token_loss.step(
                engine, (self._batch(b) for b in batches), global_targets, ranks.world_size
            )
            tokens += sum(len(e.input_ids) for b in batches for e in b)
            targets_in_window += global_targets
            done = self.step = step + 1
            trace.record(done, [data.train[i].id for i in indices])
            agreed = vote.agree(done, last=done == steps.total_steps)
            decisions = cadence.after(done, stop=agreed.stop, time_due=agreed.time_due)
            if decisions.log:
                total_loss, total_tokens = dist.all_reduce(
                    [float(loss_sum), float(tokens)], "sum", self.device
                )
                elapsed = time.monotonic() - window_start
                reporter.step(
                    done,
                    loss=total_loss / max(targets_in_window, 1),  # token-weighted over the window
                    tokens_per_second=total_tokens / max(elapsed, 1e-9),
                    learning_rate=float(engine.get_lr()[0]),
                )
                loss_sum.zero_()
                tokens = targets_in_window = 0
                window_start = time.monotonic()
            if decisions.evaluate:
                eval_loss = self._evaluate(engine, data.validation)
                if eval_loss is not None:
                    reporter.evaluation(done, eval_loss)
            if decisions.stop:
                vote.settle()
                checkpointer.save(done, self._position(steps, done, data), block=True)
                raise Terminated(f"terminated: emergency checkpoint at step {done} committed")
            if decisions.checkpoint:
                checkpointer.save(done, self._position(steps, done, data), block=False)
                vote.checkpointed(done)

    def _evaluate(self, engine: Any, examples: ExampleTable) -> float | None:
        """Mean loss per target token over the validation set; equal shares per rank, since ZeRO-3
        gathers parameters collectively on every forward."""
        import torch

        per_rank = len(examples) // self.ranks.world_size
        if per_rank == 0:
            return None
        first = self.ranks.rank * per_rank
        micro = self.config.training.micro_batch_size
        loss_sum, counted = 0.0, 0.0
        engine.eval()
        with torch.no_grad():
            for at in range(first, first + per_rank, micro):
                batch = self._batch([examples[i] for i in range(at, min(at + micro, first + per_rank))])
                targets = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                loss_sum += float(engine(**batch).loss) * targets
                counted += targets
        engine.train()
        total, count = dist.all_reduce([loss_sum, counted], "sum", self.device)
        return total / count if count else None
