"""finetune_trainer's DPO against TRL's DPOTrainer, what users would run instead: the same Llama (_common's
model arguments), the same preference pairs, batch arithmetic (micro batch x accumulation x 2 CPU ranks),
learning-rate schedule, clipping, beta, sigmoid loss, fp32 and DeepSpeed ZeRO-2 config (TRL through its
`deepspeed=` TrainingArguments path, fed the dict finetune_trainer's ds_config generates). Both precompute
the reference log-probs once before the first step (TRL's `precompute_ref_log_probs=True`), so neither keeps
a frozen copy of the model beside the trained one.

The pairs are tiny.preference_records' counting pairs (chosen continues the count, rejected is it backwards),
each distinct prompt once; a held-out set of prompts that neither side trains on is scored after training
by one evaluation here, on both sides' final models: the reward accuracy (chosen reward > rejected reward,
a reward being beta x (policy - reference) log-probability summed over the answer's tokens, reference = the
initial model, both from preference_loss.sequence_logps). TRL tokenizes the pairs itself; the benchmark
checks that it got the very token ids finetune_trainer's encoding gives.

Prints optimizer steps/s in a steady window (after `--warmup` steps; reference scoring, checkpoints and
export outside it: finetune_trainer's rate from rank 0's progress lines, TRL's from a step callback), their
ratio (aim >= 1.0) and each side's held-out reward accuracy (aim: finetune_trainer's no lower). `--runs N`
repeats the whole measurement, the two sides in alternating order, and adds the median.

    .venv/bin/python benchmarks/vs_trl_dpo.py [--runs 1] [--steps 120] [--warmup 10] [--lr 1e-4] \\
        [--beta 0.1] [--held-out 48] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from _common import REPO, add_model_arguments, print_table
from finetune_trainer.ds_config import deepspeed_config, warmup_steps
from finetune_trainer.encoding import Example
from finetune_trainer.preference_loss import sequence_logps
from finetune_trainer.preferences import encode_pair, join_pair, pair_columns
from finetune_trainer.process_group import free_port
from finetune_trainer.tiny import preference_records, write_jsonl, write_tiny_model
from safetensors.torch import load_file

from tests.support.trainer_run import Workspace, reports, run, trainer_config

SEQ = 64  # maxSeqLength / TRL's max_length; every counting pair fits whole (about 15 tokens a side)
MICRO, GLOBAL, WORLD = 4, 16, 2
LOG_EVERY = 5  # finetune_trainer's progress lines, whose timestamps give its rate
# No learning-rate warm-up: with one, the Trainer's schedule starts at lr 0 and finetune_trainer's at
# lr/warmup (one step ahead all through the warm-up); without, both are the same cosine step for step.
WARMUP_STEPS = 0


@dataclass
class Side:
    steps_per_second: float
    wall_seconds: float  # the whole run: start-up, tokenization, reference scoring, training, export
    accuracy: float = 0.0
    margin: float = 0.0


def split_pairs(held_out: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Every distinct counting pair once (a prompt fixes its pair), shuffled: `held_out` of them to score,
    the rest to train on, so no held-out prompt is ever trained on."""
    distinct = {r["prompt"]: r for r in preference_records(4000, seed=seed)}
    pairs = sorted(distinct.values(), key=lambda r: r["prompt"])
    random.Random(seed).shuffle(pairs)
    return pairs[held_out:], pairs[:held_out]


def encoded(pairs: list[dict[str, str]], tokenizer: Any) -> list[Example]:
    """The pairs as finetune_trainer encodes them (promptFormat plain: prompt, answer, end of sequence)."""
    out = []
    for n, pair in enumerate(pairs):
        chosen, chosen_labels, rejected, rejected_labels = encode_pair(pair, tokenizer, as_chat=False)
        sides = Example(str(n), chosen, chosen_labels), Example(str(n), rejected, rejected_labels)
        out.append(join_pair(*sides))
    return out


def answer_logps(model_dir: Path, pairs: list[Example], batch: int = 32) -> Any:
    """[pairs, 2]: each pair's chosen and rejected answer log-probability under the model in `model_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            part = pairs[start : start + batch]
            columns = pair_columns(part, pad_id=0)
            labels = torch.tensor(columns.pop("labels"))
            logits = model(**{k: torch.tensor(v) for k, v in columns.items()}, use_cache=False).logits
            logps, _ = sequence_logps(logits, labels)
            out.append(torch.stack([logps[: len(part)], logps[len(part) :]], dim=1).double())
    return torch.cat(out)


def held_out_rewards(policy: Path, reference: Any, pairs: list[Example], beta: float) -> tuple[float, float]:
    """The one evaluation both sides get: the reward accuracy and the mean reward margin over the held-out
    pairs, `reference` their answer_logps under the initial model."""
    rewards = beta * (answer_logps(policy, pairs) - reference)
    margins = rewards[:, 0] - rewards[:, 1]
    return float((margins > 0).double().mean()), float(margins.mean())


def _settings(args: argparse.Namespace, train: Path) -> dict[str, Any]:
    return {
        "spec.dataset.sources": [{"uri": f"file://{train}", "shape": "preference", "promptFormat": "plain"}],
        "spec.dataset.validationFraction": 0.0,  # held out by the benchmark, scored by it for both sides
        "spec.dataset.maxSeqLength": SEQ,
        "spec.training.objective": "dpo",
        "spec.training.dpo": {"beta": args.beta, "lossType": "sigmoid"},
        "spec.training.maxSteps": args.steps,
        "spec.training.logEverySteps": LOG_EVERY,
        "spec.training.microBatchSize": MICRO,
        "spec.training.globalBatchSize": GLOBAL,
        "spec.training.learningRate": args.lr,
        "spec.training.warmupSteps": WARMUP_STEPS,
        "spec.training.lrSchedule": "cosine",
        "spec.training.precision": "fp32",
        "spec.deepspeed.zeroStage": 2,
        "spec.checkpoint.everySteps": 10 * args.steps,  # only the final one, after the window
    }


def _ours(config: Any, root: Path, warmup: int) -> Side:
    started = time.monotonic()
    finished = run(config, root / "ours")
    wall = time.monotonic() - started
    if finished.code != 0:
        raise SystemExit(
            f"finetune_trainer failed ({finished.code}): {finished.termination}\n{finished.output[-4000:]}"
        )
    progress = [r.progress for r in reports(finished.output)]
    times = {p.step: p.updated_at for p in progress if p.updated_at and p.step}
    # Steps warmup+1 .. last, TRL's window too.
    first, last = min(s for s in times if s >= warmup), max(times)
    return Side((last - first) / (times[last] - times[first]).total_seconds(), wall)


def _theirs(config: Any, root: Path, args: argparse.Namespace, model: Path, train: Path,
            expected: list[Example]) -> Side:  # fmt: skip
    ds_config = deepspeed_config(config, cpu=True)
    schedule = config.schedule
    settings = {
        "model": str(model),
        "train": str(train),
        "output": str(root / "trl-out"),
        "final": str(root / "trl-final"),
        "tokens": str(root / "trl-tokens.json"),
        "cache": str(root / "trl-datasets"),
        "micro": schedule.micro_batch_size,
        "accumulation": schedule.gradient_accumulation_steps,
        "steps": args.steps,
        "warmup": args.warmup,
        "lr": schedule.learning_rate,
        "warmup_steps": warmup_steps(config, args.steps),
        "schedule": config.training.lr_schedule,
        "clipping": config.training.gradient_clipping,
        "seed": config.training.seed,
        "beta": args.beta,
        "max_length": SEQ,
        "deepspeed": ds_config,
        "adam": ds_config["optimizer"]["params"],
    }
    (root / "trl-settings.json").write_text(json.dumps(settings))
    out = root / "trl-result.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
        f"--master-port={free_port()}", str(REPO / "benchmarks" / "trl_dpo_side.py"),
        str(root / "trl-settings.json"), str(out),
    ]  # fmt: skip
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",  # as finetune_trainer's ranks
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"TRL's DPOTrainer failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    if result["steps"] != args.steps:
        raise SystemExit(f"TRL ran {result['steps']} optimizer steps, not {args.steps}")
    tokens = json.loads((root / "trl-tokens.json").read_text())
    if tokens != [[e.input_ids[: e.segments[0]], e.input_ids[e.segments[0] :]] for e in expected]:
        raise SystemExit("TRL tokenized the training pairs differently from finetune_trainer")
    return Side(result["steps_per_second"], wall)


def measure(args: argparse.Namespace, number: int) -> tuple[Side, Side, dict[str, int]]:
    """One whole measurement in a fresh directory: both trainings, then the shared evaluation."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_tiny_model(root / "model", hidden=args.hidden, layers=args.layers)
        train_pairs, held_pairs = split_pairs(args.held_out, seed=args.seed)
        train = write_jsonl(root / "data" / "train.jsonl", train_pairs)
        ws = Workspace(root=root, model_uri=f"file://{model}", data_uri=f"file://{train}")
        config = trainer_config(ws, f"file://{root}/store", _settings(args, train))
        tokenizer = AutoTokenizer.from_pretrained(model)
        expected = encoded(train_pairs, tokenizer)
        held = encoded(held_pairs, tokenizer)
        sides = {
            "ours": lambda: _ours(config, root, args.warmup),
            "theirs": lambda: _theirs(config, root, args, model, train, expected),
        }
        order = ["theirs", "ours"] if number % 2 == 0 else ["ours", "theirs"]
        done = {name: sides[name]() for name in order}
        ours, theirs = done["ours"], done["theirs"]
        reference = answer_logps(model, held)
        final = Path(config.output_uri.removeprefix("file://"))
        ours.accuracy, ours.margin = held_out_rewards(final, reference, held, args.beta)
        theirs.accuracy, theirs.margin = held_out_rewards(root / "trl-final", reference, held, args.beta)
        weights = load_file(model / "model.safetensors")
        size = {
            "parameters": sum(t.numel() for t in weights.values()),
            "train": len(train_pairs),
            "held_out": len(held_pairs),
        }
    return ours, theirs, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement; adds the median")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10, help="optimizer steps left out of the rate")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--held-out", type=int, default=48, help="distinct prompts neither side trains on")
    parser.add_argument("--seed", type=int, default=0, help="the pairs' draw and held-out split")
    add_model_arguments(parser)
    args = parser.parse_args()
    if args.warmup < 1 or args.warmup % LOG_EVERY or args.steps % LOG_EVERY or args.steps <= args.warmup:
        parser.error(f"--warmup and --steps: multiples of {LOG_EVERY} (finetune_trainer reports every "
                     f"{LOG_EVERY} steps), --steps the larger")  # fmt: skip
    import torch

    torch.set_num_threads(2)
    names, figures = [], []
    for number in range(args.runs):
        ours, theirs, size = measure(args, number)
        names.append(str(number + 1))
        figures.append(_figures(ours, theirs))
    if args.runs > 1:  # of each column, the ratio's included: the median of the runs' ratios
        names.append("median")
        figures.append([median(column) for column in zip(*figures, strict=True)])
    print_table(
        f"DPO (sigmoid, beta {args.beta}): {args.layers}-layer, {args.hidden}-wide Llama "
        f"({size['parameters'] / 1e6:.2f}M parameters), {size['train']} training pairs, {size['held_out']} "
        f"held-out, global batch {GLOBAL} pairs ({MICRO} x {GLOBAL // (MICRO * WORLD)} x {WORLD} CPU ranks), "
        f"{args.steps} steps at lr {args.lr:g} (cosine, no warm-up), fp32, ZeRO-2, reference log-probs "
        f"precomputed on both sides; steps/s over steps {args.warmup + 1}-{args.steps}; TRL runs first in "
        "odd runs, ours in even ones",
        ["run", "steps/s ours", "steps/s TRL", "ratio ours/TRL", "held-out acc ours", "held-out acc TRL"],
        [[name, *(f"{v:.3f}" for v in f[:5])] for name, f in zip(names, figures, strict=True)],
    )
    print_table(
        "Held-out mean reward margin (chosen - rejected) and each side's whole run (start-up, tokenization, "
        "reference scoring, training, final checkpoint/export)",
        ["run", "margin ours", "margin TRL", "wall s ours", "wall s TRL"],
        [[name, *(f"{v:.3f}" for v in f[5:7]), *(f"{v:.0f}" for v in f[7:])]
         for name, f in zip(names, figures, strict=True)],
    )  # fmt: skip
    print("aims: ratio ours/TRL >= 1.0; held-out reward accuracy ours >= TRL's")


def _figures(ours: Side, theirs: Side) -> list[float]:
    return [ours.steps_per_second, theirs.steps_per_second, ours.steps_per_second / theirs.steps_per_second,
            ours.accuracy, theirs.accuracy, ours.margin, theirs.margin, ours.wall_seconds,
            theirs.wall_seconds]  # fmt: skip


if __name__ == "__main__":
    main()
