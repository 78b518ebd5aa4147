"""Read and validate the resolved config the operator rendered into this attempt's ConfigMap.

The model is the operator's own (finetune_operator.api.TrainerConfig), so both sides read one schema.
An invalid config exits 2 with a one-line reason in the termination log, which the operator copies
into the job's Failed condition.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from finetune_operator import contract
from finetune_operator.api import TrainerConfig, describe
from pydantic import ValidationError

from finetune_trainer.failures import InvalidInput


class ConfigError(InvalidInput):
    """The config cannot be used; the message is one line for the termination log."""


def load_config(path: Path) -> TrainerConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read trainer config {path}: {exc.strerror}") from None
    try:
        return TrainerConfig.model_validate_json(text)
    except ValidationError as exc:
        problems = describe(exc)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"invalid trainer config {path}: {problems[0]}{more}") from None


def termination_log_path() -> Path:
    """Under the launcher each rank writes its own reason file and the launcher passes the first
    failed rank's on; run directly, a rank writes the termination log itself."""
    rank_dir, local_rank = os.environ.get(contract.ENV_RANK_TERMINATION_DIR), os.environ.get("LOCAL_RANK")
    if rank_dir and local_rank is not None:
        return Path(rank_dir) / f"rank-{local_rank}"
    return Path(os.environ.get(contract.ENV_TERMINATION_LOG, contract.TERMINATION_LOG))


def write_termination_message(message: str) -> None:
    """Best effort: the reason must reach the operator, but failing to write it must not mask the exit."""
    line = " ".join(message.split())[:1024]
    with contextlib.suppress(OSError):
        termination_log_path().write_text(line + "\n")
    print(line, file=sys.stderr)
