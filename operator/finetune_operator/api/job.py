"""The FineTuneJob resource: spec sections put together, the rules that span them, and the rules
that keep a started job's training semantics fixed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from finetune_operator import contract
from finetune_operator.api.base import ApiModel, Rule, ServerRule
from finetune_operator.api.gang import GangSpec
from finetune_operator.api.spec import (
    CheckpointSpec,
    DatasetSpec,
    DeepSpeedSpec,
    ModelSpec,
    OutputSpec,
    ParallelismSpec,
    PlacementSpec,
    ResourcesSpec,
    RunPolicy,
    TrainingSpec,
)
from finetune_operator.api.status import FineTuneJobStatus

API_VERSION = f"{contract.API_GROUP}/{contract.API_VERSION}"

# Child names are "<job>-a<attempt>-n<rank>" and double as pod hostnames (a DNS label, at most 63
# characters), so job names are kept short enough for 4-digit attempts and ranks.
MAX_JOB_NAME_LENGTH = 42
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Namespaces are RFC 1123 labels, as the API server validates metadata.namespace (`Team_A` is not one).
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# CEL for the number of training processes per node, mirroring ResourcesSpec.procs_per_node.
_PROCS_CEL = (
    "(has({r}.processesPerNode) ? {r}.processesPerNode : ({r}.gpusPerNode > 0 ? {r}.gpusPerNode : 1))"
)


def _world_cel(resources: str) -> str:
    return f"({resources}.nodes * {_PROCS_CEL.format(r=resources)})"


_MODEL_PARALLEL_CEL = "(self.parallelism.sequence * self.parallelism.tensor)"


def _divides_node(kind: str) -> Callable[[Any], bool]:
    return lambda s: bool(s.resources.procs_per_node % getattr(s.parallelism, kind) == 0)


def _parallelism_rules() -> tuple[Rule, ...]:
    procs = _PROCS_CEL.format(r="self.resources")
    per_node = [
        Rule(
            cel=f"{procs} % self.parallelism.{kind} == 0",
            message=f"parallelism.{kind} must divide the processes per node (resources.processesPerNode, "
            f"else gpusPerNode): a {kind}-parallel group talks every layer and stays inside a node",
            field=f"parallelism.{kind}",
            check=_divides_node(kind),
        )
        for kind in ("sequence", "tensor")
    ]
    return (
        *per_node,
        Rule(
            cel="self.parallelism.tensor == 1 || self.deepspeed.zeroStage <= 2",
            message="tensor parallelism (DeepSpeed AutoTP) runs with ZeRO 0-2: set deepspeed.zeroStage 2, "
            "or use ZeRO-3 alone",
            field="parallelism.tensor",
            check=lambda s: s.parallelism.tensor == 1 or s.deepspeed.zero_stage <= 2,
        ),
        Rule(
            cel="self.parallelism.tensor == 1 || self.training.method != 'lora'",
            message="tensor parallelism (AutoTP) does not split LoRA's adapter layers: set "
            "training.method full, or use ZeRO-3 or QLoRA (training.lora.quantization) to fit the base",
            field="parallelism.tensor",
            check=lambda s: s.parallelism.tensor == 1 or s.training.method != "lora",
        ),
        Rule(
            cel="self.parallelism.tensor == 1 || (self.training.objective != 'distill' "
            "&& !self.training.ligerKernels)",
            message="tensor parallelism trains objectives sft and dpo without Liger kernels (the teacher "
            "is not split, and Liger's fused loss reads the whole output layer AutoTP splits)",
            field="parallelism.tensor",
            check=lambda s: (
                s.parallelism.tensor == 1
                or (s.training.objective != "distill" and not s.training.liger_kernels)
            ),
        ),
        Rule(
            cel="self.parallelism.sequence == 1 || self.training.objective == 'sft'",
            message="sequence parallelism trains objective sft only for now: set parallelism.sequence 1 "
            "for dpo or distill",
            field="parallelism.sequence",
            check=lambda s: s.parallelism.sequence == 1 or s.training.objective == "sft",
        ),
        Rule(
            cel="self.parallelism.sequence == 1 || self.training.attentionImplementation != 'eager'",
            message="sequence parallelism needs sdpa or flash_attention_2 (eager builds a full attention "
            "mask of the whole sequence): set training.attentionImplementation",
            field="training.attentionImplementation",
            check=lambda s: s.parallelism.sequence == 1 or s.training.attention_implementation != "eager",
        ),
        Rule(
            cel="self.parallelism.sequence == 1 || !self.dataset.packing "
            "|| self.training.attentionImplementation == 'flash_attention_2'",
            message="with sequence parallelism only flash_attention_2 keeps packed documents apart (by "
            "their position ids; sdpa sees one causal sequence): set dataset.packing false or "
            "training.attentionImplementation flash_attention_2",
            field="dataset.packing",
            check=lambda s: (
                s.parallelism.sequence == 1
                or not s.dataset.packing
                or s.training.attention_implementation == "flash_attention_2"
            ),
        ),
        Rule(
            cel="!has(self.training.lora) || !has(self.training.lora.quantization) "
            "|| self.training.lora.quantization == 'none' || self.deepspeed.zeroStage <= 2",
            message="a 4-bit base (training.lora.quantization) is not partitioned by ZeRO-3: set "
            "deepspeed.zeroStage 2 (only the adapters train, so ZeRO-3 saves little)",
            field="training.lora.quantization",
            check=lambda s: (
                s.training.lora is None
                or s.training.lora.quantization == "none"
                or s.deepspeed.zero_stage <= 2
            ),
        ),
    )


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on which data, how, on which machines, and where checkpoints go."""

    model: ModelSpec
    dataset: DatasetSpec
    checkpoint: CheckpointSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    gang: GangSpec | None = Field(
        None,
        description="Gang scheduling through Kueue, Volcano or scheduler-plugins' Coscheduling. "
        "Left out: the ranks are scheduled one by one.",
    )

    rules = (
        Rule(
            cel="!has(self.gang) || self.gang.scheduler == 'Kueue' || !has(self.resources.schedulerName)",
            message="a Volcano or Coscheduling gang picks the pods' scheduler: set gang.schedulerName "
            "instead of resources.schedulerName",
            field="resources.schedulerName",
            check=lambda s: (
                s.gang is None or s.gang.scheduler == "Kueue" or s.resources.scheduler_name is None
            ),
        ),
        Rule(
            cel="!has(self.training.globalBatchSize) || self.training.globalBatchSize % "
            f"(self.training.microBatchSize * ({_world_cel('self.resources')} / {_MODEL_PARALLEL_CEL})) == 0",
            message="globalBatchSize must be a multiple of microBatchSize x data-parallel size (nodes x "
            "processes per node / (parallelism.sequence x parallelism.tensor)), so gradient accumulation "
            "is a whole number",
            field="training.globalBatchSize",
            check=lambda s: (
                s.training.global_batch_size is None
                or s.training.global_batch_size % (s.training.micro_batch_size * s.data_parallel_size) == 0
            ),
        ),
        *_parallelism_rules(),
        Rule(
            cel="!has(self.training.evalEverySteps) || self.dataset.validationFraction > 0.0",
            message="evalEverySteps needs held-out data: set dataset.validationFraction above 0",
            field="training.evalEverySteps",
            check=lambda s: s.training.eval_every_steps is None or s.dataset.validation_fraction > 0,
        ),
        Rule(
            cel="self.training.objective != 'dpo' || self.dataset.sources.all(s, s.shape == 'preference')",
            message="objective dpo trains on preference pairs: give every source shape preference",
            field="dataset.sources",
            check=lambda s: (
                s.training.objective != "dpo" or all(x.shape == "preference" for x in s.dataset.sources)
            ),
        ),
        Rule(
            cel="self.training.objective == 'dpo' || self.dataset.sources.all(s, s.shape != 'preference')",
            message="shape preference (chosen and rejected answers) trains only with training.objective "
            "dpo; set it, or give the source another shape",
            field="training.objective",
            check=lambda s: (
                s.training.objective == "dpo" or all(x.shape != "preference" for x in s.dataset.sources)
            ),
        ),
        Rule(
            cel="self.training.objective != 'dpo' || !self.dataset.packing",
            message="objective dpo pads each pair to its own length: set dataset.packing false",
            field="dataset.packing",
            check=lambda s: s.training.objective != "dpo" or not s.dataset.packing,
        ),
        Rule(
            cel="self.training.objective != 'dpo' || self.dataset.overlength != 'split'",
            message="a preference pair cannot be split into windows: set dataset.overlength truncate "
            "(both answers cut to maxSeqLength) or drop (the pair left out)",
            field="dataset.overlength",
            check=lambda s: s.training.objective != "dpo" or s.dataset.overlength != "split",
        ),
        Rule(
            # DeepSpeed's CPU accelerator has no fp16 ("Type fp16 is not supported on your device"),
            # which every restart would hit again; bf16 and fp32 run on CPU.
            cel="self.training.precision != 'fp16' || self.resources.gpusPerNode > 0",
            message="precision fp16 needs GPUs (resources.gpusPerNode above 0); on CPU use bf16 or fp32",
            field="training.precision",
            check=lambda s: s.training.precision != "fp16" or s.resources.gpus_per_node > 0,
        ),
    )

    @property
    def data_parallel_size(self) -> int:
        """Processes that train different sequences: the world over the model-parallel degree."""
        return self.resources.world_size // self.parallelism.model_parallel_size


class ObjectMeta(ApiModel):
    """The part of Kubernetes metadata the operator reads; the rest is kept as it is."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(pattern=JOB_NAME_PATTERN, max_length=MAX_JOB_NAME_LENGTH)]
    namespace: Annotated[str, Field(pattern=NAMESPACE_PATTERN, max_length=63)] = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


def _frozen_once_started(path: str, what: str, *, cel_value: str | None = None) -> ServerRule:
    new = cel_value.format(obj="self") if cel_value else f"self.{path}"
    old = cel_value.format(obj="oldSelf") if cel_value else f"oldSelf.{path}"
    return ServerRule(
        cel="!has(oldSelf.status) || !has(oldSelf.status.attempt) || oldSelf.status.attempt == 0 "
        f"|| {new} == {old}",
        message=f"{what} cannot change once the job has started: its checkpoints depend on it. "
        "Create a new FineTuneJob instead",
        field=path,
    )


# The stored phases in which a started job has no gang: the next attempt is created whole from the
# spec it then reads, and resumes from a checkpoint converted to the new world size (the trainer's
# universal.py). Queued, Starting and Running have an attempt's pods, which all share one world size.
RESHAPE_PHASES = ("Suspended", "Restarting")


def _world_size_rules() -> tuple[ServerRule, ...]:
    new, old = _world_cel("self.spec.resources"), _world_cel("oldSelf.spec.resources")
    not_started = "!has(oldSelf.status) || !has(oldSelf.status.attempt) || oldSelf.status.attempt == 0"
    phases = ", ".join(f"'{p}'" for p in RESHAPE_PHASES)
    return (
        ServerRule(
            cel=f"{not_started} || {new} == {old} "
            f"|| (has(oldSelf.status.phase) && oldSelf.status.phase in [{phases}])",
            message="The world size (resources.nodes x processes per node) cannot change while the job "
            "has pods: set runPolicy.suspend to true, wait for phase Suspended, then change it (also "
            "allowed while Restarting, between attempts); the next attempt resumes from the latest "
            "checkpoint converted to the new world size",
            field="spec.resources.nodes",
        ),
        ServerRule(
            # Left out, the global batch is microBatchSize x world size: it would change with it,
            # and the checkpoint's data position and learning-rate schedule with it.
            cel=f"{not_started} || {new} == {old} || has(self.spec.training.globalBatchSize)",
            message="The world size (resources.nodes x processes per node) can change only when "
            "training.globalBatchSize is set (left out, the global batch is microBatchSize x world size "
            "and would change with it); create a new FineTuneJob instead",
            field="spec.resources.nodes",
        ),
    )


def _optional(field: str) -> str:
    """An optional model string as a comparable value: left out reads as '' (never a valid value)."""
    return f"(has({{obj}}.spec.model.{field}) ? {{obj}}.spec.model.{field} : '')"


class FineTuneJob(ApiModel):
    """A distributed fine-tuning run of a Llama-family model with DeepSpeed."""

    api_version: Literal["finetune.dev/v1alpha1"] = Field("finetune.dev/v1alpha1", alias="apiVersion")
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    server_rules = (
        # Field by field rather than the whole section: model.tokenSecret is a credential, which a
        # started job may move to another Secret (rotation) without touching what it trains.
        _frozen_once_started("spec.model.source", "spec.model.source"),
        *(
            _frozen_once_started(f"spec.model.{f}", f"spec.model.{f}", cel_value=_optional(f))
            for f in ("revision", "tokenizer")
        ),
        _frozen_once_started("spec.model.trustRemoteCode", "spec.model.trustRemoteCode"),
        _frozen_once_started("spec.dataset", "spec.dataset"),
        _frozen_once_started("spec.training", "spec.training"),
        _frozen_once_started("spec.deepspeed", "spec.deepspeed"),
        _frozen_once_started("spec.parallelism", "spec.parallelism"),
        _frozen_once_started("spec.checkpoint.uri", "spec.checkpoint.uri"),
        *_world_size_rules(),
    )


class _UserManifest(FineTuneJob):
    """A FineTuneJob as a user writes it: apiVersion and kind are required (kubectl refuses an object
    without them), where Python code building a FineTuneJob may leave them to their defaults."""

    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]


def parse_manifest(manifest: dict[str, Any]) -> FineTuneJob:
    """Validate an object (as the API returns it, or as a backend stored it) into a FineTuneJob.

    Keys are read by their manifest (camelCase) names only, as the API server reads them.
    Raises pydantic.ValidationError; `finetune_operator.api.errors.describe` makes it readable.
    """
    return FineTuneJob.model_validate(manifest)


def validate_manifest(manifest: Any) -> FineTuneJob:
    """`parse_manifest` for what a user wrote (`ftjob validate`, `ftjob run`): apiVersion and kind
    required too, every problem reported at once."""
    _UserManifest.model_validate(manifest)
    return parse_manifest(manifest)
