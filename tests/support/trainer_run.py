"""Run the real trainer under torchrun (through its launcher) on CPU, the way a rank pod does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_operator.api import parse_manifest
from finetune_operator.api.trainer_config import TrainerConfig, resolve_trainer_config
from finetune_operator.progress import ProgressReport, parse_all, parse_last
from finetune_trainer.process_group import free_port
from finetune_trainer.tiny import counting_records, write_jsonl, write_tiny_model

from tests.support.factories import manifest

RUN_TIMEOUT = 420.0


@dataclass
class Workspace:
    root: Path
    model_uri: str
    data_uri: str

    @classmethod
    def create(
        cls, root: Path, *, records: int = 192, seed: int = 0, hidden: int = 64, layers: int = 2
    ) -> Workspace:
        model = write_tiny_model(root / "model", seed=seed, hidden=hidden, layers=layers)
        data = write_jsonl(root / "data" / "train.jsonl", counting_records(records, seed=seed))
        return cls(root=root, model_uri=f"file://{model}", data_uri=f"file://{data}")


def tiny_job_manifest(ws: Workspace, store_uri: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Two CPU ranks, fp32, ZeRO-2, checkpoints every 4 steps: changes override any of it."""
    base = {
        "spec.model.source": ws.model_uri,
        "spec.dataset.sources": [{"uri": ws.data_uri, "shape": "promptCompletion"}],
        "spec.dataset.maxSeqLength": 32,
        "spec.dataset.validationFraction": 0.1,
        "spec.training.maxSteps": 12,
        "spec.training.microBatchSize": 4,
        "spec.training.globalBatchSize": 16,
        "spec.training.learningRate": 0.01,
        "spec.training.warmupSteps": 1,
        "spec.training.precision": "fp32",
        "spec.training.gradientCheckpointing": False,
        "spec.training.logEverySteps": 2,
        "spec.deepspeed.zeroStage": 2,
        "spec.resources.gpusPerNode": 0,
        "spec.resources.processesPerNode": 2,
        "spec.checkpoint.uri": store_uri,
        "spec.checkpoint.everySteps": 4,
        "spec.checkpoint.everyMinutes": 0,
        "spec.checkpoint.keepLast": 2,
    }
    return manifest({**base, **(changes or {})}, name="tiny")


def trainer_config(ws: Workspace, store_uri: str, changes: dict[str, Any] | None = None) -> TrainerConfig:
    return resolve_trainer_config(parse_manifest(tiny_job_manifest(ws, store_uri, changes)))


@dataclass
class Finished:
    code: int
    output: str
    termination: str

    @property
    def progress(self) -> ProgressReport | None:
        return parse_last(self.output)


@dataclass
class TrainerProcess:
    proc: subprocess.Popen[str]
    log_path: Path
    termination_path: Path
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = RUN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.output()):
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited {self.proc.returncode} first:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def worker_pids(self) -> list[int]:
        """The launcher's rank processes, read from /proc (a bare machine may have no pgrep)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
            if parent == self.proc.pid and b"finetune_trainer --config" in cmdline:
                pids.append(int(stat.parent.name))
        return pids

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def finish(self, timeout: float = RUN_TIMEOUT) -> Finished:
        code = self.proc.wait(timeout)
        text = self.termination_path.read_text().strip() if self.termination_path.exists() else ""
        return Finished(code=code, output=self.output(), termination=text)


def start(config: TrainerConfig | str, workdir: Path, *, nproc: int = 2, env: dict[str, str] | None = None,
          name: str = "run", nnodes: int = 1, node_rank: int = 0, master_port: int | None = None,
          ) -> TrainerProcess:  # fmt: skip
    """One node rank's launcher, as a rank pod runs it; for several nodes, start each with its
    node_rank, the same master_port and a workdir of its own (its own scratch disk)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{name}-config.json"
    text = config if isinstance(config, str) else config.model_dump_json(by_alias=True, exclude_none=True)
    config_path.write_text(text)
    log_path, termination = workdir / f"{name}.log", workdir / f"{name}-termination.log"
    termination.unlink(missing_ok=True)
    full_env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "FTJOB_SCRATCH_DIR": str(workdir / "scratch"),
        "FTJOB_TERMINATION_LOG": str(termination),
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60",
        **(env or {}),
    }
    command = [
        sys.executable, "-m", "finetune_trainer.launch", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
        f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={master_port or free_port()}",
        "--max-restarts=0",
        "-m", "finetune_trainer", "--config", str(config_path),
    ]  # fmt: skip
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
    return TrainerProcess(proc=proc, log_path=log_path, termination_path=termination)


def run(config: TrainerConfig | str, workdir: Path, **kwargs: Any) -> Finished:
    return start(config, workdir, **kwargs).finish()


def sample_trace(directory: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(directory.glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        rows += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines() if line]
    return rows


def reports(output: str) -> list[ProgressReport]:
    """Every progress report rank 0 printed, in order."""
    return parse_all(output)


def losses(output: str) -> list[float]:
    return [r.progress.loss for r in reports(output) if r.progress.loss is not None]


def worker_pid(process: TrainerProcess, rank: int, timeout: float = 60.0) -> int:
    """The pid of the worker with global rank `rank` (read from its environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in process.worker_pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no worker with rank {rank} in {timeout}s")


def last_trained(trace: list[dict[str, Any]]) -> dict[tuple[int, int], list[str]]:
    """(step, rank) -> ids of the run that trained that step last: what the final model learned from."""
    out: dict[tuple[int, int], list[str]] = {}
    for row in trace:  # appended in time order, so a retrained step overrides the lost one
        out[(row["step"], row["rank"])] = row["ids"]
    return out
