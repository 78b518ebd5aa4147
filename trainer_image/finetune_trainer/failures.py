"""Every way the trainer gives up on purpose, as one exception type that carries its exit code.

`__main__` catches `TrainerFailure` once and exits with `exit_code`, writing `reason()` to the
termination log; the operator classifies the rank by that code (contract.ExitCode). Anything else
that escapes is a bug or a runtime error and is classified there (out of memory becomes
`OutOfMemory`, a collective that timed out `Transient`, the rest exit 1).
"""

from __future__ import annotations

from typing import ClassVar

from finetune_operator import contract

# How a rank's reason starts when its collective broke: on a healthy rank that is the symptom of a
# peer's failure, never its cause (restart_records picks the cause by it).
COLLECTIVE_FAILED = "collective failed"


class TrainerFailure(Exception):
    exit_code: ClassVar[int] = 1
    prefix: ClassVar[str] = ""

    def reason(self) -> str:
        """The one-line termination message (never a credential: messages name uris, not secrets)."""
        return f"{self.prefix}{self}"


class InvalidInput(TrainerFailure):
    """The configuration or the data cannot make a run: no restart will help (exit 2)."""

    exit_code = contract.ExitCode.INVALID_CONFIG


class InputMissing(TrainerFailure):
    """A model, dataset, tokenizer or named checkpoint is missing or unreadable (exit 3)."""

    exit_code = contract.ExitCode.INPUT_NOT_FOUND


class OutOfMemory(TrainerFailure):
    """A step did not fit in GPU or host memory: retrying the same config fails the same way (exit 4)."""

    exit_code = contract.ExitCode.OUT_OF_MEMORY


class Refused(TrainerFailure):
    """Storage refused the job's credentials or has no such bucket: a fix, not a retry (exit 77)."""

    exit_code = contract.ExitCode.STORAGE_REFUSED


class Transient(TrainerFailure):
    """Worth a restart: storage unreachable, a peer that never arrived (exit 75)."""

    exit_code = contract.ExitCode.TRANSIENT


class Terminated(TrainerFailure):
    """SIGTERM (or Ctrl-C) was answered with an emergency checkpoint (exit 143)."""

    exit_code = contract.ExitCode.TERMINATED
