"""Out of memory adapts (policy/memory.py): an OutOfMemory failure restarts the gang with a smaller
micro batch and the same global batch, down to 1, then the job fails with OutOfMemory. Driven
through the decide step, with the status written to the wire and read back between passes as the
API server would (everything the policy remembers lives there)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from finetune_operator import contract
from finetune_operator.api import FineTuneJob, parse_manifest
from finetune_operator.api.status import FineTuneJobStatus, Phase
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.builders import build_config_map
from finetune_operator.jobview import JobView, describe
from finetune_operator.policy.actions import CreateAttempt, DeletePods
from finetune_operator.policy.decide import Decision, Observed, decide
from finetune_operator.policy.memory import smaller_size
from finetune_operator.policy.observed import observe_pod

from tests.support.factories import manifest
from tests.support.pods import JOB_UID, after, pod

OUT_OF_MEMORY = "out of memory at step 0 (micro batch 8 x 2048 tokens per rank): CUDA out of memory"


def _job(status: FineTuneJobStatus | None = None, **spec: Any) -> FineTuneJob:
    """Two node ranks of 2 GPUs (world 4), micro batch 8, global batch 64: accumulation 2."""
    changes = {
        "spec.resources.nodes": 2,
        "spec.resources.gpusPerNode": 2,
        "spec.training.microBatchSize": 8,
        "spec.training.globalBatchSize": 64,
        **{f"spec.{k.replace('__', '.')}": v for k, v in spec.items()},
    }
    data = manifest(changes)
    data["metadata"].update(uid=JOB_UID, generation=1)
    if status is not None:
        data["status"] = status.to_wire()  # as the API server stores it and hands it back
    return parse_manifest(data)


def _pass(job: FineTuneJob, pods: list[dict[str, Any]], now: datetime) -> Decision:
    observed = tuple(observe_pod(p) for p in pods)
    return decide(Observed(job=job, pods=observed, service_exists=True, now=now))


def _later(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


def _running(job: FineTuneJob, started: datetime) -> FineTuneJobStatus:
    """Start the job's next attempt (its pods gone, or none yet) and see all its ranks running."""
    start = _pass(job, [], started)
    gang = [pod(rank=r, attempt=start.status.attempt) for r in range(2)]
    return _pass(_job(start.status), gang, _later(started, 1)).status


def _oom(job: FineTuneJob, now: datetime) -> Decision:
    """Rank 0 of the current attempt exits 4 (out of memory), rank 1 still runs."""
    attempt = job.status.attempt if job.status else 1
    failed = pod(rank=0, attempt=attempt, phase="Failed", exit_code=4, message=OUT_OF_MEMORY)
    return _pass(job, [failed, pod(rank=1, attempt=attempt)], now)


def _condition(status: FineTuneJobStatus, kind: str) -> Any:
    return next(c for c in status.conditions if c.type == kind)


def _config(job: FineTuneJob, attempt: int) -> TrainerConfig:
    data = build_config_map(job, attempt)["data"][contract.CONFIG_FILE_NAME]
    return TrainerConfig.model_validate(json.loads(data))


@pytest.mark.parametrize(
    ("size", "smaller"),
    [(8, 4), (4, 2), (2, 1), (1, None), (6, 3), (12, 6), (9, 3), (3, 1), (7, 1), (4096, 2048)],
)
def test_the_next_micro_batch_is_the_largest_proper_divisor(size: int, smaller: int | None) -> None:
    """Half when even; an odd size takes the largest size that still divides it, so the accumulation
    stays a whole number and the global batch stays exact."""
    assert smaller_size(size) == smaller


def test_the_first_attempt_shows_the_specs_micro_batch_in_status() -> None:
    micro = _pass(_job(), [], after(0)).status.micro_batch
    assert micro is not None
    assert (micro.size, micro.gradient_accumulation_steps, micro.reason) == (8, 2, "Spec")


def test_out_of_memory_is_halved_again_and_again_down_to_1_then_fails_with_out_of_memory() -> None:
    job, now, seen = _job(), after(0), []
    while True:
        job = _job(_running(job, now))
        d = _oom(job, _later(now, 5))
        if d.status.phase != Phase.RESTARTING:
            break
        assert d.status.micro_batch is not None
        seen.append((d.status.micro_batch.size, d.status.micro_batch.gradient_accumulation_steps))
        job, now = _job(d.status), _later(now, 10)
    assert seen == [(4, 4), (2, 8), (1, 16)]
    assert d.status.phase == Phase.FAILED
    assert _condition(d.status, "Failed").reason == "OutOfMemory"
    assert (d.status.restarts, d.status.infra_restarts, d.status.attempt) == (0, 0, 4)


def test_with_adaptation_off_out_of_memory_fails_the_job_at_once() -> None:
    job = _job(_running(_job(), after(0)), runPolicy__adaptMicroBatchOnOutOfMemory=False)
    d = _oom(job, after(5))
    assert d.status.phase == Phase.FAILED and _condition(d.status, "Failed").reason == "OutOfMemory"
    assert d.status.micro_batch is not None and d.status.micro_batch.size == 8


def test_the_global_batch_is_unchanged_at_every_micro_batch() -> None:
    job = _job(_running(_job(), after(0)))
    for attempt in (2, 3, 4):
        job = _job(_oom(job, after(5)).status)
        config = _config(job, attempt)
        schedule, world = config.schedule, config.world.world_size
        assert schedule.micro_batch_size * schedule.gradient_accumulation_steps * world == 64
        assert schedule.global_batch_size == 64
        job = _job(_running(job, after(10)))


def test_a_reduction_is_not_counted_toward_max_restarts() -> None:
    job = _job(_running(_job(), after(0)), runPolicy__maxRestarts=0)
    d = _oom(job, after(5))
    assert d.status.phase == Phase.RESTARTING and d.status.restarts == 0
    assert _condition(d.status, "Restarting").reason == "MicroBatchReduced"


def test_the_failed_attempts_pods_are_deleted_and_the_next_starts_without_backoff() -> None:
    failed = _oom(_job(_running(_job(), after(0))), after(5))
    assert DeletePods(("demo-a1-n0", "demo-a1-n1")) in failed.actions
    d = _pass(_job(failed.status), [], after(5))  # the pods are gone, not a second later
    assert CreateAttempt(2, (0, 1)) in d.actions and d.status.attempt == 2


def test_the_next_attempts_trainer_config_carries_the_reduced_micro_batch() -> None:
    """The status written by the failing pass is what the starting pass builds the config from."""
    failed = _oom(_job(_running(_job(), after(0))), after(5))
    starting = _job(_pass(_job(failed.status), [], after(6)).status)
    config = _config(starting, 2)
    assert (config.schedule.micro_batch_size, config.schedule.gradient_accumulation_steps) == (4, 4)
    assert config.training.micro_batch_size == 8  # the spec as written stays as it was


def test_events_name_the_out_of_memory_and_the_next_attempts_batch() -> None:
    d = _oom(_job(_running(_job(), after(0))), after(5))
    assert [(e.type, e.reason) for e in d.events] == [
        ("Warning", "RankFailed"),
        ("Normal", "MicroBatchReduced"),
    ]
    assert "out of memory" in d.events[0].message
    assert d.events[1].message.startswith(
        "attempt 2 with micro batch 4 x 4 accumulation (global batch 64 unchanged)"
    )


def test_status_says_why_and_since_when() -> None:
    micro = _oom(_job(_running(_job(), after(0))), after(5)).status.micro_batch
    assert micro is not None and (micro.reason, micro.since) == ("OutOfMemory", after(5))
    assert micro.message == "attempt 1 ran out of memory at micro batch 8 x 2 accumulation"


def test_the_reduced_micro_batch_stays_through_later_restarts() -> None:
    job = _job(_running(_job(_oom(_job(_running(_job(), after(0))), after(5)).status), after(10)))
    crashed = pod(rank=1, attempt=2, phase="Failed", exit_code=1, message="boom")
    d = _pass(_job(_pass(job, [pod(rank=0, attempt=2), crashed], after(300)).status), [], after(400))
    assert d.status.attempt == 3 and d.status.micro_batch is not None
    assert (d.status.micro_batch.size, d.status.micro_batch.reason) == (4, "OutOfMemory")


def test_time_lost_to_a_reduction_is_charged_to_application_restarts() -> None:
    failed = _oom(_job(_running(_job(), after(0))), after(5))
    later = _pass(_job(failed.status), [pod(rank=0, deleting=True), pod(rank=1, deleting=True)], after(35))
    assert later.status.goodput is not None
    assert later.status.goodput.application_restart_seconds == pytest.approx(30)
    assert later.status.goodput.infrastructure_restart_seconds == 0


def test_a_failure_other_than_out_of_memory_leaves_the_micro_batch_alone() -> None:
    job = _job(_running(_job(), after(0)))
    crashed = pod(rank=0, phase="Failed", exit_code=1, message="boom")
    d = _pass(job, [crashed, pod(rank=1)], after(300))
    assert d.status.restarts == 1 and d.status.micro_batch is not None and d.status.micro_batch.size == 8


def test_without_a_global_batch_size_the_specs_one_micro_batch_per_rank_is_kept() -> None:
    job = _job(_running(_job(training__globalBatchSize=None), after(0)), training__globalBatchSize=None)
    failed = _job(_oom(job, after(5)).status, training__globalBatchSize=None)
    schedule = _config(failed, 2).schedule
    assert schedule.global_batch_size == 32  # 8 x world 4, as written
    assert (schedule.micro_batch_size, schedule.gradient_accumulation_steps) == (4, 2)


def test_the_micro_batch_survives_a_status_round_trip_through_json() -> None:
    """An operator restarted mid-restart knows the micro batch from the stored status alone."""
    status = _oom(_job(_running(_job(), after(0))), after(5)).status
    stored = json.loads(json.dumps(status.to_wire()))
    assert stored["microBatch"] == {
        "size": 4,
        "gradientAccumulationSteps": 4,
        "reason": "OutOfMemory",
        "message": "attempt 1 ran out of memory at micro batch 8 x 2 accumulation",
        "since": "2026-01-01T12:00:05Z",
    }
    assert FineTuneJobStatus.model_validate(stored) == status


def test_describe_shows_the_micro_batch_in_effect_and_why() -> None:
    status = _oom(_job(_running(_job(), after(0))), after(5)).status
    text = describe(JobView(body=_job(status).to_wire()))
    assert (
        "Micro batch:  4 x 4 accumulation (OutOfMemory: attempt 1 ran out of memory at micro batch 8 x 2 "
        "accumulation)" in text
    )
