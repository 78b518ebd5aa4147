"""The GPU check (tools/gpu_check.py) runs end to end on CPU with --cpu: the same entrypoint,
manifest, packing and report lines it prints on a GPU, on a tiny model in fp32, its sequence-parallel
run on 2 CPU ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_trains_four_times_and_reports_throughput_mfu_and_memory(tmp_path: Path) -> None:
    command = [sys.executable, "tools/gpu_check.py", "--cpu", "--steps", "4", "--workdir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    runs = [line for line in done.stdout.splitlines() if " run: " in line]
    assert len(runs) == 4, done.stdout
    for line in runs:
        assert "tokens/s/GPU" in line and "MFU" in line and "peak memory" in line and "loss n/a" not in line
    assert "sdpa, ZeRO-2, packing" in done.stdout
    assert "QLoRA nf4 (fp32, rank 16) run: 4 steps" in done.stdout
    assert "sequence parallel 2 (fp32, 512 tokens, sdpa, unpacked) run: 4 steps" in done.stdout
