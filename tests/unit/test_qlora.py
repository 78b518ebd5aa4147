"""QLoRA in the trainer (training.lora.quantization): the base loads in 4 bits as the spec says, only
the adapters train, an evaluation leaves the 4-bit layers trainable, and a checkpoint's state holds
what trains and nothing of the base, which every start rebuilds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer.model import (
    TargetModulesMissing,
    load_model,
    load_trained,
    quantization_config,
    rebuilt_at_load,
)
from finetune_trainer.tiny import write_tiny_model

from tests.support.factories import job

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(lora: dict[str, Any] | None = None, **training: Any) -> Any:
    changes = {
        "spec.dataset.sources": [{"uri": "file:///d.jsonl"}],
        "spec.deepspeed.zeroStage": 2,
        "spec.training.method": "lora",
        "spec.training.lora": {"rank": 4, "dropout": 0.0, "quantization": "nf4", **(lora or {})},
        "spec.training.precision": "fp32",
        "spec.training.gradientCheckpointing": False,
    }
    return resolve_trainer_config(job({**changes, **{f"spec.training.{k}": v for k, v in training.items()}}))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("qlora") / "model"))


def _load(base: str, config: Any | None = None) -> Any:
    model, _ = load_model(config or _config(), base, {})
    return model


@pytest.fixture(scope="module")
def loaded(base: str) -> Any:
    """A 4-bit model that no test changes."""
    return _load(base)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(8, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _step(model: Any) -> None:
    model.train()
    model.zero_grad()
    model(**_batch()).loss.backward()


def _evaluate(model: Any) -> None:
    model.eval()
    with torch.no_grad():
        model(**_batch())
    model.train()


def _4bit_layers(model: Any) -> dict[str, Any]:
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_4bit_config_is_the_spec_s_format_computed_in_the_training_precision(
    kind: str, precision: str, dtype: torch.dtype
) -> None:
    quantized = quantization_config(_config({"quantization": kind}, precision=precision))
    assert quantized.load_in_4bit and quantized.bnb_4bit_quant_type == kind
    assert quantized.bnb_4bit_use_double_quant
    assert quantized.bnb_4bit_compute_dtype == dtype


def test_lora_without_quantization_loads_an_unquantised_base() -> None:
    assert quantization_config(_config({"quantization": "none"})) is None


def test_every_adapted_projection_of_the_base_is_4bit(loaded: Any) -> None:
    layers = _4bit_layers(loaded)
    adapted = {name.rsplit(".", 2)[-2] for name in layers}
    assert adapted == set(ADAPTED)
    assert len(layers) == len(ADAPTED) * loaded.config.num_hidden_layers
    assert all(m.weight.quant_type == "nf4" and m.weight.dtype == torch.uint8 for m in layers.values())


def test_only_the_adapters_train(loaded: Any) -> None:
    trainable = [name for name, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable


def test_a_step_moves_the_adapters_and_leaves_the_4bit_base_as_it_was(base: str) -> None:
    model = _load(base)
    before = {name: m.weight.detach().clone() for name, m in _4bit_layers(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapters = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=0.01)
    for _ in range(2):  # lora_B starts at zero: the second step is the first whose lora_A moves
        _step(model)
        optimizer.step()
    assert all(not torch.equal(p, a) for p, a in zip(trainable, adapters, strict=True))
    after = _4bit_layers(model)
    assert all(torch.equal(after[name].weight, w) for name, w in before.items())


def test_after_an_evaluation_the_gradient_still_reaches_the_first_layer_s_adapters(base: str) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes would switch the layers to an inference kernel without
    backward at the first evaluation; elsewhere this holds trivially."""
    model = _load(base)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, where no gradient reaches A
            torch.nn.init.normal_(p, std=0.1)
    first = model.base_model.model.model.layers[0].self_attn.q_proj
    _step(model)
    before = first.lora_A.default.weight.grad.clone()
    shape = first.base_layer.weight.shape
    _evaluate(model)
    _step(model)
    assert first.base_layer.weight.shape == shape
    torch.testing.assert_close(first.lora_A.default.weight.grad, before)


def test_target_modules_that_match_nothing_are_refused_naming_the_4bit_layers(base: str) -> None:
    with pytest.raises(TargetModulesMissing, match=r"its linear layers are \[.*'q_proj'"):
        _load(base, _config({"targetModules": ["attention"]}))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_is_the_job_s_setting(base: str, checkpointing: bool) -> None:
    """peft's preparation of a k-bit model would turn it on whatever the job says."""
    model = _load(base, _config(gradientCheckpointing=checkpointing))
    assert model.base_model.model.is_gradient_checkpointing is checkpointing


def test_a_checkpoint_of_a_4bit_base_holds_no_base_weight(loaded: Any) -> None:
    assert rebuilt_at_load(loaded)
    state = loaded.state_dict()
    assert not [k for k in state if ".base_layer.weight" in k]
    assert {k for k in state if "lora_" in k} == {n for n, p in loaded.named_parameters() if p.requires_grad}


def test_an_unquantised_lora_base_is_restored_from_its_checkpoints(base: str) -> None:
    assert not rebuilt_at_load(_load(base, _config({"quantization": "none"})))


def test_the_trained_parameters_load_into_a_rebuilt_model(base: str, loaded: Any) -> None:
    trained = {n: torch.randn_like(p) for n, p in loaded.named_parameters() if p.requires_grad}
    rebuilt = _load(base)
    load_trained(trained, rebuilt)
    assert all(torch.equal(p, trained[n]) for n, p in rebuilt.named_parameters() if p.requires_grad)


def test_a_checkpoint_missing_a_trained_parameter_is_refused(base: str, loaded: Any) -> None:
    trained = {n: p.detach() for n, p in loaded.named_parameters() if p.requires_grad}
    trained.pop(next(iter(trained)))
    with pytest.raises(RuntimeError, match="lacks 1 trained parameters"):
        load_trained(trained, _load(base))
