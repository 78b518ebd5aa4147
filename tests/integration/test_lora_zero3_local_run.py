"""LoRA on ZeRO-3 through `ftjob run`, as a user meets it: two node ranks as local process groups on
CPU, to Succeeded without a restart, with a merged and an adapter export that load.

The collective timeout is a few seconds: an export that made rank 0 wait in a collective alone (the
old hang: `from_pretrained` under a live HfDeepSpeedConfig enters `deepspeed.zero.Init`) ends the
rank as transient within it, and with no restart allowed the job fails at once instead of hanging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.trainer_run import Workspace, tiny_job_manifest

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 300.0
COLLECTIVE_SECONDS = 15


def _ftjob_run(tmp_path: Path, export: str) -> tuple[int, str, Path]:
    """`ftjob run` of a LoRA ZeRO-3 job exporting `export`; its exit code, output and the store."""
    ws = Workspace.create(tmp_path / "ws", records=64)
    store = tmp_path / "store"
    job = tiny_job_manifest(ws, f"file://{store}", {
        "spec.resources.nodes": 2,
        "spec.resources.processesPerNode": 1,
        "spec.deepspeed.zeroStage": 3,
        "spec.training.method": "lora",
        "spec.training.lora": {"rank": 8, "export": export},
        "spec.training.maxSteps": 4,
        "spec.checkpoint.everySteps": 2,
        "spec.runPolicy.collectiveTimeoutSeconds": COLLECTIVE_SECONDS,
        "spec.runPolicy.maxRestarts": 0,
    })  # fmt: skip
    job["metadata"]["namespace"] = "default"
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "finetune_operator.cli", "run", str(manifest), "--workdir",
               str(tmp_path / "run")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    status = json.loads((tmp_path / "run" / "job.json").read_text())["status"]
    assert (status["phase"], status.get("restarts", 0)) == ("Succeeded", 0), (status, done.stdout[-4000:])
    return done.returncode, done.stdout, store / "default" / "tiny" / "final"


def _base(tmp_path: Path) -> Path:
    return tmp_path / "ws" / "model"  # where Workspace.create writes the tiny model


def test_lora_on_zero3_exports_a_merged_model_that_loads(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    code, output, final = _ftjob_run(tmp_path, "merged")
    assert code == 0, output[-4000:]
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = dict(AutoModelForCausalLM.from_pretrained(_base(tmp_path)).named_parameters())
    assert not any("lora" in name for name, _ in merged.named_parameters())
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base[n])]
    # Only the adapted projections moved; the merge did not touch anything else.
    assert changed and all(n.endswith("_proj.weight") for n in changed), changed


def test_lora_on_zero3_exports_an_adapter_that_loads_on_the_base(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, output, final = _ftjob_run(tmp_path, "adapter")
    assert code == 0, output[-4000:]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(_base(tmp_path)), final)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # peft initialises B to zero
