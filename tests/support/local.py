"""The local backend with scripted rank programs: the same Script the test kubelet plays on the
emulated cluster, acted out by real local process groups (so signals, exits and termination
messages go through the backend's real process handling)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from finetune_operator import contract
from finetune_operator.backends.local import LocalBackend, spawn_process_group
from finetune_operator.clock import SystemClock
from finetune_operator.metrics import Metrics
from finetune_operator.policy import actions as act
from finetune_operator.reconciler import Reconciler
from finetune_operator.settings import OperatorSettings

from tests.support.kubelet import Script

RANK_PROGRAM = """
import sys, time
code, after, message, termination = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
print("rank started", flush=True)
if code == "run":
    while True:
        time.sleep(1)
time.sleep(after)
if message:
    open(termination, "w").write(message)
sys.exit(int(code))
"""


def scripted_spawner(behaviour: Script) -> Any:
    def spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
        rank = behaviour(int(env[contract.ENV_ATTEMPT]), int(env[contract.ENV_NODE_RANK]))
        code = "run" if rank.exit_code is None else str(rank.exit_code)
        args = [code, str(rank.after), rank.message, env[contract.ENV_TERMINATION_LOG]]
        return spawn_process_group([sys.executable, "-c", RANK_PROGRAM, *args], env, log_path)

    return spawn


def record_actions(backend: Any) -> list[act.Action]:
    """Every action the reconcile hands `backend`, in order (the backend still carries each out)."""
    recorded: list[act.Action] = []
    apply = backend.apply

    async def recording_apply(job: Any, action: act.Action) -> None:
        recorded.append(action)
        await apply(job, action)

    backend.apply = recording_apply
    return recorded


class RecordingLocalRun:
    """The Reconciler over a LocalBackend, pass after pass, recording the actions it receives."""

    def __init__(self, workdir: Path, behaviour: Script) -> None:
        self.backend = LocalBackend(workdir, spawn=scripted_spawner(behaviour))
        self.actions = record_actions(self.backend)
        settings = OperatorSettings(metrics_port=None, progress_poll_seconds=0.2)
        self.reconciler = Reconciler(self.backend, SystemClock(), settings, Metrics())

    async def until(self, key: tuple[str, str], phase: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await self.reconciler.reconcile(key)
            body = self.backend.read_job() or {}
            if (body.get("status") or {}).get("phase") == phase and not self.backend.running_pods():
                return body
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not {phase} within {timeout}s: {body.get('status')}")
            await asyncio.sleep(0.1)
