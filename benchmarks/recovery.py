"""Recovery with a model that takes time to fetch: seconds from a failure to the first training step
after it, in `ftjob run`, with the model (default 1 GB) and the checkpoints in S3 (moto, a process
of its own) behind a link throttled to `--mbps` for downloads (tests/support/slow_link.py).

    .venv/bin/python benchmarks/recovery.py [--runs 3] [--hidden 1024] [--layers 28] [--mbps 100]

One CPU rank with checkpoints every 2 steps; once a checkpoint is committed its training process
crashes (SIGSEGV from this script: an application failure, restarted in place). Measured in the
same run:
  in place   the launcher restarts the training processes inside the pod: the model and the node's
             checkpoint files are on its scratch disk (runPolicy.inPlaceRestarts, the default);
  pod level  the same failure with runPolicy.inPlaceRestarts 0: a new attempt's pod, an empty
             scratch disk, the model and the checkpoint downloaded again;
  floor      a fresh `ftjob run` of the job with the model and the store on local disk: imports,
             model load, DeepSpeed init and the checkpoint load, nothing over the link;
  cold start the first attempt's pod start to its first step (model download included).
Each moment is when this script first sees it (the rank's log, polled every 20 ms).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import yaml
from _common import new_bucket, print_table, s3_server, text_of, wait_until

from tests.support.slow_link import slow_link
from tests.support.trainer_run import Workspace, tiny_job_manifest

MAX_STEPS = 400  # never reached: each run is stopped at its first step after the failure


def _wait(check: Callable[[], Any], what: str) -> float:
    return wait_until(check, what, timeout=900.0)  # a 1 GB model's checkpoints take minutes here


COMMITTED = re.compile(r"checkpoint step \d+ committed")
STEP_LINE = re.compile(r'FTJOB_PROGRESS \{"progress":\{"step":(\d+)')


def _upload_dir(bucket: str, prefix: str, local: Path) -> None:
    client = boto3.client("s3")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def _download_prefix(bucket: str, prefix: str, local: Path) -> None:
    client = boto3.client("s3")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            dest = local / obj["Key"][len(prefix) :].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(dest))


def _job(
    root: Path, ws: Workspace, model: str, store: str, endpoint: str | None, changes: dict[str, Any]
) -> Path:
    job = tiny_job_manifest(
        ws,
        store,
        {
            "spec.model.source": model,
            "spec.resources.nodes": 1,
            "spec.resources.processesPerNode": 1,
            "spec.training.maxSteps": MAX_STEPS,
            "spec.training.microBatchSize": 1,
            "spec.training.globalBatchSize": 2,
            "spec.training.logEverySteps": 1,
            "spec.checkpoint.everySteps": 2,
            "spec.checkpoint.keepLast": 1,
            "spec.dataset.validationFraction": 0.0,
            "spec.runPolicy.backoffBaseSeconds": 1,
            "spec.runPolicy.backoffCapSeconds": 1,
            **({"spec.checkpoint.endpointUrl": endpoint} if endpoint else {}),
            **changes,
        },
    )
    job["metadata"]["namespace"] = "default"
    root.mkdir(parents=True, exist_ok=True)
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _ftjob_run(root: Path, manifest: Path) -> tuple[subprocess.Popen[bytes], Path]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
    command = [
        sys.executable,
        "-m",
        "finetune_operator.cli",
        "run",
        str(manifest),
        "--workdir",
        str(root / "run"),
    ]
    out = (root / "out.log").open("w")
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT), root / "run"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill `ftjob run`: its rank supervisors end every rank with it (rank_supervisor.py)."""
    proc.kill()
    proc.wait(60)
    time.sleep(2)


def _trainer_pid() -> int | None:
    """The training process under a rank "pod" (supervisor -> launcher -> worker), from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"-m finetune_trainer --config" in cmdline and b"finetune_trainer.launch" not in cmdline:
            return int(stat.parent.name)
    return None


def _resumed_step(text: str) -> list[int]:
    at = max(text.rfind("resuming at step"), text.rfind("starting at step"))
    return [] if at < 0 else [int(s) for s in STEP_LINE.findall(text[at:])]


def failure_to_step(root: Path, manifest: Path, pod_after: str) -> dict[str, float]:
    """Run the job, crash its training process once a checkpoint is committed; seconds from the
    crash to the first step after it (in `pod_after`'s log), and the first attempt's cold start."""
    proc, work = _ftjob_run(root, manifest)
    first, after = work / "logs" / "tiny-a1-n0.log", work / "logs" / f"{pod_after}.log"
    try:
        spawned = _wait(lambda: (work / "pods" / "tiny-a1-n0.json").exists(), "attempt 1 started")
        first_step = _wait(lambda: STEP_LINE.search(text_of(first)), "attempt 1's first step")
        _wait(lambda: COMMITTED.search(text_of(first)), "a committed checkpoint")
        pid = _trainer_pid()
        if pid is None:
            raise SystemExit("benchmark: no training process found")
        crashed = time.monotonic()
        os.kill(pid, signal.SIGSEGV)
        mark = len(text_of(after)) if after == first else 0
        resumed = _wait(lambda: _resumed_step(text_of(after)[mark:]), "a step after the crash")
        if "resuming at step" not in text_of(after)[mark:]:
            raise SystemExit(f"benchmark: {pod_after} did not resume from the committed checkpoint")
    finally:
        _stop(proc)
    return {"cold start": first_step - spawned, "recovery": resumed - crashed}


def floor(root: Path, model_dir: Path, bucket: str, job_prefix: str, ws: Workspace) -> float:
    """A fresh process with everything on local disk: the store copied out of S3 first."""
    store = root / "store"
    _download_prefix(bucket, job_prefix, store / "default" / "tiny")
    manifest = _job(root, ws, f"file://{model_dir}", f"file://{store}", None, {})
    proc, work = _ftjob_run(root, manifest)
    log = work / "logs" / "tiny-a1-n0.log"
    try:
        spawned = _wait(lambda: (work / "pods" / "tiny-a1-n0.json").exists(), "the floor's pod")
        stepped = _wait(lambda: _resumed_step(text_of(log)), "the floor's first step")
        if "resuming at step" not in text_of(log):
            raise SystemExit(f"benchmark: the floor did not resume:\n{text_of(log)[-3000:]}")
    finally:
        _stop(proc)
    return stepped - spawned


def one_run(root: Path, args: argparse.Namespace, url: str) -> dict[str, float]:
    ws = Workspace.create(root / "ws", records=256, hidden=args.hidden, layers=args.layers)
    model_dir = Path(urlparse(ws.model_uri).path)
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    bucket = new_bucket(url)
    _upload_dir(bucket, "models/big", model_dir)
    upstream = urlparse(url)
    delay = 16 * 1024 / (args.mbps * 1e6)  # slow_link throttles per 16 KiB
    with slow_link(
        upstream.hostname or "", upstream.port or 0, upload_delay=0.0, download_delay=delay
    ) as slow:
        model = f"s3://{bucket}/models/big"
        in_place = failure_to_step(
            root / "in-place",
            _job(root / "in-place", ws, model, f"s3://{bucket}/in-place", slow, {}),
            "tiny-a1-n0",
        )
        pod_level = failure_to_step(
            root / "pod-level",
            _job(
                root / "pod-level",
                ws,
                model,
                f"s3://{bucket}/pod-level",
                slow,
                {"spec.runPolicy.inPlaceRestarts": 0},
            ),
            "tiny-a2-n0",
        )
    fresh = floor(root / "floor", model_dir, bucket, "pod-level/default/tiny", ws)
    return {
        "model GB": size / 1e9,
        "cold start": in_place["cold start"],
        "in place": in_place["recovery"],
        "pod level": pod_level["recovery"],
        "floor": fresh,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--mbps", type=float, default=100.0, help="download throughput of the link, MB/s")
    args = parser.parse_args()
    results = []
    with s3_server() as url:
        for i in range(args.runs):
            (root := Path(tempfile.mkdtemp(prefix="ftjob-recovery-")))
            try:
                results.append(one_run(root, args, url))
            finally:
                shutil.rmtree(root, ignore_errors=True)
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[-1].items()), flush=True)
    rows = [[k, *(f"{r[k]:.2f}" for r in results)] for k in results[0]]
    ratios = {
        "in place / pod level (aim <= 0.3)": ("in place", "pod level"),
        "in place / floor (aim <= 1.2)": ("in place", "floor"),
        "in place / cold start": ("in place", "cold start"),
        "pod level / cold start": ("pod level", "cold start"),
    }
    rows += [[name, *(f"{r[a] / r[b]:.2f}" for r in results)] for name, (a, b) in ratios.items()]
    print_table(
        f"seconds from a failure to the first step after it ({args.mbps:.0f} MB/s link, 1 CPU rank)",
        ["", *(f"run {i + 1}" for i in range(len(results)))],
        rows,
    )


if __name__ == "__main__":
    main()
