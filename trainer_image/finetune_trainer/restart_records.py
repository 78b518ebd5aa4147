"""What each in-place restart of an attempt was, kept on the node's scratch disk for the attempt.

When a node's training processes fail and its launcher restarts them in place (gang_agent.py), the
launcher appends one line here: the restart's number in the attempt, when, the failed rank's exit
code and its one-line reason. The restarted processes read it back: every node's local rank 0 reads
its node's lines, the ranks gather them, and rank 0 puts one root cause per restart into its
progress report, which is how the operator learns of a restart it never saw a pod fail for (trainer
pods hold no cluster credentials).

Layout, under `<scratch>/termination/`:
    rank-<local rank>     the reason a local rank wrote as it failed (cleared before each restart)
    restarts.jsonl        one FailureRecord per line, appended by the launcher
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from finetune_operator import contract
from finetune_operator.api.status import InPlaceRestart

from finetune_trainer import process_group
from finetune_trainer.failures import COLLECTIVE_FAILED
from finetune_trainer.process_group import Ranks

log = logging.getLogger(__name__)

RECORDS = "restarts.jsonl"
ENV_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"  # torchrun's agent sets it for every worker
KEPT = 16  # the newest restarts a report carries; the operator counts by number, not by length


@dataclass(frozen=True)
class FailureRecord:
    number: int  # the attempt's restart this failure caused (1 = the first)
    at: str  # ISO time the launcher saw the failure
    exit_code: int
    reason: str
    node_rank: int


def append(directory: Path, record: FailureRecord) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / RECORDS).open("a") as out:
        out.write(json.dumps(asdict(record)) + "\n")


def read(directory: Path) -> list[FailureRecord]:
    """This node's records; a line torn by a killed launcher is skipped."""
    try:
        lines = (directory / RECORDS).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(FailureRecord(**json.loads(line)))
        except (ValueError, TypeError):
            log.warning("skipping a torn restart record: %r", line[:200])
    return records


def now() -> str:
    return datetime.now(UTC).isoformat()


def root_causes(records: list[FailureRecord]) -> list[InPlaceRestart]:
    """One restart per number, from every node's records: the failure that caused it. A dead peer
    makes the survivors fail as transient with a broken collective, so a failure that is not a
    broken collective is the cause when there is one, then another exit than transient; among
    equals the earliest."""
    by_number: dict[int, list[FailureRecord]] = {}
    for record in records:
        by_number.setdefault(record.number, []).append(record)
    out = []
    for number in sorted(by_number)[-KEPT:]:
        candidates = by_number[number]
        cause = min(
            candidates,
            key=lambda r: (
                r.reason.startswith(COLLECTIVE_FAILED),
                r.exit_code == contract.ExitCode.TRANSIENT,
                r.at,
            ),
        )
        out.append(
            InPlaceRestart(
                attempt=int(os.environ.get(contract.ENV_ATTEMPT) or 1),
                number=number,
                at=datetime.fromisoformat(min(r.at for r in candidates)),
                exit_code=cause.exit_code,
                reason=f"node {cause.node_rank}: {cause.reason}"[:1024],
            )
        )
    return out


def restarted() -> bool:
    return os.environ.get(ENV_RESTART_COUNT, "0") not in ("", "0")


def gathered(ranks: Ranks) -> list[InPlaceRestart]:
    """On rank 0 of restarted processes: the attempt's in-place restarts so far, from every node's
    records (one collective, the run's first after the process group forms). [] elsewhere, and in a
    first process (every node agrees which it is: gang_agent counts restarts alike)."""
    directory = os.environ.get(contract.ENV_RANK_TERMINATION_DIR)
    if not restarted() or not directory:
        return []
    mine = [asdict(r) for r in read(Path(directory))] if ranks.is_node_main else []
    everyone = process_group.all_gather(mine)
    if not ranks.is_main:
        return []
    return root_causes([FailureRecord(**r) for node in everyone for r in node])
