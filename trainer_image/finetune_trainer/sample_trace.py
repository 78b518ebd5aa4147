"""An audit trail of which examples each optimizer step trained on, one jsonl file per rank.

Off unless FTJOB_SAMPLE_TRACE names a directory. With it on, anyone can check after a crash and a
resume that every sample of an epoch was trained on exactly once up to the resumed checkpoint and
after it (the steps after the last commit are retrained, and show up twice in the trail).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from finetune_operator import contract

from finetune_trainer.process_group import Ranks

ENV_SAMPLE_TRACE = "FTJOB_SAMPLE_TRACE"


class SampleTrace:
    def __init__(self, file: IO[str] | None, attempt: str) -> None:
        self._file = file
        self._attempt = attempt

    @classmethod
    def from_env(cls, ranks: Ranks) -> SampleTrace:
        attempt = os.environ.get(contract.ENV_ATTEMPT, "0")
        directory = os.environ.get(ENV_SAMPLE_TRACE)
        if not directory:
            return cls(None, attempt)
        Path(directory).mkdir(parents=True, exist_ok=True)
        return cls(open(Path(directory) / f"rank-{ranks.rank}.jsonl", "a", encoding="utf-8"), attempt)

    def record(self, step: int, ids: list[str]) -> None:
        if self._file is not None:
            self._file.write(
                json.dumps({"attempt": self._attempt, "pid": os.getpid(), "step": step, "ids": ids}) + "\n"
            )
            self._file.flush()
