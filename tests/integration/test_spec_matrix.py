"""Every combination the API accepts trains on two CPU ranks, survives a SIGKILL while it
checkpoints, resumes from its last commit and exports a model that loads.

The full product (method x export x ZeRO 0-3 x offload x packing x gradient checkpointing) is 96
runs; each costs two launches, so the suite runs a pairwise covering subset instead: every pair of
values of any two factors appears in at least one case, over the pairs the API accepts
(offloadOptimizer needs ZeRO 1-3, offloadParameters ZeRO-3). Nine cases are the fewest that do it:
method x ZeRO alone needs eight, and ZeRO-3's three offload settings push one ZeRO level into a
ninth. The one pair left out, ZeRO-3 without offload, runs elsewhere already: full in
test_trainer_training's TestZero3, LoRA through `ftjob run` in test_lora_zero3_local_run.
fp16/bf16 need a GPU (CPU runs fp32); the GPU check covers them.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from finetune_operator import contract
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.snapshot import ENV_TEST_PAUSE
from finetune_trainer.storage import open_store

from tests.support.trainer_run import Finished, Workspace, start, trainer_config, worker_pid

pytestmark = pytest.mark.slow

STEPS, EVERY = 4, 2
# A short collective timeout: a collective only some ranks join fails the case in seconds.
COLLECTIVE_SECONDS = 20


@dataclass(frozen=True)
class Case:
    method: str  # full | merged | adapter (LoRA with that export)
    zero: int
    offload: str  # none | optimizer | parameters (optimizer and parameters, ZeRO-3 only)
    packing: bool
    checkpointing: bool

    @property
    def id(self) -> str:
        flags = ("packed" if self.packing else "padded", "gc" if self.checkpointing else "nogc")
        return f"{self.method}-zero{self.zero}-offload_{self.offload}-{'-'.join(flags)}"

    def changes(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec.deepspeed.zeroStage": self.zero,
            "spec.deepspeed.offloadOptimizer": self.offload != "none",
            "spec.deepspeed.offloadParameters": self.offload == "parameters",
            "spec.dataset.packing": self.packing,
            "spec.training.gradientCheckpointing": self.checkpointing,
        }
        if self.method != "full":
            out["spec.training.method"] = "lora"
            out["spec.training.lora"] = {"rank": 8, "export": self.method}
        return out


CASES = [
    Case("full", 0, "none", packing=True, checkpointing=True),
    Case("merged", 0, "none", packing=False, checkpointing=False),
    Case("full", 1, "optimizer", packing=False, checkpointing=False),
    Case("adapter", 1, "none", packing=True, checkpointing=True),
    Case("full", 2, "none", packing=True, checkpointing=False),
    Case("merged", 2, "optimizer", packing=False, checkpointing=True),
    Case("full", 3, "parameters", packing=False, checkpointing=True),
    Case("adapter", 3, "parameters", packing=True, checkpointing=False),
    Case("merged", 3, "optimizer", packing=True, checkpointing=True),
]


@dataclass
class Outcome:
    case: Case
    killed: Finished
    killed_in: int  # the step whose checkpoint the kill interrupted
    committed_at_kill: list[int]
    resumed: Finished
    final: Path  # the export, as a local directory
    base: Path


@pytest.fixture(scope="module")
def matrix_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace.create(tmp_path_factory.mktemp("matrix"), records=64)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def outcome(request: pytest.FixtureRequest, matrix_workspace: Workspace,
            tmp_path_factory: pytest.TempPathFactory) -> Outcome:  # fmt: skip
    """Launch 1 holds every checkpoint 1 s in its snapshot and loses rank 1 to SIGKILL inside the
    first one after a commit; launch 2 resumes and finishes."""
    case: Case = request.param
    root = tmp_path_factory.mktemp(case.id)
    changes = {
        "spec.training.maxSteps": STEPS,
        "spec.checkpoint.everySteps": EVERY,
        "spec.runPolicy.collectiveTimeoutSeconds": COLLECTIVE_SECONDS,
        **case.changes(),
    }
    config = trainer_config(matrix_workspace, f"file://{root}/store", changes)
    store = CheckpointStore(open_store(config.checkpoint.job_uri), poll_seconds=0.02)
    pause = re.compile(r"checkpoint step (\d+): paused [\d.]+s in snapshot")
    run = start(config, root / "killed", env={ENV_TEST_PAUSE: "snapshot:1"})
    held: list[int] = []

    def in_a_checkpoint_after_a_commit(out: str) -> bool:
        newest = max(store.committed_steps(), default=0)
        held[:] = [s for s in map(int, pause.findall(out)) if s > newest > 0]
        return bool(held)

    run.wait_for(in_a_checkpoint_after_a_commit, 240)
    os.kill(worker_pid(run, 1), signal.SIGKILL)
    killed = run.finish()
    committed_at_kill = store.committed_steps()
    resumed = start(config, root / "resumed", env={contract.ENV_ATTEMPT: "2"}).finish()
    final = Path(config.output_uri.removeprefix("file://"))
    base = Path(matrix_workspace.model_uri.removeprefix("file://"))
    return Outcome(case, killed, held[0], committed_at_kill, resumed, final, base)


def test_the_kill_leaves_the_interrupted_checkpoint_uncommitted(outcome: Outcome) -> None:
    assert outcome.killed.code != 0, outcome.killed.output[-3000:]
    assert outcome.killed_in not in outcome.committed_at_kill and outcome.committed_at_kill


def test_the_relaunch_resumes_from_the_last_commit_and_succeeds(outcome: Outcome) -> None:
    assert outcome.resumed.code == 0, outcome.resumed.output[-4000:]
    assert f"resuming at step {max(outcome.committed_at_kill)} of {STEPS}" in outcome.resumed.output


def test_the_export_loads_and_carries_the_training(outcome: Outcome) -> None:
    """The exported weights differ from the base where training changed them: a model exported
    from ungathered ZeRO-3 shards, or without its adapters, would not."""
    import torch
    from transformers import AutoModelForCausalLM

    assert outcome.resumed.code == 0, outcome.resumed.output[-4000:]
    base = AutoModelForCausalLM.from_pretrained(outcome.base)
    if outcome.case.method == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, outcome.final)
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # peft initialises B to zero
    else:
        model = AutoModelForCausalLM.from_pretrained(outcome.final)
        assert not any("lora" in name for name, _ in model.named_parameters())
        reference = dict(base.named_parameters())
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, reference[n])]
        assert any("q_proj" in n for n in changed), changed
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
