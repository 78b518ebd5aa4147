"""Goodput accounting: each pass charges the time since the last one to what the job was doing."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator.api.status import Condition, FineTuneJobStatus, Phase, Progress
from finetune_operator.policy.goodput import account, start_attempt

from tests.support.pods import after


def _status(phase: Phase | None, *, until: float | None, **extra: Any) -> FineTuneJobStatus:
    goodput = {"accountedUntil": after(until).isoformat()} if until is not None else {}
    goodput.update(extra.pop("goodput", {}))
    return FineTuneJobStatus.model_validate({"phase": phase, "goodput": goodput, **extra})


def _charged(before: FineTuneJobStatus, seconds: float) -> FineTuneJobStatus:
    after_ = before.model_copy(deep=True)
    account(before, after_, after(seconds))
    return after_


@pytest.mark.parametrize(
    ("phase", "extra", "field"),
    [
        (Phase.RUNNING, {}, "productive_seconds"),
        (Phase.STARTING, {}, "queued_seconds"),
        (Phase.PENDING, {}, "queued_seconds"),
        (Phase.RESTARTING, {"restartClass": "Infrastructure"}, "infrastructure_restart_seconds"),
        (Phase.RESTARTING, {"restartClass": "Application"}, "application_restart_seconds"),
        (Phase.STARTING, {"goodput": {"waitingFor": "Infrastructure"}}, "infrastructure_restart_seconds"),
    ],
)
def test_time_is_charged_to_what_the_job_was_doing(phase: Phase, extra: dict[str, Any], field: str) -> None:
    charged = _charged(_status(phase, until=0, **extra), 30)
    assert charged.goodput is not None and getattr(charged.goodput, field) == pytest.approx(30)
    assert charged.goodput.accounted_until == after(30)


@pytest.mark.parametrize("phase", [Phase.SUSPENDED, Phase.SUCCEEDED, Phase.FAILED])
def test_suspended_and_finished_time_is_not_accounted(phase: Phase) -> None:
    charged = _charged(_status(phase, until=0), 3600)
    assert charged.goodput is not None and charged.goodput.percent is None
    assert charged.goodput.accounted_until == after(3600)


def test_the_percentage_is_productive_time_less_checkpoint_stalls_over_all_time() -> None:
    before = _status(Phase.RUNNING, until=100, goodput={"productiveSeconds": 100, "queuedSeconds": 100})
    before.progress = Progress(step=10, checkpoint_stall_seconds=20.0)
    charged = _charged(before, 200)
    assert charged.goodput is not None
    assert (charged.goodput.productive_seconds, charged.goodput.checkpoint_stall_seconds) == (200, 20)
    assert charged.goodput.percent == pytest.approx(60.0)  # (200 - 20) / 300


def test_checkpoint_stalls_of_earlier_attempts_are_kept_when_the_trainer_counts_again() -> None:
    status = _status(Phase.RUNNING, until=0, goodput={"checkpointStallSeconds": 50})
    start_attempt(status, "Application")
    status.progress = Progress(step=1, checkpoint_stall_seconds=5.0)
    charged = _charged(status, 10)
    assert charged.goodput is not None and charged.goodput.checkpoint_stall_seconds == pytest.approx(55)


def test_the_old_attempts_progress_does_not_count_its_stalls_twice_while_the_next_one_starts() -> None:
    status = _status(Phase.RUNNING, until=0)
    status.progress = Progress(step=40, checkpoint_stall_seconds=12.0)
    status = _charged(status, 10)  # the pass that sees the failure
    start_attempt(status, "Application")
    for seconds in (20, 30, 40):  # passes while attempt 2 downloads and loads: no new report yet
        status.phase = Phase.STARTING
        status = _charged(status, seconds)
    assert status.goodput is not None and status.goodput.checkpoint_stall_seconds == pytest.approx(12)


def test_after_a_restart_time_is_lost_until_the_first_step_is_reported() -> None:
    ran = {"type": "Running", "status": "True", "lastTransitionTime": after(0).isoformat()}
    status = _status(Phase.RUNNING, until=0, goodput={"waitingFor": "Infrastructure"}, conditions=[ran])
    reloading = _charged(status, 60)  # running again, loading the checkpoint: no step yet
    assert reloading.goodput is not None and reloading.goodput.infrastructure_restart_seconds == 60
    reloading.progress = Progress(step=41, updated_at=after(60))
    training = _charged(reloading, 90)
    assert training.goodput is not None and training.goodput.productive_seconds == 30


def test_after_a_restart_steps_up_to_the_highest_one_reached_before_are_redone_work_and_lost() -> None:
    status = _status(Phase.RUNNING, until=0)
    status.progress = Progress(step=50, updated_at=after(0))
    status = _charged(status, 10)  # attempt 1 reached step 50; its last checkpoint was step 40
    start_attempt(status, "Application")
    ran = Condition(type="Running", status="True", last_transition_time=after(20))
    status.phase, status.conditions = Phase.RUNNING, [ran]
    status.progress = Progress(step=42, updated_at=after(30))  # resumed from 40: redoing 41-50
    redoing = _charged(status, 60)
    assert redoing.goodput is not None and redoing.goodput.application_restart_seconds == pytest.approx(50)
    redoing.progress = Progress(step=51, updated_at=after(60))  # new ground
    training = _charged(redoing, 90)
    assert training.goodput is not None and training.goodput.productive_seconds == pytest.approx(40)


def test_a_first_attempt_has_nothing_to_redo() -> None:
    status = _status(Phase.RUNNING, until=0)
    status.progress = Progress(step=3, updated_at=after(0))
    charged = _charged(status, 30)
    assert charged.goodput is not None and charged.goodput.productive_seconds == pytest.approx(30)
    assert charged.goodput.redo_until_step is None and charged.goodput.step_reached == 3
