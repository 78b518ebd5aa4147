"""The test-only fault hooks fail exactly where and when asked, and never otherwise."""

from __future__ import annotations

import pytest
import torch
from finetune_operator import contract
from finetune_trainer import faults
from finetune_trainer.failures import Transient


@pytest.fixture(autouse=True)
def first_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (faults.ENV_FAIL_AT_STEP, faults.ENV_OOM_ABOVE_MICRO_BATCH, faults.ENV_RESTART_COUNT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(contract.ENV_ATTEMPT, "1")


def test_unset_hooks_do_nothing() -> None:
    faults.before_step(3, 0, 64)


def test_a_transient_fault_fails_the_named_rank_at_the_named_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV_FAIL_AT_STEP, "3:75:1")
    faults.before_step(3, 0, 4)
    faults.before_step(2, 1, 4)
    with pytest.raises(Transient):
        faults.before_step(3, 1, 4)


def test_any_other_code_is_carried_by_the_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV_FAIL_AT_STEP, "2:1")
    with pytest.raises(faults.InjectedFailure) as failed:
        faults.before_step(2, 0, 4)
    assert failed.value.exit_code == 1


@pytest.mark.parametrize(("restarts", "attempt"), [("1", "1"), ("0", "2")])
def test_a_restarted_process_runs_past_the_fault(
    monkeypatch: pytest.MonkeyPatch, restarts: str, attempt: str
) -> None:
    monkeypatch.setenv(faults.ENV_FAIL_AT_STEP, "2:75")
    monkeypatch.setenv(faults.ENV_RESTART_COUNT, restarts)
    monkeypatch.setenv(contract.ENV_ATTEMPT, attempt)
    faults.before_step(2, 0, 4)


def test_a_micro_batch_above_the_limit_runs_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV_OOM_ABOVE_MICRO_BATCH, "4")
    faults.before_step(0, 0, 4)
    with pytest.raises(torch.OutOfMemoryError):
        faults.before_step(0, 0, 8)
