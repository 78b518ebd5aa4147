"""`python -m finetune_trainer --config FILE`, launched by torchrun on every node rank."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune_operator import contract

from finetune_trainer.config import ConfigError, load_config, write_termination_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_trainer")
    parser.add_argument("--config", type=Path, default=Path(contract.CONFIG_PATH))
    args = parser.parse_args(argv)
    try:
        load_config(args.config)
    except ConfigError as exc:
        write_termination_message(str(exc))
        return contract.ExitCode.INVALID_CONFIG
    # The training engine (data, model, DeepSpeed, checkpoint store) lands with the trainer work; until
    # then a valid config is all this entrypoint can check, and it says so instead of pretending.
    write_termination_message("finetune_trainer: the training engine is not built yet")
    return 1


if __name__ == "__main__":
    sys.exit(main())
