"""Processes as the tests watch them: a bounded wait, whether a pid still runs, and `ftjob run` as a
user starts it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def until(check: Callable[[], object], timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's reaping is left


def ftjob_run(
    manifest: Path, workdir: Path, out: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`ftjob run` as a user starts it, in its own process (its ranks are process groups of their own)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune_operator.cli", "run", str(manifest), "--workdir", str(workdir)],
        env=env, stdout=out.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
