"""FineTuneJob status: what the operator observed and what the job reported, nothing else.

kopf keeps its own bookkeeping in annotations, so every field here means what its description says.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, Strict

from finetune_operator.api.base import ApiModel, ShortString, StorageUri

# Values the API hands back as strings.
Timestamp = Annotated[datetime, Strict(False)]


class Phase(StrEnum):
    PENDING = "Pending"  # accepted, no pods yet
    QUEUED = "Queued"  # spec.gang: the attempt's gang waits for its scheduler to admit it whole
    STARTING = "Starting"  # pods of the current attempt exist, not all running
    RUNNING = "Running"  # every rank of the current attempt is running
    RESTARTING = "Restarting"  # a rank failed; the gang is being torn down or backing off
    SUSPENDED = "Suspended"  # spec.runPolicy.suspend: no pods, status kept
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})
ACTIVE_PHASES = frozenset({Phase.QUEUED, Phase.STARTING, Phase.RUNNING, Phase.RESTARTING})


class Condition(ApiModel):
    """A Kubernetes-style condition (Running, Succeeded, Failed, Suspended, Restarting, Queued,
    WaitingForCapacity)."""

    type: ShortString
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(max_length=1024)] | None = None
    message: Annotated[str, Field(max_length=32768)] | None = None
    last_transition_time: Timestamp | None = None


class RankCounts(ApiModel):
    """Pods of the current attempt by state."""

    total: int = Field(0, ge=0)
    pending: int = Field(0, ge=0)
    running: int = Field(0, ge=0)
    succeeded: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)


class DataSourceReport(ApiModel):
    """What became of one dataset source's records (the trainer's data report)."""

    name: str = Field(max_length=253)
    read: int = Field(0, ge=0, description="Records read.")
    kept: int = Field(0, ge=0, description="Records planned for training or validation.")
    duplicates: int = Field(0, ge=0, description="Exact duplicates removed.")
    empty: int = Field(0, ge=0, description="Records with nothing to learn (blank, no answer).")
    dropped: int = Field(
        0,
        ge=0,
        description="Records lost: malformed when read, or unencodable or without a target when tokenized.",
    )
    reasons: dict[str, int] = Field(
        default_factory=dict, max_length=8, description="The most frequent reasons records were dropped."
    )


class InPlaceRestart(ApiModel):
    """One restart of an attempt's training processes inside its running pods, as rank 0 of the
    restarted processes reports it; the operator counts each (attempt, number) once."""

    attempt: int = Field(ge=1, description="The attempt whose processes restarted.")
    number: int = Field(ge=1, description="Which of the attempt's in-place restarts (1 = the first).")
    at: Timestamp = Field(description="When the failure that caused it was seen.")
    exit_code: int = Field(description="The failed rank's exit code.")
    reason: Annotated[str, Field(max_length=1024)] = Field(description="The failed rank's reason.")


class ObjectiveMetrics(ApiModel):
    """The objective's own parts, averaged like the loss since the previous report (training) or over
    the held-out data (eval*). DPO: the implicit rewards, beta x log(policy / reference) of each
    answer, per pair (TRL's rewards/chosen, rejected, margins, accuracies). Distillation: its two
    terms per target token."""

    rewards_chosen: float | None = Field(None, description="DPO: mean reward of the chosen answers.")
    rewards_rejected: float | None = Field(None, description="DPO: mean reward of the rejected answers.")
    rewards_margin: float | None = Field(None, description="DPO: mean of chosen minus rejected reward.")
    rewards_accuracy: float | None = Field(
        None, ge=0, le=1, description="DPO: share of pairs whose chosen reward is the higher."
    )
    eval_rewards_margin: float | None = Field(None, description="DPO: rewardsMargin on held-out pairs.")
    eval_rewards_accuracy: float | None = Field(
        None, ge=0, le=1, description="DPO: rewardsAccuracy on held-out pairs."
    )
    divergence: float | None = Field(
        None, description="Distillation: the divergence from the teacher (distillation.beta's), per token."
    )
    cross_entropy: float | None = Field(
        None, description="Distillation: cross-entropy on the data's tokens, per token."
    )
    eval_divergence: float | None = Field(None, description="Distillation: divergence on held-out data.")
    eval_cross_entropy: float | None = Field(
        None, description="Distillation: cross-entropy on held-out data."
    )


class Progress(ApiModel):
    """Training progress as reported by rank 0."""

    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps in the whole run.")
    percent: float | None = Field(None, ge=0, le=100, description="step / totalSteps, in percent.")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds to the end of training.")
    loss: float | None = Field(None, description="Training loss, averaged since the previous report.")
    eval_loss: float | None = Field(None, description="Latest evaluation loss.")
    tokens_per_second: float | None = Field(None, ge=0, description="Training throughput over all ranks.")
    checkpoint_stall_seconds: float | None = Field(
        None,
        ge=0,
        description="Seconds training waited on checkpoint saves in this attempt (cumulative), "
        "when the trainer reports it.",
    )
    metrics: ObjectiveMetrics | None = Field(
        None, description="The objective's parts (dpo, distill); none for sft, whose loss says it all."
    )
    updated_at: Timestamp | None = Field(None, description="When rank 0 reported this.")
    data: list[DataSourceReport] | None = Field(
        None, max_length=64, description="What cleaning and tokenization did to each dataset source."
    )
    in_place_restarts: list[InPlaceRestart] | None = Field(
        None, max_length=16, description="This attempt's in-place restarts so far (the newest 16)."
    )


class CheckpointRef(ApiModel):
    """A committed checkpoint (its manifest exists)."""

    step: int = Field(ge=0)
    uri: StorageUri
    time: Timestamp | None = None
    duration_seconds: float | None = Field(
        None,
        ge=0,
        description="How long this save took, from its snapshot to its commit (snapshot, write, upload "
        "and commit; not the wait for the save before it): what an emergency checkpoint on SIGTERM "
        "needs of the grace period.",
    )


class Goodput(ApiModel):
    """Where the job's wall-clock time went, suspended time left out: training, or lost to queueing
    (waiting for the first attempt's pods, or a resumed one's), to restarts by class (from the
    failure until every rank runs again), and to checkpoint stalls (as the trainer reports them)."""

    productive_seconds: float = Field(
        0.0, ge=0, description="Every rank running, checkpoint stalls included."
    )
    queued_seconds: float = Field(
        0.0, ge=0, description="Waiting for the first (or a resumed) attempt to run."
    )
    application_restart_seconds: float = Field(
        0.0,
        ge=0,
        description="From an application failure until the next attempt trains a step it had "
        "not reached before (restart, reload, redone steps).",
    )
    infrastructure_restart_seconds: float = Field(
        0.0,
        ge=0,
        description="From an eviction, preemption or lost node until the next attempt trains a "
        "step it had not reached before.",
    )
    checkpoint_stall_seconds: float = Field(
        0.0, ge=0, description="Training time spent waiting on checkpoint saves (trainer-reported)."
    )
    percent: float | None = Field(
        None, ge=0, le=100, description="Productive time less checkpoint stalls, over all accounted time."
    )
    accounted_until: Timestamp | None = Field(None, description="The time the figures above run to.")
    waiting_for: Literal["Queue", "Application", "Infrastructure"] | None = Field(
        None, description="What the current Starting phase is charged to."
    )
    stalls_before_attempt: float = Field(
        0.0, ge=0, description="Checkpoint stalls of the attempts before the current one."
    )
    step_reached: int | None = Field(None, ge=0, description="The highest step any attempt reported.")
    redo_until_step: int | None = Field(
        None,
        ge=0,
        description="The highest step reached before the current attempt, which redoes the "
        "steps from its checkpoint up to there: after a restart, that time is lost to the restart.",
    )


class CreateRefusal(ApiModel):
    """The API server refused to create a child of the current attempt (admission: ResourceQuota,
    LimitRange, Pod Security, a webhook; or validation). Recorded by the apply step, so the decide
    step sees it as observed state."""

    attempt: int = Field(ge=0, description="The attempt whose child was refused.")
    code: int = Field(ge=100, le=599, description="The HTTP status of the refusal (403, 422, ...).")
    reason: Annotated[str, Field(max_length=128)] = Field(
        description="The API's reason for it (Forbidden, Invalid, BadRequest)."
    )
    message: Annotated[str, Field(max_length=1024)] = Field(
        description="The API's message (never the request body)."
    )
    since: Timestamp = Field(description="The first refusal of this attempt.")
    last: Timestamp = Field(description="The latest refusal.")


class MicroBatch(ApiModel):
    """The micro batch the ranks train with, and why: training.microBatchSize as written, or a
    smaller one after an out-of-memory failure (runPolicy.adaptMicroBatchOnOutOfMemory). The global
    batch never changes: gradient accumulation grows by the factor the micro batch shrank. This is
    what later attempts read, so it stays for the rest of the job."""

    size: int = Field(ge=1, description="Sequences per process per forward pass.")
    gradient_accumulation_steps: int = Field(
        ge=1, description="Micro batches per optimizer step on each process."
    )
    reason: Literal["Spec", "OutOfMemory"] = Field(
        description="Spec: training.microBatchSize as written; OutOfMemory: reduced after an "
        "out-of-memory failure."
    )
    message: Annotated[str, Field(max_length=1024)] | None = Field(
        None, description="What happened, e.g. which attempt ran out of memory at which micro batch."
    )
    since: Timestamp | None = Field(None, description="When this micro batch took effect.")


class FineTuneJobStatus(ApiModel):
    phase: Annotated[Phase, Strict(False)] | None = Field(
        None, description="Where the job is in its lifecycle."
    )
    conditions: list[Condition] = Field(default_factory=list, max_length=32)
    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation this status reflects."
    )
    attempt: int = Field(0, ge=0, description="Current gang attempt; 0 before the first pods exist.")
    restarts: int = Field(0, ge=0, description="Gang restarts counted toward runPolicy.maxRestarts.")
    infra_restarts: int = Field(
        0,
        ge=0,
        description="Gang restarts after evictions, preemptions and lost nodes "
        "(counted toward runPolicy.maxInfrastructureRestarts, not maxRestarts).",
    )
    in_place_restarts: int = Field(
        0,
        ge=0,
        description="Of the restarts, those made in place: the training processes restarted inside the "
        "running pods (runPolicy.inPlaceRestarts).",
    )
    attempt_in_place_restarts: int = Field(
        0, ge=0, description="In-place restarts of the current attempt counted so far."
    )
    restart_class: Literal["Application", "Infrastructure"] | None = Field(
        None, description="The class of the latest gang restart: its backoff doubles with that class's count."
    )
    suspended_seconds: float = Field(
        0.0, ge=0, description="Time spent suspended; left out of activeDeadlineSeconds."
    )
    ranks: RankCounts = Field(default_factory=RankCounts)
    start_time: Timestamp | None = None
    completion_time: Timestamp | None = None
    progress: Progress | None = None
    latest_checkpoint: CheckpointRef | None = None
    goodput: Goodput | None = Field(None, description="Where the job's time went.")
    create_refusal: CreateRefusal | None = Field(
        None, description="The API server's latest refusal to create a child of the current attempt."
    )
    micro_batch: MicroBatch | None = Field(
        None, description="The micro batch and gradient accumulation in effect, and why."
    )
    grace_period_warning: Annotated[str, Field(max_length=1024)] | None = Field(
        None,
        description="Set while runPolicy.terminationGracePeriodSeconds is too short for the job's "
        "measured checkpoint save (latestCheckpoint.durationSeconds): on SIGTERM the emergency "
        "checkpoint would be skipped.",
    )
