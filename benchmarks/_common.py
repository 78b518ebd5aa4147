"""Shared by the benchmarks: an S3 endpoint in its own process, so the server does not compete with
the code under test for this process's interpreter lock, and a results table."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from finetune_trainer.process_group import free_port

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ACCESS_KEY, SECRET_KEY = "AKIABENCHMARK0000001", "benchmark-secret"


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server as a separate process; sets the credentials/endpoint env for boto3."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_ENDPOINT_URL_S3=url,
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(10)


def new_bucket(url: str) -> str:
    name = f"bench-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=name)
    return name


def run_in_tree(src: Path, code: str, *arguments: str) -> dict[str, Any]:
    """Run `code` in a Python process that imports the trainer and the operator from the tree `src`
    (this checkout, or a baseline from `git archive <commit> trainer_image operator`); the JSON object
    its last line prints."""
    env = {**os.environ, "PYTHONPATH": f"{src / 'trainer_image'}{os.pathsep}{src / 'operator'}"}
    done = subprocess.run([sys.executable, "-c", code, *arguments], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the run in {src} failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


POLL = 0.02


def wait_until(check: Callable[[], Any], what: str, timeout: float = 600.0) -> float:
    """Poll `check` every POLL seconds; the moment it first held (time.monotonic), or exit naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(POLL)
    raise SystemExit(f"benchmark: not within {timeout:.0f}s: {what}")


def text_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model the trainer benchmarks train: bigger than the tests' so a step is not all overhead."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)


def benchmark_workspace(root: Path, args: argparse.Namespace) -> Any:
    from tests.support.trainer_run import Workspace

    return Workspace.create(root / "inputs", records=800, hidden=args.hidden, layers=args.layers)
