"""Tensor parallelism's decisions that need no process group: what is refused before any weight loads
(exit 2, naming parallelism.tensor), what the DeepSpeed config gets, whose sums are reported, which
checkpoint files a node fetches and which checkpoints resume. Training itself, its gradients and its
export run in tests/integration/test_tensor_parallel.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from finetune_operator import contract
from finetune_operator.api import resolve_trainer_config
from finetune_trainer import ds_config, tensor_parallel
from finetune_trainer.model import ModelNotFound
from finetune_trainer.parallel_layout import Layout
from finetune_trainer.process_group import Ranks
from finetune_trainer.tensor_parallel import TensorParallelRefused
from finetune_trainer.tiny import write_tiny_model

from tests.support.factories import job


def _config(tensor: int, processes: int = 8, **changes: Any) -> Any:
    return resolve_trainer_config(job({
        "spec.resources.gpusPerNode": processes, "spec.parallelism.tensor": tensor, **changes,
    }))  # fmt: skip


def _llama(heads: int = 32, kv_heads: int = 8, intermediate: int = 14336) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * 8,
                       intermediate_size=intermediate)  # fmt: skip


@pytest.mark.parametrize("tensor", [1, 2, 4, 8])
def test_a_model_whose_heads_and_mlp_divide_by_the_degree_is_accepted(tensor: int) -> None:
    tensor_parallel.check_model(_config(tensor), _llama())  # Llama 3 8B's 32 heads, 8 kv heads, 14336


@pytest.mark.parametrize(
    "model,named",
    [
        (_llama(kv_heads=2), "key/value heads 2"),
        (_llama(heads=12, kv_heads=12), "attention heads 12, key/value heads 12"),
        (_llama(intermediate=1100), "MLP intermediate size 1100"),
    ],
)
def test_a_model_that_does_not_split_evenly_is_refused_with_exit_2_naming_the_field(
    model: Any, named: str
) -> None:
    with pytest.raises(TensorParallelRefused) as refused:
        tensor_parallel.check_model(_config(8), model)
    assert refused.value.exit_code == contract.ExitCode.INVALID_CONFIG == 2
    message = str(refused.value)
    assert message.startswith("parallelism.tensor: 8 does not divide the model's") and named in message


def test_the_refusal_reads_the_models_own_config_before_any_weight_loads(tmp_path: Path) -> None:
    """The tiny Llama has 2 key/value heads: degree 2 trains it, 4 is refused from its config.json."""
    model = write_tiny_model(tmp_path / "model")
    (model / "model.safetensors").unlink()  # nothing but the config is read
    tensor_parallel.check(_config(2, processes=4), str(model))
    with pytest.raises(TensorParallelRefused, match=r"^parallelism.tensor: 4 .* key/value heads 2"):
        tensor_parallel.check(_config(4, processes=4), str(model))
    with pytest.raises(ModelNotFound):  # exit 3, as loading it would
        tensor_parallel.check(_config(2, processes=4), str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    "changes,named",
    [
        ({"spec.training.method": "lora"}, "training.method lora"),
        ({"spec.training.ligerKernels": True}, "training.ligerKernels"),
        ({"spec.training.objective": "distill",
          "spec.training.distillation": {"teacher": "file:///teacher"}}, "training.objective distill"),
    ],
)  # fmt: skip
def test_lora_liger_and_distillation_are_refused_under_tensor_parallelism(
    changes: dict[str, Any], named: str
) -> None:
    """Both API layers refuse these (test_malformed_manifests.py); a config that got past them (written
    by hand) is refused by the trainer too, at start."""
    from finetune_operator.api.spec import ParallelismSpec

    allowed = _config(1, **changes)
    past_the_api = allowed.model_copy(update={"parallelism": ParallelismSpec.model_construct(tensor=2)})
    with pytest.raises(TensorParallelRefused, match=f"^parallelism.tensor: 2 with {named}"):
        tensor_parallel.check_run(past_the_api)
    tensor_parallel.check_run(allowed)


def test_the_deepspeed_config_asks_autotp_for_the_degree_and_nothing_without_it() -> None:
    assert ds_config.deepspeed_config(_config(4))["tensor_parallel"] == {"autotp_size": 4}
    assert "tensor_parallel" not in ds_config.deepspeed_config(_config(1))


def test_dpo_keeps_every_logit_on_every_rank() -> None:
    """Its sequence log-probabilities sum over the whole vocabulary; a tied head split by vocabulary
    would leave each rank a slice of it."""
    pairs = [{"uri": "s3://data/pairs.jsonl", "shape": "preference"}]
    dpo = ds_config.deepspeed_config(
        _config(2, **{"spec.training.objective": "dpo", "spec.dataset.sources": pairs})
    )
    assert dpo["tensor_parallel"] == {"autotp_size": 2, "vocab_parallel_lm_head": False}


def test_deepspeed_counts_data_parallel_ranks_in_the_batch() -> None:
    """micro x accumulation x data-parallel ranks = the global batch, the arithmetic DeepSpeed's
    parser checks through the model-parallel unit the trainer gives it."""
    config = _config(4, **{"spec.training.microBatchSize": 2, "spec.training.globalBatchSize": 8})
    ds = ds_config.deepspeed_config(config)
    view = tensor_parallel.config_view(config)
    assert view is not None and view.get_data_parallel_world_size() == 2
    micro, accumulation = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    assert micro * accumulation * 2 == ds["train_batch_size"] == 8
    assert tensor_parallel.config_view(_config(1)) is None


def test_only_the_first_rank_of_a_group_adds_its_sums_to_the_report() -> None:
    config = _config(4)
    shares = [tensor_parallel.report_share(config, Layout.of(config, _ranks(r, 8))) for r in range(8)]
    assert shares == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    plain = _config(1)
    assert {tensor_parallel.report_share(plain, Layout.of(plain, _ranks(r, 8))) for r in range(8)} == {1.0}


def test_the_layout_groups_consecutive_ranks_as_deepspeeds_tensor_parallel_mesh_does() -> None:
    """DeepSpeed's mesh is (data, tensor): a tensor-parallel group is consecutive ranks, a
    data-parallel group every degree-th (deepspeed.utils.groups._init_tp_groups_with_new_group)."""
    config = _config(2, processes=8)
    layouts = [Layout.of(config, _ranks(r, 8)) for r in range(8)]
    assert [(x.data_rank, x.model_rank) for x in layouts] == [(r // 2, r % 2) for r in range(8)]
    assert {x.data_size for x in layouts} == {4}


def _ranks(rank: int, world: int, local: int | None = None) -> Ranks:
    local = local or world
    return Ranks(rank=rank, local_rank=rank % local, world_size=world, local_world_size=local,
                 node_rank=rank // local)  # fmt: skip


def test_a_node_fetches_the_shards_of_its_data_parallel_ranks() -> None:
    """2 nodes of 4 ranks at degree 2: data ranks 0-1 on node 0, 2-3 on node 1, each with every
    tensor-parallel rank's file."""
    from finetune_trainer.resuming import node_files

    files = [
        *(f"mp_rank_0{t}_model_states.pt" for t in range(2)),
        *(f"zero_pp_rank_{d}_mp_rank_0{t}_optim_states.pt" for d in range(4) for t in range(2)),
    ]
    wanted = node_files(_ranks(4, 8, local=4), saved_world_size=8, reads_all=False, tensor=2)
    assert wanted is not None
    assert [f for f in files if wanted(f)] == [
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
        "zero_pp_rank_2_mp_rank_00_optim_states.pt",
        "zero_pp_rank_2_mp_rank_01_optim_states.pt",
        "zero_pp_rank_3_mp_rank_00_optim_states.pt",
        "zero_pp_rank_3_mp_rank_01_optim_states.pt",
    ]


TP2 = ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
       "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"]  # fmt: skip
PLAIN = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # fmt: skip


def test_a_checkpoints_degree_is_read_from_its_files() -> None:
    assert tensor_parallel.saved_degree(TP2) == 2
    assert tensor_parallel.saved_degree(PLAIN) == 1
    assert tensor_parallel.saved_degree(["zero_pp_rank_3_mp_rank_00_model_states.pt"]) == 1  # ZeRO-3


def test_a_checkpoint_resumes_only_at_its_degree_and_under_tp_at_its_world_size() -> None:
    tensor_parallel.check_resume(6, TP2, saved_world_size=2, tp=2, world_size=2)
    tensor_parallel.check_resume(6, PLAIN, saved_world_size=2, tp=1, world_size=4)  # universal's job
    with pytest.raises(TensorParallelRefused, match=r"saved at tensor-parallel degree 2, this run's is 1"):
        tensor_parallel.check_resume(6, TP2, saved_world_size=2, tp=1, world_size=2)
    with pytest.raises(TensorParallelRefused, match=r"set parallelism.tensor to 1"):
        tensor_parallel.check_resume(6, PLAIN, saved_world_size=2, tp=2, world_size=2)
    with pytest.raises(TensorParallelRefused, match=r"saved by 2 processes .* this run has 4"):
        tensor_parallel.check_resume(6, TP2, saved_world_size=2, tp=2, world_size=4)


def test_an_engine_without_autotp_has_degree_1() -> None:
    assert tensor_parallel.degree_of(None) == 1
    assert tensor_parallel.degree_of(SimpleNamespace(autotp_size=lambda: 0)) == 1
    assert tensor_parallel.degree_of(SimpleNamespace(autotp_size=lambda: 2)) == 2
