"""Checkpoint stall: seconds training is blocked per checkpoint when checkpoints upload to S3 in the
background, over the same checkpoints' save to local disk alone. Aim: ratio <= 1.15.

Runs the real trainer (2 CPU ranks under torchrun) against moto's S3 server in its own process and
reads rank 0's per-checkpoint timing lines: blocked = waiting for the previous upload + local save.

    .venv/bin/python benchmarks/checkpoint_stall.py [--steps 40] [--every 5] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

from _common import add_model_arguments, benchmark_workspace, new_bucket, print_table, s3_server

from tests.support.trainer_run import run, trainer_config

LINE = re.compile(
    r"checkpoint step (\d+): training blocked ([\d.]+)s \(previous upload ([\d.]+)s, local save ([\d.]+)s\)$"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    add_model_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, s3_server() as url:
        root = Path(tmp)
        ws = benchmark_workspace(root, args)
        bucket = new_bucket(url)
        config = trainer_config(
            ws,
            f"s3://{bucket}/runs",
            {
                "spec.training.maxSteps": args.steps,
                "spec.checkpoint.everySteps": args.every,
                "spec.checkpoint.endpointUrl": url,
                "spec.checkpoint.keepLast": 2,
                "spec.dataset.validationFraction": 0.0,
            },
        )
        finished = run(
            config,
            root / "work",
            env={k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
        )
    if finished.code != 0:
        raise SystemExit(
            f"trainer failed ({finished.code}): {finished.termination}\n{finished.output[-3000:]}"
        )
    rows = [m.groups() for line in finished.output.splitlines() if (m := LINE.search(line))]
    background = [r for r in rows if int(r[0]) != args.steps]  # the final one waits for its commit on purpose
    blocked = sum(float(r[1]) for r in background)
    local = sum(float(r[3]) for r in background)
    print_table(
        f"Checkpoints: {args.layers}-layer, {args.hidden}-wide Llama, 2 CPU ranks, every {args.every} steps",
        ["step", "training blocked (s)", "waiting for previous upload (s)", "local save (s)"],
        [[r[0], r[1], r[2], r[3]] for r in background],
    )
    print(
        f"ratio (blocked with background S3 upload / local save alone): {blocked / local:.3f}  (aim <= 1.15)"
    )


if __name__ == "__main__":
    main()
