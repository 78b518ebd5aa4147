"""Data at scale: peak memory per rank and tokenization time as the dataset grows 1x, 4x and 16x.
Aim: peak RSS per rank at 16x over 1x <= 1.2 (the examples are memory-mapped and shared through
the page cache, so a rank's memory does not grow with the dataset). Also: tokenization wall time with
2 ranks against 1 rank at 16x.

Each run trains a few steps of the tiny model on 2 CPU ranks; the benchmark polls every worker's
/proc/<pid>/status for VmHWM (peak resident set, file-backed pages included) and RssAnon (its private
memory) and reads rank 0's "planned, tokenized on N ranks and committed in" line.

    .venv/bin/python benchmarks/data_memory.py [--records 4000] [--steps 10]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from _common import print_table

from tests.support.trainer_run import TrainerProcess, Workspace, start, trainer_config

TOKENIZED = re.compile(r"planned, tokenized on \d+ ranks and committed in ([\d.]+)s")


def _memory(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmHWM"].split()[0]) // 1024, int(fields["RssAnon"].split()[0]) // 1024


def _watch(process: TrainerProcess) -> dict[int, tuple[int, int]]:
    """Each worker's (peak RSS, private RSS) in MiB, as last seen before it exited."""
    seen: dict[int, tuple[int, int]] = {}
    while process.proc.poll() is None:
        for pid in process.worker_pids():
            try:
                hwm, anon = _memory(pid)
            except (OSError, KeyError, ValueError):
                continue
            old = seen.get(pid, (0, 0))
            seen[pid] = (max(old[0], hwm), max(old[1], anon))
        time.sleep(0.2)
    return seen


def _run(root: Path, records: int, steps: int, nproc: int) -> tuple[list[tuple[int, int]], float]:
    ws = Workspace.create(root / "inputs", records=records)
    config = trainer_config(ws, f"file://{root}/store", {
        "spec.training.maxSteps": steps, "spec.dataset.dedupe": False,
        "spec.resources.processesPerNode": nproc, "spec.training.globalBatchSize": 8 * nproc,
        "spec.checkpoint.everySteps": 10 * steps,
    })  # fmt: skip
    process = start(config, root / "work", nproc=nproc)
    memory = _watch(process)
    finished = process.finish()
    if finished.code != 0:
        raise SystemExit(f"trainer failed ({finished.code}): {finished.output[-2000:]}")
    match = TOKENIZED.search(finished.output)
    assert match, "no tokenization line"
    return sorted(memory.values()), float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rows, peaks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 4, 16):
            memory, seconds = _run(Path(tmp) / f"x{factor}", args.records * factor, args.steps, 2)
            peaks[factor] = max(hwm for hwm, _ in memory)
            rows.append([f"{factor}x ({args.records * factor} records)", *(f"{h} / {a}" for h, a in memory),
                         f"{seconds:.2f}"])  # fmt: skip
        _, one_rank = _run(Path(tmp) / "x16-1rank", args.records * 16, args.steps, 1)
    print_table(
        "Data memory: the tiny model on 2 CPU ranks, examples memory-mapped",
        ["dataset", "rank A peak / private RSS (MiB)", "rank B peak / private RSS (MiB)", "tokenization (s)"],
        rows,
    )
    print(f"ratio (peak RSS per rank, 16x / 1x): {peaks[16] / peaks[1]:.3f}  (aim <= 1.2)")
    two_ranks = float(rows[-1][-1])
    print(f"ratio (tokenization at 16x, 2 ranks / 1 rank): {two_ranks / one_rank:.3f}")


if __name__ == "__main__":
    main()
