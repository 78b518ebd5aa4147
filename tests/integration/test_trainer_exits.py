"""Every way the trainer gives up ends in the exit code the operator classifies by, with a one-line
reason in the termination log, and without the storage secret anywhere in what it printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_operator import contract
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_trainer.process_group import free_port

from tests.support.s3 import SECRET_KEY, S3Endpoint
from tests.support.trainer_run import Finished, Workspace, run, trainer_config

pytestmark = pytest.mark.slow


def _run(config: TrainerConfig | str, workdir: Path, env: dict[str, str] | None = None) -> Finished:
    return run(config, workdir, nproc=1, env=env)


def _config(workspace: Workspace, tmp_path: Path, changes: dict[str, Any]) -> TrainerConfig:
    return trainer_config(
        workspace, f"file://{tmp_path}/store", {"spec.resources.processesPerNode": 1, **changes}
    )


def test_an_invalid_config_exits_2_naming_the_field(
    workspace: Workspace, tmp_path: Path, workdir: Path
) -> None:
    text = _config(workspace, tmp_path, {}).model_dump(mode="json", by_alias=True, exclude_none=True)
    text["world"]["nnodes"] = 0
    finished = _run(json.dumps(text), workdir)
    assert finished.code == contract.ExitCode.INVALID_CONFIG
    assert "world.nnodes" in finished.termination and "\n" not in finished.termination


def test_a_missing_dataset_exits_3_naming_it(workspace: Workspace, tmp_path: Path, workdir: Path) -> None:
    missing = f"file://{tmp_path}/nowhere/train.jsonl"
    finished = _run(_config(workspace, tmp_path, {"spec.dataset.sources": [{"uri": missing}]}), workdir)
    assert finished.code == contract.ExitCode.INPUT_NOT_FOUND
    assert "nowhere/train.jsonl" in finished.termination and "\n" not in finished.termination


def test_a_missing_model_exits_3_naming_it(workspace: Workspace, tmp_path: Path, workdir: Path) -> None:
    finished = _run(
        _config(workspace, tmp_path, {"spec.model.source": f"file://{tmp_path}/no-model"}), workdir
    )
    assert finished.code == contract.ExitCode.INPUT_NOT_FOUND
    assert "no-model" in finished.termination


def test_too_little_data_for_one_batch_exits_2_with_the_fix(
    workspace: Workspace, tmp_path: Path, workdir: Path
) -> None:
    config = _config(
        workspace, tmp_path, {"spec.training.globalBatchSize": 4096, "spec.training.microBatchSize": 4096}
    )
    finished = _run(config, workdir)
    assert finished.code == contract.ExitCode.INVALID_CONFIG
    assert "globalBatchSize" in finished.termination


def test_unreachable_storage_exits_75_without_leaking_the_secret(
    workspace: Workspace, s3: S3Endpoint, tmp_path: Path, workdir: Path
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = _config(
        workspace,
        tmp_path,
        {"spec.checkpoint.uri": "s3://unreachable/runs", "spec.checkpoint.endpointUrl": endpoint},
    )
    finished = _run(config, workdir, env={**s3.env(), "AWS_MAX_ATTEMPTS": "2"})
    assert finished.code == contract.ExitCode.TRANSIENT
    assert finished.termination.startswith("storage unavailable:")
    assert SECRET_KEY not in finished.output and SECRET_KEY not in finished.termination
