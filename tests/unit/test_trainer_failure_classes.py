"""Failures that would repeat on every restart leave the trainer with their own exit code and a
reason that names the fix: out of memory (GPU and host), a DeepSpeed config DeepSpeed refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_operator import contract
from finetune_trainer import __main__ as entry
from finetune_trainer import ds_config, training
from finetune_trainer.failures import InvalidInput

from tests.support.trainer_run import Workspace, trainer_config


def _config_file(tmp_path: Path, changes: dict[str, Any] | None = None) -> Path:
    ws = Workspace(root=tmp_path, model_uri=f"file://{tmp_path}/model", data_uri=f"file://{tmp_path}/d.jsonl")
    config = trainer_config(
        ws, f"file://{tmp_path}/store", {"spec.training.microBatchSize": 4, **(changes or {})}
    )
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    return path


def _failing_run(error: BaseException, at_step: int) -> type:
    class FailingRun:
        def __init__(self, config: Any) -> None:
            self.step = 0

        def execute(self) -> None:
            self.step = at_step
            raise error

    return FailingRun


def _main_with(error: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    termination = tmp_path / "termination.log"
    monkeypatch.setenv(contract.ENV_TERMINATION_LOG, str(termination))
    monkeypatch.setattr(training, "Run", _failing_run(error, at_step=12))
    code = entry.main(["--config", str(_config_file(tmp_path))])
    return code, termination.read_text().strip()


def _cuda_out_of_memory() -> BaseException:
    import torch

    return torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB\nmore"
    )


@pytest.mark.parametrize("error", [_cuda_out_of_memory(), MemoryError()], ids=["cuda", "host"])
def test_out_of_memory_exits_4_with_the_step_and_the_micro_batch(
    error: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, reason = _main_with(error, tmp_path, monkeypatch)
    assert code == contract.ExitCode.OUT_OF_MEMORY
    assert reason.startswith("out of memory at step 12 (micro batch 4 x 32 tokens per rank)"), reason
    assert "training.microBatchSize" in reason and "\n" not in reason


def test_an_allocator_message_in_a_runtime_error_is_out_of_memory_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _ = _main_with(RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory: out of memory"),
                         tmp_path, monkeypatch)  # fmt: skip
    assert code == contract.ExitCode.OUT_OF_MEMORY


def test_another_error_is_still_an_application_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, reason = _main_with(ValueError("boom"), tmp_path, monkeypatch)
    assert (code, reason) == (1, "ValueError at step 12: boom")


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"zero_optimization": {"overlap_comms": True}}, "overlap_comms"),  # a typo of overlap_comm
        ({"gradient_accumulation_steps": 3}, "train_batch_size"),  # batch sizes that do not multiply
    ],
)
def test_a_deepspeed_override_deepspeed_refuses_is_invalid_config_naming_it(
    override: dict[str, Any], named: str, tmp_path: Path
) -> None:
    """Parsed with world size 1 here (no process group), as DeepSpeed does."""
    from finetune_operator.api import parse_manifest
    from finetune_operator.api.trainer_config import resolve_trainer_config

    from tests.support.trainer_run import tiny_job_manifest

    ws = Workspace(root=tmp_path, model_uri="file:///m", data_uri="file:///d.jsonl")
    job = tiny_job_manifest(ws, f"file://{tmp_path}", {
        "spec.resources.processesPerNode": 1, "spec.deepspeed.override": override,
    })  # fmt: skip
    config = resolve_trainer_config(parse_manifest(job))
    with pytest.raises(InvalidInput) as raised:
        ds_config.check(config, ds_config.deepspeed_config(config, cpu=True))
    assert raised.value.exit_code == contract.ExitCode.INVALID_CONFIG
    assert "deepspeed.override" in str(raised.value) and named in str(raised.value)


def test_the_generated_deepspeed_config_passes_deepspeeds_own_parser(tmp_path: Path) -> None:
    from finetune_operator.api import parse_manifest
    from finetune_operator.api.trainer_config import resolve_trainer_config

    from tests.support.trainer_run import tiny_job_manifest

    ws = Workspace(root=tmp_path, model_uri="file:///m", data_uri="file:///d.jsonl")
    for stage in (0, 1, 2, 3):
        job = tiny_job_manifest(ws, f"file://{tmp_path}", {
            "spec.resources.processesPerNode": 1, "spec.deepspeed.zeroStage": stage,
            "spec.deepspeed.offloadOptimizer": stage > 0, "spec.deepspeed.offloadParameters": stage == 3,
        })  # fmt: skip
        config = resolve_trainer_config(parse_manifest(job))
        ds_config.check(config, ds_config.deepspeed_config(config, cpu=True))
