"""training.attentionImplementation and training.ligerKernels: a kernel the image or machine lacks is
refused before any weight loads, naming the field and the fix (exit 2, InvalidConfig)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer.failures import InvalidInput
from finetune_trainer.model import check_kernels, load_base
from finetune_trainer.tiny import write_tiny_model

from tests.support.factories import job


def _config(training: dict[str, Any]) -> Any:
    changes = {"spec.dataset.sources": [{"uri": "file:///d.jsonl"}], "spec.training.precision": "fp32"}
    return resolve_trainer_config(job({**changes, **{f"spec.training.{k}": v for k, v in training.items()}}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="flash-attn may be present on a GPU machine")
def test_flash_attention_without_the_package_names_the_field() -> None:
    with pytest.raises(InvalidInput, match=r"training\.attentionImplementation: flash_attention_2 needs"):
        check_kernels(_config({"attentionImplementation": "flash_attention_2", "precision": "bf16"}))


def test_liger_without_the_package_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a)
    )
    with pytest.raises(InvalidInput, match=r"training\.ligerKernels: the liger-kernel package"):
        check_kernels(_config({"ligerKernels": True}))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_model_loads_with_the_chosen_attention(tmp_path: Path, implementation: str) -> None:
    source = write_tiny_model(tmp_path / "model")
    model = load_base(_config({"attentionImplementation": implementation}), str(source))
    assert model.config._attn_implementation == implementation
