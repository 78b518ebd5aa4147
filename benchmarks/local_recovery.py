"""Recovery under `ftjob run`: seconds from a rank's death to the first training step of the next
attempt, split into detection, backoff (with the old attempt's ranks terminating), process start
(imports, model, DeepSpeed init) and checkpoint load, against the same run's cold start (first
attempt: spawn to first step) as the baseline.

    .venv/bin/python benchmarks/local_recovery.py [--runs 2] [--backoff 1]

Two node ranks on CPU (the tiny Llama); rank 1's process group is SIGKILLed right after the first
committed checkpoint, as a lost node would kill it. Each moment is the time this script first sees
it (polling the workdir every 20 ms), so every figure carries up to 20 ms of sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import print_table, text_of, wait_until

from tests.support.trainer_run import Workspace, tiny_job_manifest


def _stepped(log: Path, after: int) -> bool:
    steps = [int(s) for s in re.findall(r'FTJOB_PROGRESS \{"progress":\{"step":(\d+)', text_of(log))]
    return any(s > after for s in steps)


def one_run(root: Path, backoff: int) -> dict[str, float]:
    ws = Workspace.create(root / "ws", records=512)
    job = tiny_job_manifest(
        ws,
        f"file://{root / 'store'}",
        {
            "spec.resources.nodes": 2,
            "spec.resources.processesPerNode": 1,
            "spec.training.maxSteps": 120,
            "spec.training.logEverySteps": 1,
            "spec.checkpoint.everySteps": 5,
            "spec.runPolicy.backoffBaseSeconds": backoff,
            "spec.runPolicy.backoffCapSeconds": backoff,
        },
    )
    job["metadata"]["namespace"] = "default"
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    work = root / "run"
    logs, pods, events = work / "logs", work / "pods", work / "events.jsonl"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "finetune_operator.cli",
        "run",
        str(root / "job.yaml"),
        "--workdir",
        str(work),
    ]
    with (root / "out.log").open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            spawned1 = wait_until(lambda: (pods / "tiny-a1-n0.json").exists(), "attempt 1 started")
            first_step1 = wait_until(lambda: _stepped(logs / "tiny-a1-n0.log", 0), "attempt 1 first step")
            wait_until(lambda: "committed" in text_of(logs / "tiny-a1-n0.log"), "a committed checkpoint")
            pid = json.loads((pods / "tiny-a1-n1.json").read_text())["local"]["pid"]
            killed = time.monotonic()
            os.killpg(pid, signal.SIGKILL)
            detected = wait_until(lambda: "RankFailed" in text_of(events), "the failure recorded")
            spawned2 = wait_until(lambda: (pods / "tiny-a2-n0.json").exists(), "attempt 2 started")
            log2 = logs / "tiny-a2-n0.log"
            resumed_line = wait_until(lambda: "resuming at step" in text_of(log2), "attempt 2 resumed")
            resumed = int(re.search(r"resuming at step (\d+)", text_of(log2))[1])  # type: ignore[index]
            first_step2 = wait_until(lambda: _stepped(log2, resumed), "attempt 2 first step")
            load = float(re.search(r"loaded checkpoint step \d+ in ([\d.]+)s", text_of(log2))[1])  # type: ignore[index]
            if proc.wait(600) != 0:
                raise SystemExit(f"benchmark: ftjob run failed:\n{text_of(root / 'out.log')[-3000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
    return {
        "detection": detected - killed,
        "backoff + old ranks exit": spawned2 - detected,
        "process start": resumed_line - spawned2 - load,
        "checkpoint load": load,
        "to first step": first_step2 - resumed_line,
        "recovery": first_step2 - killed,
        "cold start": first_step1 - spawned1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--backoff", type=int, default=1, help="runPolicy backoff base = cap, seconds")
    args = parser.parse_args()
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ftjob-recovery-") as tmp:
            results.append(one_run(Path(tmp), args.backoff))
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in results[-1].items()), flush=True)
    keys = list(results[0])
    rows = [[k, *(f"{r[k]:.2f}" for r in results)] for k in keys]
    best = {k: min(r[k] for r in results) for k in keys}
    rows.append(["recovery / cold start", *(f"{r['recovery'] / r['cold start']:.2f}" for r in results)])
    print_table(
        f"seconds from a rank's death to attempt 2's first step (backoff {args.backoff}s, 2 CPU ranks)",
        ["segment", *(f"run {i + 1}" for i in range(args.runs))],
        rows,
    )
    print(f"best recovery {best['recovery']:.2f}s vs best cold start {best['cold start']:.2f}s: "
          f"ratio {best['recovery'] / best['cold start']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
