"""torchrun's elastic agent, restarting the node's training processes in place only when that can
help, the same number of times on every node, and quickly.

torchrun's own agent restarts its worker group after any failure while `--max-restarts` lasts. The
operator's classes say more (contract.restartable_in_place): an out-of-memory exit, an invalid
config or refused storage fails the same way again, so those end the launcher at once and the pod
fails with the rank's code, for the operator to act on. Everything else it keeps:

- restart counts agree across nodes. A node whose own workers are healthy restarts when a failed
  node rejoins the rendezvous (a membership change, which torchrun does not count), so its workers
  would see TORCHELASTIC_RESTART_COUNT 0 again while the failed node's see 1. Here every restart of
  the group counts on every node, so the count is the attempt's restart number everywhere and every
  node runs out of restarts on the same round.
- the backoff: a node whose workers failed waits the operator's backoff for that restart
  (contract.ENV_IN_PLACE_BACKOFF) before it rejoins; the others wait for it in the rendezvous.
- stopping the survivors of a failed group takes STOP_SECONDS, not torchrun's 30 s default
  (`_stop_workers` ignores the shutdown timeout it was given): a broken gang cannot checkpoint, and
  the restart resumes from the last committed checkpoint anyway. A SIGTERM to the launcher (the pod
  stopping) still gives the ranks the whole shutdown timeout for their emergency checkpoint.
- each failure is recorded on the node's scratch (restart_records.py) for the restarted ranks to
  report.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from finetune_operator import contract
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from finetune_trainer import restart_records
from finetune_trainer.restart_records import FailureRecord

log = logging.getLogger("finetune_trainer.launch")

STOP_SECONDS = 3


def exit_code_of(worker_exit: int) -> int:
    """A worker's exit status as the pod's: a signal death -N becomes 128+N, as a shell reports it."""
    return 128 + -worker_exit if worker_exit < 0 else worker_exit


def rank_reason(reason_dir: Path, local_rank: int) -> str | None:
    path = reason_dir / f"rank-{local_rank}"
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None


def default_reason(rank: int, code: int) -> str:
    signal_name = f" ({signal.Signals(code - 128).name})" if 128 < code < 160 else ""
    return f"rank {rank} exited with {code}{signal_name}"


def backoff_schedule(text: str | None) -> list[float]:
    return [float(part) for part in (text or "").split(",") if part.strip()]


class GangAgent(LocalElasticAgent):
    reason_dir: Path = Path(".")
    node_rank: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._backoff = backoff_schedule(os.environ.get(contract.ENV_IN_PLACE_BACKOFF))
        self._failed_here = False

    def _restarts_done(self) -> int:
        return int(self._worker_group.spec.max_restarts - self._remaining_restarts)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result: RunResult = super()._monitor_workers(worker_group)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            self._failed(result)
        return result

    def _failed(self, result: RunResult) -> None:
        self._failed_here = True
        failures = sorted(result.failures.items(), key=lambda item: item[1].timestamp)
        if not failures:  # unhealthy without an exit (a worker stuck uninterruptible)
            code, reason = 1, "a rank stopped responding"
        else:
            rank, failure = failures[0]
            code = exit_code_of(failure.exitcode)
            reason = rank_reason(self.reason_dir, failure.local_rank) or default_reason(rank, code)
        if not contract.restartable_in_place(code):
            log.warning("%s: exit %d is not restarted in place; the pod fails with it", reason, code)
            self._remaining_restarts = 0
            return
        if self._remaining_restarts <= 0:
            return
        number = self._restarts_done() + 1
        restart_records.append(
            self.reason_dir, FailureRecord(number, restart_records.now(), code, reason, self.node_rank)
        )
        log.warning("%s; in-place restart %d of %d", reason, number, self._worker_group.spec.max_restarts)

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        self._shutdown(signal.SIGTERM, STOP_SECONDS)

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        """torchrun's restart (stop, rendezvous, start) with the backoff between the stop and the
        rendezvous, so no survivor of the failed group runs through it."""
        self._stop_workers(worker_group)
        worker_group.state = WorkerState.STOPPED
        if self._failed_here:
            self._failed_here = False
            done = self._restarts_done()  # torchrun already counted this restart
            delay = self._backoff[done - 1] if 0 < done <= len(self._backoff) else 0.0
            if delay:
                log.warning("in-place restart %d: backing off %.0fs", done, delay)
                time.sleep(delay)
        elif self._remaining_restarts > 0:
            self._remaining_restarts -= 1  # a peer's restart is this node's too
        for stale in self.reason_dir.glob("rank-*"):
            stale.unlink(missing_ok=True)
        self._initialize_workers(worker_group)
