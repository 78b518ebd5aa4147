"""Resume traffic: bytes each node downloads to resume, over the checkpoint's size, with 2 nodes (one
CPU rank each, the world size unchanged). Before, every node downloaded the whole checkpoint (ratio
1.0); now a node fetches its own ranks' ZeRO shards plus the shared files.

    .venv/bin/python benchmarks/resume_traffic.py [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from _common import add_model_arguments, benchmark_workspace, print_table
from finetune_trainer.process_group import free_port

from tests.support.trainer_run import start, trainer_config

DOWNLOADED = re.compile(r"downloaded checkpoint step (\d+): node 0 (\d+), node 1 (\d+) of (\d+) bytes")


def _resume_bytes(root: Path, args: argparse.Namespace, zero_stage: int) -> tuple[int, int, int]:
    ws = benchmark_workspace(root, args)
    output = ""
    for steps in (4, 6):  # train to a checkpoint, then resume from it on both nodes
        config = trainer_config(ws, f"file://{root}/store", {
            "spec.resources.nodes": 2, "spec.resources.processesPerNode": 1, "spec.training.maxSteps": steps,
            "spec.checkpoint.everySteps": 4, "spec.deepspeed.zeroStage": zero_stage,
        })  # fmt: skip
        port = free_port()
        nodes = [start(config, root / f"node{n}", nproc=1, nnodes=2, node_rank=n, master_port=port,
                       name=f"steps{steps}") for n in range(2)]  # fmt: skip
        finished = [node.finish() for node in nodes]
        if any(f.code for f in finished):
            raise SystemExit(f"trainer failed: {finished[0].output[-2000:]}")
        output = finished[0].output
    match = DOWNLOADED.search(output)
    assert match, "no download line"
    _, node0, node1, total = map(int, match.groups())
    return node0, node1, total


def main() -> None:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args()
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (2, 3):
            node0, node1, total = _resume_bytes(Path(tmp) / f"zero{stage}", args, stage)
            ratios += [node0 / total, node1 / total]
            rows.append([f"ZeRO-{stage}", *(f"{b / 2**20:.1f}" for b in (total, node0, node1))])
    print_table(
        f"Resume on 2 nodes x 1 CPU rank: {args.layers}-layer, {args.hidden}-wide Llama",
        ["checkpoint", "size (MiB)", "node 0 downloads (MiB)", "node 1 downloads (MiB)"],
        rows,
    )
    mean = sum(ratios) / len(ratios)
    print(f"ratio (bytes a node downloads / checkpoint size): max {max(ratios):.3f}, mean {mean:.3f}")
    print("(before this change every node downloaded the whole checkpoint: 1.0)")


if __name__ == "__main__":
    main()
