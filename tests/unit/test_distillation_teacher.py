"""A distillation teacher the trainer cannot use is refused before training, with the field named:
one that is not there is InputNotFound (exit 3), one of another vocabulary InvalidConfig (exit 2)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from finetune_operator import contract
from finetune_trainer.distill_objective import FIELD, TeacherVocabularyDiffers, load_teacher
from finetune_trainer.model import ModelNotFound
from finetune_trainer.storage import open_store

from tests.support.trainer_run import Workspace, trainer_config


def _context(tmp_path: Path, teacher: str) -> Any:
    ws = Workspace(root=tmp_path, model_uri="file:///models/student", data_uri="file:///data/x.jsonl")
    config = trainer_config(ws, f"file://{tmp_path / 'store'}", {
        "spec.training.objective": "distill",
        "spec.training.distillation": {"teacher": teacher},
    })  # fmt: skip
    return SimpleNamespace(config=config, scratch=tmp_path / "scratch", phases=None, open=open_store)


def _llama(dest: Path, vocab: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(dest)
    return dest


def test_a_teacher_that_is_not_there_is_input_not_found_naming_the_field(tmp_path: Path) -> None:
    ctx = _context(tmp_path, f"file://{tmp_path / 'no-such-teacher'}")
    with pytest.raises(ModelNotFound) as caught:
        load_teacher(ctx, {}, student_vocab=64)
    assert caught.value.exit_code == contract.ExitCode.INPUT_NOT_FOUND
    assert caught.value.reason().startswith(f"{FIELD}: ") and "no-such-teacher" in caught.value.reason()


def test_a_folder_without_a_model_is_input_not_found_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    ctx = _context(tmp_path, f"file://{tmp_path / 'empty'}")
    with pytest.raises(ModelNotFound) as caught:
        load_teacher(ctx, {}, student_vocab=64)
    assert FIELD in caught.value.reason()


def test_a_teacher_of_another_vocabulary_is_invalid_config_naming_both_sizes(tmp_path: Path) -> None:
    teacher = _llama(tmp_path / "teacher", vocab=96)
    ctx = _context(tmp_path, f"file://{teacher}")
    with pytest.raises(TeacherVocabularyDiffers) as caught:
        load_teacher(ctx, {}, student_vocab=64)
    assert caught.value.exit_code == contract.ExitCode.INVALID_CONFIG
    message = caught.value.reason()
    assert message.startswith(f"{FIELD}: ") and "96" in message and "64" in message
