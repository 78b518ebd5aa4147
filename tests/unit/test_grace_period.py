"""The emergency checkpoint planned against the grace period: the trainer starts it only when the
last save's measured duration fits the time left; the operator and `ftjob validate` warn when the
grace period could not hold the job's measured save. One rule (policy/grace.py) decides all three."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator import contract
from finetune_operator.api import FineTuneJob, parse_manifest
from finetune_operator.api.status import CheckpointRef, FineTuneJobStatus, Progress
from finetune_operator.cli import main
from finetune_operator.policy import grace as rule
from finetune_operator.policy.decide import Decision, Observed, decide
from finetune_operator.policy.observed import observe_pod
from finetune_operator.progress import ProgressReport, format_line, parse_last
from finetune_trainer import grace, process_group
from finetune_trainer.reporting import Reporter

from tests.support.factories import manifest
from tests.support.pods import JOB_UID, pod

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
URI = "s3://bucket/runs/team-a/demo/checkpoints/step-00000010"


# The trainer's plan (pure).


def test_a_save_that_fits_the_time_left_is_started() -> None:
    planned = grace.plan(last_save=10.0, left=60.0, last_committed=8, step=10)
    assert planned.save


def test_a_save_longer_than_the_time_left_is_skipped_naming_the_figures_and_the_last_commit() -> None:
    planned = grace.plan(last_save=95.0, left=20.0, last_committed=8, step=10)
    assert not planned.save
    assert planned.why.startswith("emergency checkpoint skipped: the last save took 95s, 20s left")
    assert "the last committed checkpoint is step 8" in planned.why


def test_the_safety_margin_skips_a_save_that_would_only_just_fit() -> None:
    assert not grace.plan(last_save=18.0, left=20.0, last_committed=8, step=10).save
    assert grace.plan(last_save=14.0, left=20.0, last_committed=8, step=10).save  # 14 x 1.25 + 2 = 19.5


def test_a_save_still_in_flight_counts_since_the_emergency_save_waits_for_it() -> None:
    assert grace.plan(last_save=8.0, left=12.0, last_committed=8, step=10).save
    planned = grace.plan(last_save=8.0, in_flight=6.0, left=12.0, last_committed=8, step=10)
    assert not planned.save and "the last save took 8s (and 6s for the save still in flight)" in planned.why


def test_an_unknown_deadline_saves_as_before() -> None:
    assert grace.plan(last_save=95.0, left=None, last_committed=8, step=10).save


def test_the_first_save_of_a_run_is_attempted_since_nothing_was_measured() -> None:
    planned = grace.plan(last_save=None, left=3.0, last_committed=None, step=10)
    assert planned.save and "no save measured yet" in planned.why


def test_a_skip_before_any_commit_says_there_is_none() -> None:
    assert grace.plan(last_save=95.0, left=3.0, last_committed=None, step=10).why.endswith("is none")


def test_the_deadline_is_the_signal_plus_the_shutdown_timeout() -> None:
    assert grace.deadline(100.0, {contract.ENV_SHUTDOWN_TIMEOUT: "25"}) == 125.0


@pytest.mark.parametrize(
    ("signalled_at", "env"),
    [
        (None, {contract.ENV_SHUTDOWN_TIMEOUT: "25"}),
        (100.0, {}),
        (100.0, {contract.ENV_SHUTDOWN_TIMEOUT: "x"}),
    ],
)
def test_without_a_signal_time_or_a_shutdown_timeout_the_deadline_is_unknown(
    signalled_at: float | None, env: dict[str, str]
) -> None:
    assert grace.deadline(signalled_at, env) is None


# The agreement: every rank gets the same plan.


def _gang_plans(monkeypatch: pytest.MonkeyPatch, ranks: list[dict[str, Any]]) -> list[grace.Plan]:
    """Each rank's agreed_plan on its own thread, the all-reduce (max) done across them as gloo would."""
    sent: list[list[float]] = [[] for _ in ranks]
    barrier = threading.Barrier(len(ranks))
    index = threading.local()

    def all_reduce(values: list[float], op: str, device: Any) -> list[float]:
        assert op == "max"
        sent[index.rank] = values
        barrier.wait(timeout=10)
        return [max(column) for column in zip(*sent, strict=True)]

    monkeypatch.setattr(process_group, "all_reduce", all_reduce)
    plans: list[grace.Plan | None] = [None] * len(ranks)

    def run(rank: int) -> None:
        index.rank = rank
        plans[rank] = grace.agreed_plan(None, step=10, now=0.0, **ranks[rank])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(ranks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert all(p is not None for p in plans)
    return [p for p in plans if p is not None]


def test_every_rank_takes_rank_zeros_estimate_against_the_tightest_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plans = _gang_plans(
        monkeypatch,
        [
            # rank 0: 60 s would fit its 30 s save; rank 1's node is stopped sooner
            {"deadline_at": 60.0, "last_save": 30.0, "in_flight": None, "last_committed": 8},
            {"deadline_at": 20.0, "last_save": None, "in_flight": None, "last_committed": None},
        ],
    )
    assert [p.save for p in plans] == [False, False]
    assert plans[0] == plans[1] and "20s left" in plans[0].why and "step 8" in plans[0].why


def test_a_rank_told_to_stop_before_its_own_signal_does_not_bind_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plans = _gang_plans(
        monkeypatch,
        [
            {"deadline_at": None, "last_save": 5.0, "in_flight": None, "last_committed": 8},
            {"deadline_at": 60.0, "last_save": None, "in_flight": None, "last_committed": None},
        ],
    )
    assert [p.save for p in plans] == [True, True] and plans[0] == plans[1]


def test_with_no_deadline_on_any_rank_the_gang_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    plans = _gang_plans(
        monkeypatch,
        [
            {"deadline_at": None, "last_save": 95.0, "in_flight": None, "last_committed": 8},
            {"deadline_at": None, "last_save": None, "in_flight": None, "last_committed": None},
        ],
    )
    assert all(p.save and "deadline unknown" in p.why for p in plans)


# The operator's rule.


def test_nothing_measured_gives_no_warning() -> None:
    assert rule.warning(120, None) is None


def test_a_grace_period_that_holds_the_save_gives_no_warning() -> None:
    assert rule.warning(120, 60.0) is None


def test_a_short_grace_period_warns_naming_the_field_and_the_figures() -> None:
    message = rule.warning(30, 95.0)
    assert message is not None
    assert "spec.runPolicy.terminationGracePeriodSeconds is 30s" in message
    assert "25s for its emergency checkpoint" in message and "the last save took 95s" in message
    assert message.endswith("to at least 126s")  # 95 x 1.25 + 2 = 120.75 -> 121, plus the 5 s margin


def test_the_warning_says_exactly_when_the_trainer_would_skip() -> None:
    for grace_period, seconds in [(30, 20.0), (30, 18.0), (120, 92.0), (120, 100.0)]:
        budget = rule.shutdown_seconds(grace_period)
        skipped = not grace.plan(last_save=seconds, left=budget, last_committed=1, step=2).save
        assert (rule.warning(grace_period, seconds) is not None) == skipped


# The status field and the operator's event.


def test_the_last_saves_duration_round_trips_through_the_progress_line() -> None:
    report = ProgressReport(
        progress=Progress(step=10),
        latest_checkpoint=CheckpointRef(step=10, uri=URI, time=NOW, duration_seconds=95.25),
    )
    line = format_line(report)
    assert '"durationSeconds":95.25' in line
    assert parse_last(line) == report


def test_rank_zero_reports_the_committed_saves_duration(capsys: pytest.CaptureFixture[str]) -> None:
    reporter = Reporter(enabled=True, total_steps=20, start_step=0, tensorboard_dir=None)
    reporter.committed(10, URI, NOW, 12.3456)
    report = parse_last(capsys.readouterr().out)
    assert report is not None and report.latest_checkpoint is not None
    assert report.latest_checkpoint.duration_seconds == 12.346


def _job(status: FineTuneJobStatus, grace_period: int) -> FineTuneJob:
    data = manifest({"spec.runPolicy.terminationGracePeriodSeconds": grace_period})
    data["metadata"].update(uid=JOB_UID, generation=1)
    data["status"] = status.to_wire()  # as the API server stores it and hands it back
    return parse_manifest(data)


def _pass(status: FineTuneJobStatus, grace_period: int, save_seconds: float, minutes: int) -> Decision:
    """A pass over a running gang whose rank 0 reports a checkpoint saved in `save_seconds`."""
    report = ProgressReport(
        progress=Progress(step=10 + minutes, total_steps=100),
        latest_checkpoint=CheckpointRef(step=10, uri=URI, time=NOW, duration_seconds=save_seconds),
    )
    pods = tuple(observe_pod(pod(rank=r)) for r in range(2))
    now = NOW + timedelta(minutes=minutes)
    return decide(Observed(_job(status, grace_period), pods, service_exists=True, now=now, progress=report))


def _running() -> FineTuneJobStatus:
    return FineTuneJobStatus.model_validate({"phase": "Running", "attempt": 1})


def _grace_events(d: Decision) -> list[str]:
    return [e.message for e in d.events if e.reason == rule.REASON and e.type == "Warning"]


def test_the_operator_warns_once_while_the_grace_period_stays_too_short() -> None:
    first = _pass(_running(), 30, 95.0, 1)
    second = _pass(first.status, 30, 97.0, 2)
    third = _pass(second.status, 30, 96.0, 3)
    assert len(_grace_events(first)) == 1 and "the last save took 95s" in _grace_events(first)[0]
    assert _grace_events(second) == [] and _grace_events(third) == []
    assert third.status.grace_period_warning is not None


def test_a_grace_period_that_holds_the_save_gives_no_event_and_no_status_warning() -> None:
    d = _pass(_running(), 120, 60.0, 1)
    assert _grace_events(d) == [] and d.status.grace_period_warning is None


def test_the_warning_clears_when_saves_fit_again_and_a_new_shortfall_warns_again() -> None:
    short = _pass(_running(), 30, 95.0, 1)
    fits = _pass(short.status, 30, 10.0, 2)
    again = _pass(fits.status, 30, 95.0, 3)
    assert fits.status.grace_period_warning is None
    assert len(_grace_events(again)) == 1


# `ftjob validate`.


def _file(tmp_path: Path, status: dict[str, Any] | None, grace_period: int) -> Path:
    data = manifest({"spec.runPolicy.terminationGracePeriodSeconds": grace_period})
    if status is not None:
        data["status"] = status
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_warns_from_a_manifest_with_the_jobs_measured_save(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = {"latestCheckpoint": {"step": 10, "uri": URI, "durationSeconds": 95.0}}
    assert main(["validate", str(_file(tmp_path, status, 30))]) == 0
    err = capsys.readouterr().err
    assert "demo warning: spec.runPolicy.terminationGracePeriodSeconds is 30s" in err
    assert "the last save took 95s" in err


def test_validate_says_nothing_of_the_grace_period_when_nothing_was_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(_file(tmp_path, None, 30))]) == 0
    assert "terminationGracePeriodSeconds" not in capsys.readouterr().err
