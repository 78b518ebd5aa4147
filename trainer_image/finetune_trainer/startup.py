"""Everything one rank does before its first step: join the gang, fetch the model and the data, build
the DeepSpeed engine, resume from the newest checkpoint, and only then start the reporter, so its
ETA clock measures training and not the checkpoint download."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from finetune_operator import contract
from finetune_operator.api import TrainerConfig

from finetune_trainer import process_group, restart_records, sequence_parallel, tensor_parallel
from finetune_trainer.batch_schedule import BatchSchedule, schedule_for
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.checkpointing import Checkpointer
from finetune_trainer.coordination import Coordinator
from finetune_trainer.dropped import summary as data_summary
from finetune_trainer.ds_config import check as check_deepspeed_config
from finetune_trainer.ds_config import deepspeed_config, lr_at, parameter_groups, warmup_steps
from finetune_trainer.model import load_model, load_tokenizer, local_source
from finetune_trainer.objectives import Objective, objective_for
from finetune_trainer.parallel_layout import Layout
from finetune_trainer.prepared_data import PreparedData, prepare
from finetune_trainer.process_group import Ranks
from finetune_trainer.reporting import Reporter
from finetune_trainer.storage import ObjectStore, Opener, opener

log = logging.getLogger("finetune_trainer")


def scratch_dir(config: TrainerConfig, ranks: Ranks) -> Path:
    configured = os.environ.get(contract.ENV_SCRATCH_DIR)
    if configured:
        return Path(configured)
    return (
        Path(tempfile.gettempdir()) / f"ftjob-{config.job.namespace}-{config.job.name}-node{ranks.node_rank}"
    )


@dataclass(frozen=True)
class RankContext:
    """What every part of one rank's run shares: its place in the gang, its device, the phases it
    awaits with the others, its node's scratch disk, and the one route to every store."""

    config: TrainerConfig
    ranks: Ranks
    collective_timeout: timedelta
    device: Any
    phases: Coordinator
    scratch: Path
    open: Opener  # every store is opened with the job's endpoint and region, by this one route
    layout: Layout  # the data-parallel rank this process trains as

    @classmethod
    def join(cls, config: TrainerConfig) -> RankContext:
        ranks = process_group.from_env()
        collective_timeout = timedelta(seconds=config.timeouts.collective_seconds)
        device = process_group.init(ranks, collective_timeout)
        phases = Coordinator(process_group.default_store(), ranks, deadline=config.timeouts.phase_seconds)
        scratch = scratch_dir(config, ranks)
        scratch.mkdir(parents=True, exist_ok=True)
        return cls(config, ranks, collective_timeout, device, phases, scratch,
                   opener(config.checkpoint.endpoint_url, config.checkpoint.region),
                   Layout.of(config, ranks))  # fmt: skip


@dataclass
class Started:
    """A run ready for its first step (`start`), or at its end when it resumed from the last one."""

    engine: Any
    data: PreparedData
    steps: BatchSchedule
    checkpointer: Checkpointer
    reporter: Reporter
    start: int
    model_source: str
    tokenizer: Any
    job_store: ObjectStore
    keep_alive: Any  # must outlive the engine's use under ZeRO-3 (model.load_model)
    objective: Objective


def set_up(ctx: RankContext) -> Started:
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    config, ranks = ctx.config, ctx.ranks
    restarts = restart_records.gathered(ranks)  # before anything that can fail: a restart is reported
    job_store = ctx.open(config.checkpoint.job_uri)
    model_source = local_source(config.model.source, ctx.scratch / "models", ctx.phases, ctx.open)
    tensor_parallel.check(config, model_source)  # heads and MLP split at parallelism.tensor: exit 2
    tokenizer_source = (
        local_source(config.model.tokenizer, ctx.scratch / "models", ctx.phases, ctx.open)
        if config.model.tokenizer
        else model_source
    )
    tokenizer = load_tokenizer(config, tokenizer_source, ctx.open)
    data = prepare(config, tokenizer, job_store, ctx.scratch, ctx.phases, ctx.open)
    steps = schedule_for(config, len(data.train))
    ds_config = deepspeed_config(config, cpu=process_group.on_cpu())
    check_deepspeed_config(config, ds_config)  # before any weight loads: a bad override fails fast
    sequence_parallel.check(config, model_source, ds_config)  # before any weight loads
    model, keep_alive = load_model(config, model_source, ds_config)
    # Ulysses attention and its groups, or AutoTP's mesh (both layers refuse the two at once); None without
    mpu = sequence_parallel.register(config, model) or tensor_parallel.model_parallel_unit(config, ctx.layout)
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
        mpu=mpu,
    )
    checkpointer = Checkpointer(
        engine,
        CheckpointStore(job_store),
        ranks,
        nnodes=config.world.nnodes,
        local_root=ctx.scratch / "checkpoints",
        job_uri=config.checkpoint.job_uri,
        keep_last=config.checkpoint.keep_last,
        phases=ctx.phases,
    )
    objective = objective_for(ctx, engine, data, store=job_store, ds_config=ds_config)
    position = checkpointer.resume(config.checkpoint.resume, lambda uri: CheckpointStore(ctx.open(uri)))
    begin = position.global_step if position else 0
    if position and position.data_key not in (None, data.key):
        log.warning("the data changed since step %d was saved; continuing at the same position", begin)
    log.info(
        "%s at step %d of %d | %d train / %d validation examples | world %d",
        "resuming" if position else "starting", begin, steps.total_steps,
        len(data.train), len(data.validation), ranks.world_size,
    )  # fmt: skip
    reporter = Reporter(
        enabled=ranks.is_main,
        total_steps=steps.total_steps,
        start_step=begin,
        tensorboard_dir=ctx.scratch / "tensorboard" / f"attempt-{os.environ.get(contract.ENV_ATTEMPT, '0')}",
        data=data_summary(data.report),
        tensorboard_store=job_store,
        in_place_restarts=restarts,
    )
    checkpointer.report_to(reporter)
    return Started(engine, data, steps, checkpointer, reporter, begin, model_source, tokenizer, job_store,
                   keep_alive, objective)  # fmt: skip
