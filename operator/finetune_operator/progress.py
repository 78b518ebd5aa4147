"""How rank 0 reports progress to the operator: one structured line in its own log.

Trainer pods hold no cluster credentials and the operator holds no tenant storage credentials, so
neither can write where the other reads. What both can reach is the rank-0 pod's log: the trainer
prints `FTJOB_PROGRESS {json}` lines to stdout, the operator reads the tail of that log through the
API (`get pods/log`, read-only and namespaced) and copies the newest report into status.progress and
status.latestCheckpoint. The local backend reads the same lines from the rank-0 log file. The line
format lives here, and both sides import it.
"""

from __future__ import annotations

from pydantic import ValidationError

from finetune_operator.api.base import ApiModel
from finetune_operator.api.status import CheckpointRef, Progress

MARKER = "FTJOB_PROGRESS "
# Enough log tail to hold the newest report even when warnings are printed between reports.
TAIL_BYTES = 64 * 1024


class ProgressReport(ApiModel):
    progress: Progress
    latest_checkpoint: CheckpointRef | None = None


def format_line(report: ProgressReport) -> str:
    return MARKER + report.model_dump_json(by_alias=True, exclude_none=True)


def _parse(line: str) -> ProgressReport | None:
    at = line.find(MARKER)
    if at < 0:
        return None
    try:
        return ProgressReport.model_validate_json(line[at + len(MARKER) :])
    except ValidationError:
        return None


def parse_last(log_text: str) -> ProgressReport | None:
    """The newest well-formed report in a log tail; torn or foreign lines are skipped."""
    for line in reversed(log_text.splitlines()):
        report = _parse(line)
        if report is not None:
            return report
    return None


def parse_all(log_text: str) -> list[ProgressReport]:
    """Every well-formed report, oldest first (the local run's loss curve)."""
    return [r for r in map(_parse, log_text.splitlines()) if r is not None]
