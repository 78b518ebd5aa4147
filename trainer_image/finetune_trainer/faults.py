"""Test-only fault hooks: failures the real trainer produces on cue, so recovery tests exercise the
real classification and restart paths instead of a mock of the trainer. Unset (always, outside
tests) they do nothing.

- `FTJOB_TEST_FAIL_AT_STEP=STEP:CODE[:RANK[:SECONDS]]`: before training step STEP+1 (after STEP
  optimizer steps), global rank RANK (default 0) fails with exit CODE (75: Transient, 1: an
  unexpected exception), SECONDS after it got there (a rank that hangs, then dies: the other ranks
  wait in their next collective while the checkpoints behind training commit); once: only in the
  first process of the first attempt (torchrun's restart count 0, attempt 1), so a restart, in
  place or not, runs past it.
- `FTJOB_TEST_OOM_ABOVE_MICRO_BATCH=N`: the first step's forward runs out of memory (a
  torch.OutOfMemoryError, classified by the trainer's own handler) whenever the micro batch in
  effect is above N, as a device that fits N examples would.
"""

from __future__ import annotations

import logging
import os
import time

from finetune_operator import contract

from finetune_trainer.failures import TrainerFailure, Transient
from finetune_trainer.restart_records import ENV_RESTART_COUNT

log = logging.getLogger(__name__)

ENV_FAIL_AT_STEP = "FTJOB_TEST_FAIL_AT_STEP"
ENV_OOM_ABOVE_MICRO_BATCH = "FTJOB_TEST_OOM_ABOVE_MICRO_BATCH"


class InjectedFailure(TrainerFailure):
    """A failure with the exit code the test asked for."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]


def _first_process() -> bool:
    restarts = os.environ.get(ENV_RESTART_COUNT, "0")
    attempt = os.environ.get(contract.ENV_ATTEMPT, "1")
    return restarts in ("", "0") and attempt in ("", "1")


def before_step(done: int, rank: int, micro_batch: int) -> None:
    """Called before every training step with the optimizer steps done so far."""
    oom = os.environ.get(ENV_OOM_ABOVE_MICRO_BATCH)
    if oom and micro_batch > int(oom):
        import torch

        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (test fault: micro batch {micro_batch} > {oom})"
        )
    setting = os.environ.get(ENV_FAIL_AT_STEP)
    if not setting or not _first_process():
        return
    step, code, *rest = (float(part) for part in setting.split(":"))
    who, hang = (int(rest[0]) if rest else 0), (rest[1] if len(rest) > 1 else 0.0)
    if done != int(step) or rank != who:
        return
    time.sleep(hang)
    message = f"test fault: rank {rank} failed after step {int(step)} ({ENV_FAIL_AT_STEP})"
    log.warning(message)
    if code == contract.ExitCode.TRANSIENT:
        raise Transient(message)
    raise InjectedFailure(message, int(code))
