"""The progress line rank 0 prints is the one the operator parses; the launcher keeps exit classes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from finetune_operator.api.status import CheckpointRef, Progress
from finetune_operator.progress import MARKER, ProgressReport, format_line, parse_last
from finetune_trainer.launch import exit_code_of, rank_reason
from finetune_trainer.reporting import Reporter


def _report(step: int) -> ProgressReport:
    return ProgressReport(
        progress=Progress(step=step, total_steps=100, loss=1.5, updated_at=datetime(2026, 1, 1, tzinfo=UTC)),
        latest_checkpoint=CheckpointRef(step=step, uri="s3://bucket/runs/ns/job/checkpoints/step-00000010"),
    )


def test_a_formatted_report_parses_back_unchanged() -> None:
    assert parse_last(format_line(_report(10))) == _report(10)


def test_the_newest_report_in_a_log_tail_wins() -> None:
    log = "\n".join([format_line(_report(10)), "some warning", format_line(_report(20)), "more output"])
    report = parse_last(log)
    assert report is not None and report.progress.step == 20


def test_a_torn_last_line_falls_back_to_the_previous_report() -> None:
    log = format_line(_report(10)) + "\n" + format_line(_report(20))[:40]
    report = parse_last(log)
    assert report is not None and report.progress.step == 10


def test_a_prefixed_line_still_parses() -> None:
    assert parse_last("[rank0]: " + format_line(_report(5))) == _report(5)


def test_a_log_without_reports_gives_none() -> None:
    assert parse_last("starting\n" + MARKER + "{not json") is None


def test_checkpoint_stalls_add_up_and_reach_the_operator_with_the_next_report(
    capsys: pytest.CaptureFixture[str],
) -> None:
    reporter = Reporter(enabled=True, total_steps=10, start_step=0, tensorboard_dir=None)
    reporter.stalled(0.25)
    reporter.stalled(0.5)
    reporter.step(4, loss=1.0, tokens_per_second=100.0, learning_rate=1e-4)
    report = parse_last(capsys.readouterr().out)
    assert report is not None and report.progress.checkpoint_stall_seconds == 0.75


def test_the_line_uses_the_status_field_names() -> None:
    assert '"totalSteps":100' in format_line(_report(1)) and '"latestCheckpoint"' in format_line(_report(1))


@pytest.mark.parametrize(
    ("worker", "pod"), [(0, 0), (2, 2), (3, 3), (75, 75), (143, 143), (-9, 137), (-15, 143)]
)
def test_the_pod_exits_with_the_failed_rank_class(worker: int, pod: int) -> None:
    assert exit_code_of(worker) == pod


def test_the_failed_rank_reason_is_read_from_its_own_file(tmp_path: Path) -> None:
    (tmp_path / "rank-1").write_text("out of memory at step 12\n")
    assert rank_reason(tmp_path, 1) == "out of memory at step 12"
    assert rank_reason(tmp_path, 0) is None


class _Store:
    def __init__(self) -> None:
        self.keys: list[str] = []

    def put_file(self, path: Path, key: str) -> None:
        assert path.is_file()
        self.keys.append(key)


def test_the_reporter_uploads_its_tensorboard_events_after_each_commit_and_at_the_end(tmp_path: Path) -> None:
    store = _Store()
    reporter = Reporter(enabled=True, total_steps=10, start_step=0,
                        tensorboard_dir=tmp_path / "tb" / "attempt-1", tensorboard_store=store)  # fmt: skip
    reporter.step(2, loss=1.0, tokens_per_second=100.0, learning_rate=1e-4)
    reporter.settled(2)
    assert store.keys and all(k.startswith("tensorboard/attempt-1/events.out.tfevents.") for k in store.keys)
    store.keys.clear()
    reporter.close()
    assert store.keys


def test_only_rank_0_uploads_tensorboard_events(tmp_path: Path) -> None:
    store = _Store()
    reporter = Reporter(enabled=False, total_steps=10, start_step=0, tensorboard_dir=tmp_path / "attempt-0",
                        tensorboard_store=store)  # fmt: skip
    reporter.settled(2)
    reporter.close()
    assert store.keys == []
