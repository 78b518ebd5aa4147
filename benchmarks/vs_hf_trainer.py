"""finetune_trainer against transformers.Trainer, what users would run instead: the same ~8-layer x
512 Llama, the same examples (finetune_trainer's own split and encoding, so the validation set is
identical), the same batch arithmetic (micro batch x accumulation x 2 CPU ranks), learning-rate
schedule, clipping and DeepSpeed ZeRO-2 config. Prints steps/s and tokens/s after a warm-up, their
ratios (aim >= 1.0), and each side's final validation loss (mean cross-entropy per target token).

`--packing` compares finetune_trainer's packed windows with the Trainer's best packing option,
`DataCollatorWithFlattening` (padding-free, position ids per example): a step then holds different
sequences on each side, so compare tokens/s there, not steps/s. `--ddp` drives the Trainer through its
DDP path on gloo instead of DeepSpeed.

    .venv/bin/python benchmarks/vs_hf_trainer.py [--steps 40] [--warmup 5] [--hidden 512] [--layers 8] \\
        [--packing] [--ddp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean
from typing import Any

from _common import REPO, print_table
from finetune_trainer.ds_config import deepspeed_config, warmup_steps
from finetune_trainer.model import load_tokenizer
from finetune_trainer.prepared_data import build
from finetune_trainer.process_group import free_port

from tests.support.trainer_run import Workspace, reports, run, trainer_config

SEQ = 128


def _settings(args: argparse.Namespace, packing: bool) -> dict[str, Any]:
    return {
        "spec.training.maxSteps": args.steps,
        "spec.training.logEverySteps": 5,
        "spec.training.evalEverySteps": args.steps,
        "spec.training.microBatchSize": 4,
        "spec.training.globalBatchSize": 16,
        "spec.training.learningRate": 3e-4,
        "spec.training.warmupSteps": 3,
        "spec.dataset.maxSeqLength": SEQ,
        "spec.dataset.packing": packing,
        "spec.dataset.validationFraction": 0.05,
        "spec.checkpoint.everySteps": 10 * args.steps,  # only the final one, after the window
    }


def _ours(config: Any, root: Path, warmup: int) -> tuple[float, float, float]:
    finished = run(config, root / "ours")
    if finished.code != 0:
        raise SystemExit(f"finetune_trainer failed ({finished.code}): {finished.termination}")
    progress = [r.progress for r in reports(finished.output)]
    times = {p.step: p.updated_at for p in progress if p.updated_at}
    first, last = min(s for s in times if s and s > warmup), max(s for s in times if s)
    rate = (last - first) / (times[last] - times[first]).total_seconds()
    tokens = [p.tokens_per_second for p in progress if p.step and p.step > first and p.tokens_per_second]
    eval_loss = next(p.eval_loss for p in reversed(progress) if p.eval_loss is not None)
    return rate, mean(tokens), eval_loss


def _theirs(ws: Workspace, config: Any, root: Path, args: argparse.Namespace) -> tuple[float, float, float]:
    # The Trainer gets the examples unpacked: packing is its collator's job.
    plain = trainer_config(ws, f"file://{root}/store-hf", _settings(args, packing=False))
    tokenizer = load_tokenizer(plain, ws.model_uri.removeprefix("file://"))
    train, validation, _ = build(plain, {0: [Path(ws.data_uri.removeprefix("file://"))]}, tokenizer)
    data = root / "hf-data.json"
    rows = lambda examples: [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]  # noqa: E731
    data.write_text(json.dumps({"train": rows(train), "validation": rows(validation)}))
    global_batch, world = config.schedule.global_batch_size, 2
    ds_config = deepspeed_config(plain, cpu=True)
    micro = config.training.micro_batch_size
    settings = {
        "model": ws.model_uri.removeprefix("file://"),
        "data": str(data),
        "output": str(root / "hf-out"),
        "micro": micro,
        "accumulation": global_batch // (micro * world),
        "steps": args.steps,
        "warmup": args.warmup,
        "lr": config.schedule.learning_rate,
        "warmup_steps": warmup_steps(config, args.steps),
        "clipping": config.training.gradient_clipping,
        "seed": config.training.seed,
        "packing": args.packing,
        "deepspeed": None if args.ddp else ds_config,
        "adam": ds_config["optimizer"]["params"],
    }
    (root / "hf-settings.json").write_text(json.dumps(settings))
    out = root / "hf-result.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
        f"--master-port={free_port()}", str(REPO / "benchmarks" / "hf_trainer_side.py"),
        str(root / "hf-settings.json"), str(out),
    ]  # fmt: skip
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"transformers.Trainer failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    tokens_per_step = mean(len(e.input_ids) for e in train) * global_batch
    return result["steps_per_second"], result["steps_per_second"] * tokens_per_step, result["eval_loss"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--ddp", action="store_true", help="the Trainer on DDP/gloo instead of DeepSpeed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ws = Workspace.create(root / "inputs", records=1200, hidden=args.hidden, layers=args.layers)
        config = trainer_config(ws, f"file://{root}/store", _settings(args, args.packing))
        theirs = _theirs(ws, config, root, args)
        ours = _ours(config, root, args.warmup)
    peer = "transformers.Trainer " + ("DDP gloo" if args.ddp else "DeepSpeed ZeRO-2")
    print_table(
        f"{args.layers}-layer, {args.hidden}-wide Llama, {SEQ}-token window, global batch 16 (4 x 2 x 2 "
        f"CPU ranks), {args.steps} steps, packing {'on' if args.packing else 'off'}",
        ["trainer", "steps/s", "tokens/s", "final eval loss"],
        [
            [peer, f"{theirs[0]:.3f}", f"{theirs[1]:.0f}", f"{theirs[2]:.4f}"],
            ["finetune_trainer ZeRO-2", f"{ours[0]:.3f}", f"{ours[1]:.0f}", f"{ours[2]:.4f}"],
        ],
    )
    print(f"ratio steps/s (ours / Trainer): {ours[0] / theirs[0]:.3f}   tokens/s: {ours[1] / theirs[1]:.3f}")


if __name__ == "__main__":
    main()
