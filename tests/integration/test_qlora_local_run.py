"""QLoRA through `ftjob run` as a user meets it: LoRA on a base held in 4 bits (nf4), two node ranks as
local process groups on CPU, fp32, ZeRO-2, to Succeeded with exports that load without bitsandbytes.

Two runs of the same tiny job:
  adapter: exports the adapter; one node rank's process group is SIGKILLed (a lost node) after the
           first commit while its trainer is held by the test-only fault hook, so the kill always
           lands mid-run; the gang restarts and resumes from the checkpoint, which holds the
           adapters and not the 4-bit base every start rebuilds;
  merged:  uninterrupted, exports the adapter merged into the unquantised base: a plain model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.progress import parse_all
from finetune_trainer.faults import ENV_FAIL_AT_STEP

from tests.support.processes import ftjob_run
from tests.support.trainer_run import Workspace, tiny_job_manifest

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 300.0
HELD_AFTER = 6  # rank 1 stops after this step until it is killed; the step-4 checkpoint commits meanwhile
QLORA = {
    "spec.resources.nodes": 2,
    "spec.resources.processesPerNode": 1,
    "spec.deepspeed.zeroStage": 2,
    "spec.training.precision": "fp32",
    "spec.training.method": "lora",
    "spec.training.maxSteps": 12,
    "spec.checkpoint.everySteps": 4,
    "spec.runPolicy.backoffBaseSeconds": 1,
    "spec.runPolicy.backoffCapSeconds": 1,
    # The killed node's peer waits in a step's collective until its pod's grace period ends (shared
    # memory between local ranks notices no dead peer): seconds, not the default two minutes.
    "spec.runPolicy.terminationGracePeriodSeconds": 10,
}


@dataclass
class Run:
    status: dict[str, Any]
    rank0_logs: list[str]  # one per attempt
    job_dir: Path  # <store>/<namespace>/<job>
    base: Path

    @property
    def final(self) -> Path:
        return self.job_dir / "final"

    def losses(self) -> list[float]:
        return [r.progress.loss for log in self.rank0_logs for r in parse_all(log) if r.progress.loss]


def _until(check: Any, what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not check():
        assert proc.poll() is None, f"ftjob run exited {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"not within {RUN_TIMEOUT:.0f}s: {what}"
        time.sleep(0.1)


def _log(workdir: Path, pod: str) -> str:
    path = workdir / "logs" / f"{pod}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _run(root: Path, lora: dict[str, Any], *, kill_a_node: bool = False) -> Run:
    ws = Workspace.create(root / "ws", records=192)
    env = [{"name": ENV_FAIL_AT_STEP, "value": f"{HELD_AFTER}:75:1:{RUN_TIMEOUT:.0f}"}] if kill_a_node else []
    job = tiny_job_manifest(ws, f"file://{root / 'store'}", {
        **QLORA,
        "spec.training.lora": {"rank": 8, "quantization": "nf4", **lora},
        "spec.resources.env": env,
    })  # fmt: skip
    job["metadata"]["namespace"] = "default"
    manifest, workdir, out = root / "job.yaml", root / "run", root / "ftjob-run.out"
    manifest.write_text(yaml.safe_dump(job))
    proc = ftjob_run(manifest, workdir, out)
    try:
        if kill_a_node:
            _until(
                lambda: "checkpoint step 4 committed" in _log(workdir, "tiny-a1-n0"), "the first commit", proc
            )
            node1 = json.loads((workdir / "pods" / "tiny-a1-n1.json").read_text())
            os.killpg(node1["local"]["pid"], signal.SIGKILL)
        assert proc.wait(RUN_TIMEOUT) == 0, out.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = sorted((workdir / "logs").glob("tiny-a*-n0.log"))
    return Run(
        status=json.loads((workdir / "job.json").read_text())["status"],
        rank0_logs=[p.read_text(errors="replace") for p in logs],
        job_dir=root / "store" / "default" / "tiny",
        base=root / "ws" / "model",
    )


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _run(tmp_path_factory.mktemp("qlora-adapter"), {"export": "adapter"}, kill_a_node=True)


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _run(tmp_path_factory.mktemp("qlora-merged"), {"export": "merged"})


def test_a_qlora_run_trains_its_base_in_4_bits_to_succeeded(merged: Run) -> None:
    assert (merged.status["phase"], merged.status.get("restarts", 0)) == ("Succeeded", 0), merged.status
    assert re.search(r"QLoRA: \d+ linear layers of the base in 4 bits", merged.rank0_logs[0])


def test_the_loss_falls(merged: Run) -> None:
    losses = merged.losses()
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.1, losses


def test_a_run_whose_node_is_killed_resumes_from_its_newest_commit_and_succeeds(adapter: Run) -> None:
    assert (adapter.status["phase"], adapter.status["restarts"]) == ("Succeeded", 1), adapter.status
    assert len(adapter.rank0_logs) == 2
    # Step 4's, or the emergency checkpoint of step 6 when the survivor's SIGTERM came in time.
    newest = re.findall(r"checkpoint step (\d+) committed", adapter.rank0_logs[0])[-1]
    assert f"resuming at step {newest} " in adapter.rank0_logs[1], adapter.rank0_logs[1][-3000:]


def test_its_checkpoints_hold_the_adapters_and_not_the_4bit_base(adapter: Run) -> None:
    import torch

    newest = sorted((adapter.job_dir / "checkpoints").glob("step-*/mp_rank_00_model_states.pt"))[-1]
    state = torch.load(newest, map_location="cpu", weights_only=False)
    assert state["module"] and all(".lora_A." in k or ".lora_B." in k for k in state["module"])
    assert not state.get("frozen_param_fragments")


def test_the_adapter_export_loads_with_peft_on_the_unquantised_base(adapter: Run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter.base), adapter.final)
    assert not [m for m in model.modules() if "4bit" in type(m).__name__]
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # peft initialises B to zero


def test_the_merged_export_is_a_plain_model_of_the_base_s_shapes(merged: Run) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged.final)
    base = dict(AutoModelForCausalLM.from_pretrained(merged.base).named_parameters())
    assert "quantization_config" not in json.loads((merged.final / "config.json").read_text())
    assert not [m for m in model.modules() if "4bit" in type(m).__name__]
    params = dict(model.named_parameters())
    assert {n: p.shape for n, p in params.items()} == {n: p.shape for n, p in base.items()}
    assert {p.dtype for p in params.values()} == {torch.float32}
    changed = [n for n, p in params.items() if not torch.equal(p, base[n])]
    # The adapted projections moved; everything else is the base's own weights, not dequantised ones.
    assert changed and all(n.endswith("_proj.weight") for n in changed), changed


def test_the_merged_update_is_low_rank_on_the_base_s_own_weights(merged: Run) -> None:
    """Merged into the unquantised base, a projection moves by the adapter's rank-8 update alone; merged
    into dequantised 4-bit weights it would also carry their full-rank quantisation error."""
    import torch
    from transformers import AutoModelForCausalLM

    name = "model.layers.0.self_attn.q_proj.weight"
    moved = dict(AutoModelForCausalLM.from_pretrained(merged.final).named_parameters())[name]
    base = dict(AutoModelForCausalLM.from_pretrained(merged.base).named_parameters())[name]
    assert 0 < torch.linalg.matrix_rank((moved - base).detach()) <= 8
