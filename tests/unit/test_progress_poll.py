"""The progress poller: one bounded log read per Running job per interval, a status patch only for
a newer report, and nothing for jobs no pass saw Running."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from finetune_operator.api.status import Progress
from finetune_operator.progress import ProgressReport
from finetune_operator.progress_poll import ProgressPoller

from tests.support.clock import JumpingClock

KEY = ("team-a", "demo")
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _report(seconds: float, step: int = 10) -> ProgressReport:
    return ProgressReport(progress=Progress(step=step, updated_at=T0 + timedelta(seconds=seconds)))


class FakeBackend:
    def __init__(self, report: ProgressReport | None) -> None:
        self.report = report
        self.reads: list[tuple[str, str, Any]] = []
        self.patches: list[ProgressReport] = []

    async def read_progress(self, namespace: str, pod: str, since_seconds: int | None = None) -> Any:
        self.reads.append((namespace, pod, since_seconds))
        return self.report

    async def patch_progress(self, key: tuple[str, str], report: ProgressReport) -> bool:
        self.patches.append(report)
        return True


def _poller(backend: FakeBackend) -> ProgressPoller:
    return ProgressPoller(backend, JumpingClock(), interval=30.0, concurrency=4)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_newer_report_is_patched_into_status_once() -> None:
    backend = FakeBackend(_report(60))
    poller = _poller(backend)
    poller.track(KEY, "demo-a1-n0", T0)
    assert await poller.poll(KEY) is True
    assert await poller.poll(KEY) is False  # the same report again: no write
    assert len(backend.patches) == 1 and len(backend.reads) == 2


@pytest.mark.asyncio
async def test_the_log_read_is_bounded_to_what_rank_0_wrote_since_the_previous_poll() -> None:
    backend = FakeBackend(_report(60))
    poller = _poller(backend)
    poller.track(KEY, "demo-a1-n0", None)
    await poller.poll(KEY)
    assert backend.reads == [("team-a", "demo-a1-n0", 65)]  # two intervals and a margin


@pytest.mark.asyncio
async def test_a_report_no_newer_than_the_status_is_not_written() -> None:
    backend = FakeBackend(_report(60))
    poller = _poller(backend)
    poller.track(KEY, "demo-a1-n0", T0 + timedelta(seconds=60))
    assert await poller.poll(KEY) is False and backend.patches == []


@pytest.mark.asyncio
async def test_a_job_no_pass_saw_running_is_not_read() -> None:
    backend = FakeBackend(_report(60))
    poller = _poller(backend)
    poller.track(KEY, "demo-a1-n0", None)
    poller.track(KEY, None)
    assert await poller.poll(KEY) is False and backend.reads == []


def test_a_pass_that_leaves_the_job_running_has_its_rank_0_polled_and_others_not() -> None:
    from finetune_operator.api.status import FineTuneJobStatus

    poller = _poller(FakeBackend(None))
    running = FineTuneJobStatus(phase="Running", attempt=2, progress=Progress(step=3, updated_at=T0))
    assert poller.follow(KEY, running) is None  # the pass need not come back for progress
    assert (poller.targets[KEY].pod, poller.targets[KEY].updated_at) == ("demo-a2-n0", T0)
    poller.follow(KEY, FineTuneJobStatus(phase="Restarting", attempt=2))
    assert KEY not in poller.targets
