"""The data position's cost per optimizer step: which examples every rank trains on (and the global
batch's target count needs the global indices), for a dataset of a million examples. With
--baseline-src (a tree extracted with `git archive <commit> trainer_image operator`), the same steps
by that tree's batch schedule in the same run, as the baseline; the ratio is this tree / baseline.

Each tree runs in a process of its own: the first step of an epoch, then --steps steps after it,
for a world of 8 ranks and a global batch of 64.

    .venv/bin/python benchmarks/batch_schedule_cost.py [--examples 1000000] [--steps 20] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _common import REPO, print_table, run_in_tree

CHILD = """
import json, sys, time
try:
    from finetune_trainer.batch_schedule import BatchSchedule
except ImportError:  # a baseline tree from before the module's rename
    from finetune_trainer.step_plan import StepPlan as BatchSchedule
examples, steps = int(sys.argv[1]), int(sys.argv[2])
plan = BatchSchedule(examples=examples, global_batch=64, world_size=8, total_steps=10**9, seed=3,
                     shuffle=True)
def timed(step):
    started = time.perf_counter()
    plan.global_indices(step)
    plan.rank_indices(step, 3)
    return (time.perf_counter() - started) * 1000
first = timed(plan.steps_per_epoch)  # the first step of epoch 1
steady = sum(timed(plan.steps_per_epoch + i) for i in range(1, steps + 1)) / steps
print(json.dumps({"first": first, "steady": steady}))
"""


def _cost(src: Path, examples: int, steps: int) -> dict[str, Any]:
    """Milliseconds of an epoch's first step and of the steps after it, on average."""
    return run_in_tree(src, CHILD, str(examples), str(steps))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--baseline-src", type=Path)
    args = parser.parse_args()
    trees = {"this tree": REPO, **({"baseline": args.baseline_src} if args.baseline_src else {})}
    cost = {name: _cost(src, args.examples, args.steps) for name, src in trees.items()}
    rows = [[name, f"{c['first']:.2f}", f"{c['steady']:.3f}"] for name, c in cost.items()]
    print_table(f"Data position per step (global and one rank's indices): {args.examples} examples, world 8",
                ["batch schedule", "epoch's first step (ms)", "every later step (ms)"], rows)  # fmt: skip
    if args.baseline_src:
        for kind in ("first", "steady"):
            ratio = cost["this tree"][kind] / cost["baseline"][kind]
            print(f"ratio ({kind} step, this tree / baseline): {ratio:.2g}")


if __name__ == "__main__":
    main()
