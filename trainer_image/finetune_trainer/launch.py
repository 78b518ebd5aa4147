"""`python -m finetune_trainer.launch <torchrun arguments>`: torchrun, with the failure class kept.

torchrun exits 1 whenever a rank fails and dies with a traceback on SIGTERM, so on its own the pod's
exit code would never say 2 (invalid config), 3 (input not found), 4 (out of memory), 75 (transient),
77 (storage refused) or 143 (terminated) and the operator could not classify the failure. This runs
torchrun in-process and exits with the first failed rank's code, copying that rank's one-line reason
into the termination log. Its agent is gang_agent.GangAgent (in-place restarts that can help,
counted alike on every node): torchrun has no setting for the agent class, so the launcher's
module-level name for it is replaced before torchrun builds one.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from finetune_operator import contract

from finetune_trainer import restart_records
from finetune_trainer.config import write_termination_message
from finetune_trainer.gang_agent import default_reason, exit_code_of, rank_reason


def rendezvous_args(args: list[str], node_rank: int) -> list[str]:
    """A c10d rendezvous is hosted by node rank 0, said outright rather than left to torchrun's
    hostname match against the endpoint (a pod's DNS name may resolve only once it is ready)."""
    if "--rdzv-backend=c10d" not in args or any(a.startswith("--rdzv-conf") for a in args):
        return args
    return [f"--rdzv-conf=is_host={'true' if node_rank == 0 else 'false'}", *args]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher import api as launcher_api

    from finetune_trainer.gang_agent import GangAgent

    scratch = Path(os.environ.get(contract.ENV_SCRATCH_DIR, tempfile.gettempdir()))
    reason_dir = scratch / "termination"
    reason_dir.mkdir(parents=True, exist_ok=True)
    for stale in reason_dir.glob("rank-*"):
        stale.unlink()
    (reason_dir / restart_records.RECORDS).unlink(missing_ok=True)
    os.environ[contract.ENV_RANK_TERMINATION_DIR] = str(reason_dir)
    node_rank = int(os.environ.get(contract.ENV_NODE_RANK, "0"))
    GangAgent.reason_dir, GangAgent.node_rank = reason_dir, node_rank
    launcher_api.LocalElasticAgent = GangAgent  # type: ignore[misc]
    args = rendezvous_args(sys.argv[1:] if argv is None else argv, node_rank)
    try:
        torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = exit_code_of(failure.exitcode)
        reason = rank_reason(reason_dir, failure.local_rank) or default_reason(rank, code)
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
