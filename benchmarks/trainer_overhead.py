"""Trainer overhead: finetune_trainer's optimizer steps/s over a bare DeepSpeed loop on the same model,
batch shape and DeepSpeed config, both 2 CPU ranks under torchrun. Aim: ratio >= 0.95.

The trainer's rate is read from rank 0's progress lines (their timestamps), after the same warm-up
steps the bare loop skips; checkpoints and evaluation are kept out of the measured window.

    .venv/bin/python benchmarks/trainer_overhead.py [--steps 60] [--warmup 10] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import REPO, add_model_arguments, benchmark_workspace, print_table
from finetune_trainer.ds_config import deepspeed_config
from finetune_trainer.process_group import free_port

from tests.support.trainer_run import Workspace, reports, run, trainer_config

SEQ = 64


def _bare(ws: Workspace, ds_config: dict[str, object], steps: int, warmup: int, root: Path) -> float:
    path = root / "ds_config.json"
    path.write_text(json.dumps(ds_config))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            f"--master-port={free_port()}",
            str(REPO / "benchmarks" / "bare_deepspeed_loop.py"),
            ws.model_uri.removeprefix("file://"),
            str(path),
            str(SEQ),
            str(steps),
            str(warmup),
        ],
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(line for line in out.stdout.splitlines() if line.startswith("BARE_STEPS_PER_SECOND"))
    return float(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    add_model_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ws = benchmark_workspace(root, args)
        config = trainer_config(
            ws,
            f"file://{root}/store",
            {
                "spec.training.maxSteps": args.steps,
                "spec.training.logEverySteps": 5,
                "spec.dataset.maxSeqLength": SEQ,
                "spec.dataset.packing": True,  # every sequence a full window, like the bare loop's
                "spec.dataset.validationFraction": 0.0,
                "spec.checkpoint.everySteps": 10 * args.steps,  # only the final one, after the window
            },
        )
        ds_config = deepspeed_config(config, cpu=True)
        # The baseline runs before and after the trainer, and the ratio takes their mean: on a machine
        # shared with other work, load that drifts during the run then biases neither side.
        bare_before = _bare(ws, ds_config, args.steps, args.warmup, root)
        ours = _ours(config, root, args.warmup)
        bare_after = _bare(ws, ds_config, args.steps, args.warmup, root)
    bare = (bare_before + bare_after) / 2
    print_table(
        f"{args.layers}-layer, {args.hidden}-wide Llama, {SEQ}-token sequences, global batch "
        f"{config.schedule.global_batch_size}, 2 CPU ranks",
        ["loop", "optimizer steps/s"],
        [
            ["bare DeepSpeed (before)", f"{bare_before:.3f}"],
            ["finetune_trainer", f"{ours:.3f}"],
            ["bare DeepSpeed (after)", f"{bare_after:.3f}"],
        ],
    )
    print(f"ratio (finetune_trainer / bare DeepSpeed, steps/s): {ours / bare:.3f}  (aim >= 0.95)")


def _ours(config: Any, root: Path, warmup: int) -> float:
    finished = run(config, root / "work")
    if finished.code != 0:
        raise SystemExit(f"trainer failed ({finished.code}): {finished.termination}")
    progress = [r.progress for r in reports(finished.output)]
    times = {p.step: p.updated_at for p in progress if p.updated_at}
    first, last = min(s for s in times if s and s >= warmup), max(s for s in times if s)
    return (last - first) / (times[last] - times[first]).total_seconds()


if __name__ == "__main__":
    main()
