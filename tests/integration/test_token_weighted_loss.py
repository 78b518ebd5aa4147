"""Every target token of a global batch weighs the same, however the batch is cut into micro
batches, accumulation steps and ranks (token_loss.py; the fix transformers 4.46 made with
`num_items_in_batch`, transformers/trainer.py `_get_num_items_in_batch`); every pair of a DPO batch
alike, and every target token of a distillation batch in both of its terms."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_trainer.process_group import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(world: int, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
        f"--master-port={free_port()}", "-m", "tests.support.grad_equality", str(out),
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, _why(done.stderr)
    results: dict[str, dict[str, torch.Tensor]] = torch.load(out)
    return results


def _why(stderr: str) -> str:
    """A failed run's first error lines from every rank, then the launcher's summary: the summary
    alone names only the signal."""
    pattern = re.compile(r"Error|error:|terminate|Traceback|abort")
    clues = [line for line in stderr.splitlines() if pattern.search(line)]
    return "\n".join(clues[:40]) + "\n...\n" + stderr[-2000:]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6) for n in a)


@pytest.fixture(scope="module", params=[1, 2], ids=["1-rank", "2-ranks"])
def steps(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, torch.Tensor]]:
    return _run(request.param, tmp_path_factory.mktemp("grads") / "deltas.pt")


@pytest.mark.parametrize("setup", ["z0-full", "z2-full", "z3-full", "z2-lora", "z2-dpo", "z2-distill"])
def test_micro_1_x_accumulation_4_gives_the_gradient_of_micro_4_x_accumulation_1(
    steps: dict[str, dict[str, torch.Tensor]], setup: str
) -> None:
    one_by_four, four_by_one = steps[f"{setup}-1x4"], steps[f"{setup}-4x1"]
    assert any(float(d.abs().max()) > 1e-4 for d in one_by_four.values())  # the step did move the weights
    assert _close(one_by_four, four_by_one)


def test_a_mean_per_micro_batch_would_weigh_short_targets_more(
    steps: dict[str, dict[str, torch.Tensor]],
) -> None:
    """The control: the cut changes the gradient under the naive loss, so the test above has teeth."""
    assert not _close(steps["naive-1x4"], steps["naive-4x1"])
