"""Checkpoint upload MB/s: the trainer's uploader (CheckpointStore.upload_node: multipart with
concurrent parts, plus a SHA-256 of every file for the manifest) over boto3's default `upload_file`
of the same files to the same endpoint. Aim: ratio >= 1.0.

    .venv/bin/python benchmarks/upload_throughput.py [--files 4] [--mib 96] [--repeat 4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import boto3
from _common import REPO, new_bucket, print_table, s3_server
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.storage import open_store


def _files(root: Path, count: int, mib: int) -> Path:
    for i in range(count):
        with (root / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt").open("wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mib", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--link-ms", type=float, default=1.0, help="delay per 16 KiB sent, per connection")
    args = parser.parse_args()
    total_mib = args.files * args.mib
    with tempfile.TemporaryDirectory() as tmp, s3_server() as direct:
        local = _files(Path(tmp), args.files, args.mib)
        rows, ratios = [], {}
        for link, delay in (
            ("loopback", 0.0),
            (f"{16 / args.link_ms:.0f} MB/s per connection", args.link_ms / 1000),
        ):
            best_base, best_ours = _measure(direct, local, args.repeat, delay)
            rows += [
                [
                    link,
                    "boto3 upload_file, default config",
                    f"{best_base:.2f}",
                    f"{total_mib / best_base:.1f}",
                ],
                [
                    link,
                    "finetune_trainer upload_node (+SHA-256)",
                    f"{best_ours:.2f}",
                    f"{total_mib / best_ours:.1f}",
                ],
            ]
            ratios[link] = best_base / best_ours
    print_table(
        f"Upload of {args.files} x {args.mib} MiB to moto's S3 server (best of {args.repeat})",
        ["link", "uploader", "seconds", "MiB/s"],
        rows,
    )
    for link, ratio in ratios.items():
        print(f"ratio (ours / boto3 default, MB/s) over {link}: {ratio:.2f}  (aim >= 1.0)")


@contextmanager
def _link(direct: str, delay: float) -> Iterator[str]:
    """The server itself, or a relay process that limits each connection's upload bandwidth the
    way a real network path does (loopback has no such limit; only CPU is scarce there)."""
    if not delay:
        yield direct
        return
    upstream = urlparse(direct)
    relay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.slow_link",
            upstream.hostname or "",
            str(upstream.port),
            str(delay),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stdout is not None
        yield relay.stdout.readline().strip()
    finally:
        relay.terminate()
        relay.wait(10)


def _measure(direct: str, local: Path, repeat: int, delay: float) -> tuple[float, float]:
    with _link(direct, delay) as url:
        os.environ["AWS_ENDPOINT_URL_S3"] = url
        ours: list[float] = []
        baseline: list[float] = []
        client = boto3.client("s3", endpoint_url=url)

        def run_baseline(bucket: str) -> None:
            for path in sorted(local.iterdir()):
                client.upload_file(str(path), bucket, f"baseline/{path.name}")

        def run_ours(bucket: str) -> None:
            CheckpointStore(open_store(f"s3://{bucket}/ours")).upload_node(1, 0, local)

        for attempt in range(repeat):
            # Alternate who goes first, and empty the server between runs: the server keeps
            # objects in memory, and whoever uploads into a fuller server is slower.
            order = [(run_baseline, baseline), (run_ours, ours)]
            for fn, times in order if attempt % 2 == 0 else reversed(order):
                bucket = new_bucket(url)
                start = time.perf_counter()
                fn(bucket)
                times.append(time.perf_counter() - start)
                boto3.resource("s3", endpoint_url=url).Bucket(bucket).objects.all().delete()
        return min(baseline), min(ours)


if __name__ == "__main__":
    main()
