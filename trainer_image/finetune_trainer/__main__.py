"""`python -m finetune_trainer --config FILE`, launched by torchrun on every node rank.

Every way a rank can end maps to the exit code the operator classifies by (contract.ExitCode), with a
one-line reason in the termination log. No message here ever holds a credential: storage errors
name the operation and the uri, never the environment they were authenticated with.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from finetune_operator import contract
from finetune_operator.api import TrainerConfig

from finetune_trainer.config import load_config, write_termination_message
from finetune_trainer.failures import COLLECTIVE_FAILED, OutOfMemory, TrainerFailure, Transient
from finetune_trainer.process_group import keep_pod_node_rank


def _quiet_libraries(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for name in ("deepspeed", "DeepSpeed", "torch.distributed", "transformers", "botocore", "boto3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # DeepSpeed's ZeRO calls torch's older collective names once per step; the notice is not ours.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.", category=FutureWarning)


def _out_of_memory(exc: BaseException) -> bool:
    """Host (MemoryError) or device memory: torch.OutOfMemoryError, or an allocator's message in a
    RuntimeError (DeepSpeed's and older torch's)."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower()


def out_of_memory(exc: BaseException, config: TrainerConfig, step: int | None) -> OutOfMemory:
    """The OutOfMemory failure, with where it happened and what sized it: the fix is a smaller step."""
    where = f" at step {step}" if step is not None else ""
    micro, seq = config.schedule.micro_batch_size, config.dataset.max_seq_length
    first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return OutOfMemory(
        f"out of memory{where} (micro batch {micro} x {seq} tokens per rank): {first}; "
        "lower training.microBatchSize or dataset.maxSeqLength, or enable training.gradientCheckpointing, "
        "ZeRO-3 or offload"
    )


# How a collective ends when a peer died or hung: gloo's and NCCL's own words.
COLLECTIVE_FAILURES = ("timed out", "timeout", "connection reset", "connection closed by peer", "broken pipe")


def _collective_timeout(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(words in text for words in COLLECTIVE_FAILURES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_trainer")
    parser.add_argument("--config", type=Path, default=Path(contract.CONFIG_PATH))
    args = parser.parse_args(argv)
    keep_pod_node_rank(os.environ)  # before anything reads RANK: rank 0 is the pod's, not torchrun's
    _quiet_libraries(os.environ.get("RANK", "0") == "0")
    try:
        _run(load_config(args.config))
    except TrainerFailure as exc:  # the one place a failure becomes an exit code and a reason
        write_termination_message(exc.reason())
        return exc.exit_code
    return contract.ExitCode.OK


def _run(config: TrainerConfig) -> None:
    from finetune_trainer.training import Run

    run: Run | None = None
    try:
        run = Run(config)
        run.execute()
    except TrainerFailure:
        raise
    except Exception as exc:  # MemoryError included
        raise escaped(exc, config, run.step if run is not None else None) from exc


def escaped(exc: Exception, config: TrainerConfig, step: int | None) -> TrainerFailure:
    """The failure an exception that escaped the run is classified as: out of memory (exit 4), a
    collective that failed (75), anything else a bug or a runtime error (1, its traceback logged)."""
    at = f" at step {step}" if step is not None else ""
    if _out_of_memory(exc):
        return out_of_memory(exc, config, step)
    if _collective_timeout(exc):
        return Transient(f"{COLLECTIVE_FAILED}{at}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    logging.getLogger("finetune_trainer").exception("training failed%s", at)
    return TrainerFailure(f"{type(exc).__name__}{at}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


def leave(code: int) -> None:
    """End the process with `code`. A failed run ends without the interpreter's teardown: a collective
    that failed leaves the backend's threads waiting on a peer, and tearing its process group down
    then aborts the process (SIGABRT, exit 134) after the reason was written, hiding the exit code
    the operator classifies by. A run that succeeded has torn its process group down already
    (ranks.shutdown). Checkpoint threads are daemons: an uncommitted checkpoint is never resumed."""
    if code == contract.ExitCode.OK:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    leave(main())
