"""`python -m finetune_trainer.launch <torchrun arguments>`: torchrun, with the failure class kept.

torchrun exits 1 whenever a rank fails and dies with a traceback on SIGTERM, so on its own the pod's
exit code would never say 2 (invalid config), 3 (input not found), 4 (out of memory), 75 (transient),
77 (storage refused) or 143 (terminated) and the operator could not classify the failure. This runs
torchrun in-process and exits with the first failed rank's code, copying that rank's one-line reason
into the termination log.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

from finetune_operator import contract

from finetune_trainer.config import write_termination_message


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


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    scratch = Path(os.environ.get(contract.ENV_SCRATCH_DIR, tempfile.gettempdir()))
    reason_dir = scratch / "termination"
    reason_dir.mkdir(parents=True, exist_ok=True)
    for stale in reason_dir.glob("rank-*"):
        stale.unlink()
    os.environ[contract.ENV_RANK_TERMINATION_DIR] = str(reason_dir)
    try:
        torchrun.run(torchrun.parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = exit_code_of(failure.exitcode)
        reason = rank_reason(reason_dir, failure.local_rank) or (
            f"rank {rank} exited with {code}"
            + (f" ({signal.Signals(code - 128).name})" if 128 < code < 160 else "")
        )
        write_termination_message(reason)
        return code
    except SignalException as stopped:
        # The ranks got the signal too and had the shutdown timeout for their emergency checkpoint.
        reason = rank_reason(reason_dir, 0) or f"terminated by {stopped.sigval.name}"
        write_termination_message(reason)
        return contract.ExitCode.TERMINATED
    return contract.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
