"""The real trainer (one CPU rank) ends deterministic failures with the exit code that fails the job
at once, and a one-line reason naming the fix, instead of exit 1 or 75 (a counted restart that
would re-download the model to fail the same way). The policy tables (test_failure_policy,
test_decide) hold what each code does to the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_operator import contract

from tests.support.s3 import SECRET_KEY, S3Endpoint
from tests.support.trainer_run import Finished, Workspace, run, trainer_config

pytestmark = pytest.mark.slow


def _run(workspace: Workspace, tmp_path: Path, changes: dict[str, Any], env: dict[str, str] | None = None,
         store: str | None = None) -> Finished:  # fmt: skip
    config = trainer_config(
        workspace, store or f"file://{tmp_path}/store", {"spec.resources.processesPerNode": 1, **changes}
    )
    return run(config, tmp_path / "run", nproc=1, env=env)


def test_lora_target_modules_the_model_lacks_exit_2_naming_the_modules_it_has(
    workspace: Workspace, tmp_path: Path
) -> None:
    changes = {"spec.training.method": "lora", "spec.training.lora": {"targetModules": ["c_attn"]}}
    finished = _run(workspace, tmp_path, changes)
    assert finished.code == contract.ExitCode.INVALID_CONFIG, finished.output[-3000:]
    assert "training.lora.targetModules" in finished.termination and "q_proj" in finished.termination


def test_a_deepspeed_override_deepspeed_refuses_exits_2_naming_the_key(
    workspace: Workspace, tmp_path: Path
) -> None:
    changes = {"spec.deepspeed.override": {"zero_optimization": {"overlap_comms": True}}}
    finished = _run(workspace, tmp_path, changes)
    assert finished.code == contract.ExitCode.INVALID_CONFIG, finished.output[-3000:]
    assert "deepspeed.override" in finished.termination and "overlap_comms" in finished.termination


def test_a_checkpoint_bucket_that_does_not_exist_exits_77_and_says_so(
    workspace: Workspace, tmp_path: Path, s3_module_env: S3Endpoint
) -> None:
    finished = _run(workspace, tmp_path, {}, env=s3_module_env.env(), store="s3://ftjob-no-such-bucket/runs")
    assert finished.code == contract.ExitCode.STORAGE_REFUSED, finished.output[-3000:]
    assert "NoSuchBucket" in finished.termination and SECRET_KEY not in finished.output
