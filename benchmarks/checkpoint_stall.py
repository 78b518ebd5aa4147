"""Checkpoint stall: seconds training is blocked per checkpoint, against (a) the in-memory snapshot
alone (aim: ratio <= 1.5) and (b) today's synchronous local save of the same checkpoint by
DeepSpeed's own checkpoint engine, measured in the same run.

Runs the real trainer (2 CPU ranks under torchrun) against moto's S3 server in its own process and
reads rank 0's per-checkpoint lines: blocked = waiting for the previous checkpoint's tail + snapshot.
The baseline is benchmarks/bare_deepspeed_loop.py on the same model, batch shape and DeepSpeed
config, timing `engine.save_checkpoint` with DeepSpeed's default TorchCheckpointEngine. The default
model (1024 wide, 8 layers, ~75M parameters, ~1.2 GB of checkpoint with its optimizer state) is the
smallest whose local save takes over a second on a laptop-class CPU.

    .venv/bin/python benchmarks/checkpoint_stall.py [--steps 16] [--every 4] [--hidden 1024] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, benchmark_workspace, new_bucket, print_table, s3_server
from finetune_trainer.ds_config import deepspeed_config
from finetune_trainer.process_group import free_port

from tests.support.trainer_run import run, trainer_config

BLOCKED = re.compile(
    r"checkpoint step (\d+): training blocked ([\d.]+)s "
    r"\(previous checkpoint ([\d.]+)s, snapshot ([\d.]+)s\)$"
)
WRITE = re.compile(r"checkpoint step (\d+): local write ([\d.]+)s$")
SEQ = 32


def _synchronous_save(model_dir: str, ds_config: dict[str, object], root: Path) -> float:
    path = root / "ds_config.json"
    path.write_text(json.dumps(ds_config))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
         str(REPO / "benchmarks" / "bare_deepspeed_loop.py"), model_dir, str(path), str(SEQ), "3", "1",
         "--save-to", str(root / "sync-save")],
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = next(line for line in out.stdout.splitlines() if line.startswith("BARE_SAVE_SECONDS"))
    return float(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
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
                "spec.dataset.packing": True,  # full windows, like the baseline's batches
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
        model_dir = ws.model_uri.removeprefix("file://")
        synchronous = _synchronous_save(model_dir, deepspeed_config(config, cpu=True), root)
    lines = finished.output.splitlines()
    rows = [m.groups() for line in lines if (m := BLOCKED.search(line))]
    writes = dict(m.groups() for line in lines if (m := WRITE.search(line)))
    background = [r for r in rows if int(r[0]) != args.steps]  # the final one waits for its commit on purpose
    blocked = sum(float(r[1]) for r in background) / len(background)
    snapshot = sum(float(r[3]) for r in background) / len(background)
    print_table(
        f"Checkpoints: {args.layers}-layer, {args.hidden}-wide Llama, 2 CPU ranks, every {args.every} steps",
        ["step", "training blocked (s)", "waiting for previous (s)", "snapshot (s)", "local write (s)"],
        [[r[0], r[1], r[2], r[3], writes.get(r[0], "?")] for r in background],
    )
    print(f"today's synchronous local save (DeepSpeed TorchCheckpointEngine), mean of 3: {synchronous:.3f}s")
    print(f"ratio (blocked / in-memory snapshot alone): {blocked / snapshot:.3f}  (aim <= 1.5)")
    print(f"ratio (blocked / synchronous local save): {blocked / synchronous:.3f}")


if __name__ == "__main__":
    main()
