"""The trainer's resolved configuration: the spec with every default and derived number settled.

The operator renders it into each attempt's ConfigMap; the trainer validates it with this same model,
so the two sides cannot drift. Nothing secret is ever part of it.
"""

from __future__ import annotations

from pydantic import Field

from finetune_operator.api.base import ApiModel, ShortString, StorageUri
from finetune_operator.api.job import FineTuneJob
from finetune_operator.api.spec import DatasetSpec, DeepSpeedSpec, ModelSpec, ParallelismSpec, TrainingSpec

DEFAULT_LEARNING_RATE = {"full": 2e-5, "lora": 2e-4}
# Preference tuning moves a model that already answers well: TRL's DPOConfig default for full
# fine-tuning, ten times that for adapters (which start from zero).
DEFAULT_DPO_LEARNING_RATE = {"full": 1e-6, "lora": 1e-5}
DEFAULT_WARMUP_RATIO = 0.03


class JobIdentity(ApiModel):
    name: ShortString
    namespace: ShortString
    uid: str | None = None


class World(ApiModel):
    """How many processes train, and how they are laid out over node ranks."""

    nnodes: int = Field(ge=1)
    nproc_per_node: int = Field(ge=1)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


class Schedule(ApiModel):
    """Numbers the spec leaves to derivation, settled once so every rank agrees."""

    global_batch_size: int = Field(ge=1)
    micro_batch_size: int = Field(
        ge=1,
        description="The micro batch in effect: training.microBatchSize, or the smaller one the "
        "operator chose after an out-of-memory failure (status.microBatch). The trainer uses this one.",
    )
    gradient_accumulation_steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(ge=0, lt=1)


class Store(ApiModel):
    """This job's own area of the checkpoint store and how it is used."""

    job_uri: StorageUri = Field(
        description="<checkpoint.uri>/<namespace>/<job>: checkpoints/ and final/ live here."
    )
    endpoint_url: str | None = None
    region: str | None = None
    every_steps: int = Field(ge=0)
    every_minutes: int = Field(ge=0)
    keep_last: int = Field(ge=1)
    resume: str


class Timeouts(ApiModel):
    """runPolicy's deadlines the trainer enforces itself."""

    collective_seconds: int = Field(ge=1)
    phase_seconds: int = Field(ge=1)


class TrainerConfig(ApiModel):
    job: JobIdentity
    model: ModelSpec
    dataset: DatasetSpec
    training: TrainingSpec
    deepspeed: DeepSpeedSpec
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    world: World
    schedule: Schedule
    checkpoint: Store
    output_uri: StorageUri
    timeouts: Timeouts


def join_uri(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def job_store_uri(job: FineTuneJob) -> str:
    return join_uri(job.spec.checkpoint.uri, job.metadata.namespace, job.metadata.name)


def global_batch_size(job: FineTuneJob) -> int:
    """Sequences per optimizer step: as written, or one micro batch per data-parallel rank as written
    (never the reduced micro batch: reducing it keeps the global batch)."""
    training = job.spec.training
    return training.global_batch_size or training.micro_batch_size * job.spec.data_parallel_size


def micro_batch_in_effect(job: FineTuneJob) -> int:
    """The status's micro batch once the operator reduced it, else the spec's. The status is the
    only memory of it (an operator restarted at any moment reads it back), and the decide step
    changes it only in a pass that creates no pods, so the pass that creates an attempt's config
    always sees the size already written."""
    status = job.status.micro_batch if job.status else None
    return status.size if status is not None else job.spec.training.micro_batch_size


def default_learning_rate(training: TrainingSpec) -> float:
    table = DEFAULT_DPO_LEARNING_RATE if training.objective == "dpo" else DEFAULT_LEARNING_RATE
    return table[training.method]


def resolve_trainer_config(job: FineTuneJob) -> TrainerConfig:
    spec = job.spec
    world = World(nnodes=spec.resources.nodes, nproc_per_node=spec.resources.procs_per_node)
    micro = micro_batch_in_effect(job)
    per_step = micro * spec.data_parallel_size
    global_batch = global_batch_size(job)
    warmup_ratio = spec.training.warmup_ratio
    if warmup_ratio is None:
        warmup_ratio = 0.0 if spec.training.warmup_steps is not None else DEFAULT_WARMUP_RATIO
    store = job_store_uri(job)
    return TrainerConfig(
        job=JobIdentity(name=job.metadata.name, namespace=job.metadata.namespace, uid=job.metadata.uid),
        # The token reaches the trainer as env only; the config does not even name its Secret.
        model=spec.model.model_copy(update={"token_secret": None}),
        dataset=spec.dataset,
        training=spec.training,
        deepspeed=spec.deepspeed,
        parallelism=spec.parallelism,
        world=world,
        schedule=Schedule(
            global_batch_size=global_batch,
            micro_batch_size=micro,
            gradient_accumulation_steps=global_batch // per_step,
            learning_rate=spec.training.learning_rate or default_learning_rate(spec.training),
            warmup_steps=spec.training.warmup_steps,
            warmup_ratio=warmup_ratio,
        ),
        checkpoint=Store(
            job_uri=store,
            endpoint_url=spec.checkpoint.endpoint_url,
            region=spec.checkpoint.region,
            every_steps=spec.checkpoint.every_steps,
            every_minutes=spec.checkpoint.every_minutes,
            keep_last=spec.checkpoint.keep_last,
            resume=spec.checkpoint.resume,
        ),
        output_uri=spec.output.uri or join_uri(store, "final"),
        timeouts=Timeouts(
            collective_seconds=spec.run_policy.collective_timeout_seconds,
            phase_seconds=spec.run_policy.phase_timeout_seconds,
        ),
    )
