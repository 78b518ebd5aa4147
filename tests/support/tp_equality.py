"""One optimizer step of a tiny Llama through DeepSpeed, on 2 ranks: plain data parallelism, or tensor
parallelism of degree 2 (AutoTP, as the trainer sets it up through tensor_parallel.py); run under
torchrun by tests/integration/test_tensor_parallel.py, once per layout (DeepSpeed's parallel groups
are process-global, so the two layouts never share a process).

The same global batch (examples whose targets differ in length 1 to ~40 tokens) is cut into the
layout's data-parallel shares: 2 ranks of 4 examples under data parallelism, one group of 8 under
tensor parallelism. Each rank steps through token_loss.step (the trainer's sft step) or the dpo
objective's step with plain SGD (lr 1, no clipping), so the change of the weights is the gradient.
For each case rank 0 saves the step's reported loss (the world's sum as the step loop reports it),
the whole weights after the step (tensor-parallel shards gathered as the export gathers them) and
their change; under tensor parallelism also the sharded engine's logits on a held-out batch and
the export's logits on it: the export saved with `save_pretrained`, loaded back by plain
transformers on rank 0.
"""

from __future__ import annotations

import faulthandler
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import deepspeed
import torch
from finetune_operator.api.spec import DpoSpec
from finetune_trainer import process_group, tensor_parallel, token_loss
from finetune_trainer.encoding import IGNORE_INDEX, Example, collate, model_inputs
from finetune_trainer.export import full_state_dict
from finetune_trainer.parallel_layout import Layout
from finetune_trainer.preference_objective import Preference
from finetune_trainer.preferences import join_pair
from transformers import LlamaConfig, LlamaForCausalLM

from tests.support.grad_equality import FixedReference, Table

GLOBAL = 8  # examples (pairs for dpo) per global batch
MICRO = 2
PROMPT = 6


def examples() -> list[Example]:
    generator = torch.Generator().manual_seed(7)
    out = []
    for i in range(GLOBAL):
        completion = 1 if i % 2 else 40 - 3 * i  # very different target counts side by side
        ids = torch.randint(3, 120, (PROMPT + completion,), generator=generator).tolist()
        out.append(Example(id=str(i), input_ids=ids, labels=[IGNORE_INDEX] * PROMPT + ids[PROMPT:]))
    return out


def packed_examples() -> list[Example]:
    """Windows of two whole examples each (`segments`: position ids restart per part, as packing.py
    makes them), the first label of each part masked; GLOBAL of them, so the layouts cut the batch
    as they cut plain examples."""
    parts = examples()
    out = []
    for a, b in zip(parts[0::2], parts[1::2], strict=True):
        out.append(Example(
            id=f"{a.id}+{b.id}", input_ids=a.input_ids + b.input_ids,
            labels=[*a.labels, IGNORE_INDEX, *b.labels[1:]], segments=(len(a.input_ids), len(b.input_ids)),
        ))  # fmt: skip
    return out + out[::-1]


def pairs() -> Table:
    table = Table()
    for i, e in enumerate(examples()):
        rejected_ids = e.input_ids[:PROMPT] + list(reversed(e.input_ids[PROMPT:])) + [5] * (i % 3)
        rejected = Example(e.id, rejected_ids, [IGNORE_INDEX] * PROMPT + rejected_ids[PROMPT:])
        table.append(join_pair(e, rejected))
    return table


def model(tied: bool) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def settings(tp: int, objective: str) -> Any:
    """The parts of a TrainerConfig that tensor_parallel.py and the objectives read."""
    return SimpleNamespace(
        parallelism=SimpleNamespace(tensor=tp, sequence=1, model_parallel_size=tp),
        world=SimpleNamespace(world_size=torch.distributed.get_world_size()),
        training=SimpleNamespace(objective=objective, method="full", dpo=DpoSpec(beta=0.5),
                                 attention_implementation="sdpa"),
        dataset=SimpleNamespace(max_seq_length=128, packing=False),
        schedule=SimpleNamespace(micro_batch_size=MICRO),
    )  # fmt: skip


def engine_for(tp: int, objective: str, tied: bool) -> tuple[Any, Layout]:
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    config = settings(tp, objective)
    layout = Layout(data_rank=rank // tp, data_size=world // tp, model_parallel=tp, model_rank=rank % tp)
    net = model(tied)
    ds = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GLOBAL // MICRO // layout.data_size,
        "train_batch_size": GLOBAL,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        **tensor_parallel.ds_config_section(config),
    }
    engine, *_ = deepspeed.initialize(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), config=ds,
        mpu=tensor_parallel.model_parallel_unit(config, layout),
    )  # fmt: skip
    return engine, layout


def inputs(batch: list[Example]) -> dict[str, Any]:
    return model_inputs(collate(batch, 0, 128, packed=bool(batch[0].segments)))


def case(tp: int, kind: str, tied: bool, out: Path) -> dict[str, Any]:
    objective = "dpo" if kind == "dpo" else "sft"
    engine, layout = engine_for(tp, objective, tied)
    share = tensor_parallel.report_share(settings(tp, objective), layout)
    per_rank = GLOBAL // layout.data_size
    mine = list(range(layout.data_rank * per_rank, (layout.data_rank + 1) * per_rank))
    micro_batches = [mine[at : at + MICRO] for at in range(0, len(mine), MICRO)]
    if kind == "dpo":
        table = pairs()
        dpo = Preference(settings(tp, objective), layout, None, table, {"train": FixedReference()})
        sums = dpo.step(engine, micro_batches, len(table), layout.data_size)
        reported = process_group.all_reduce([share * float(sums.loss)], "sum", None)[0] / len(table)
    else:
        chosen = packed_examples() if kind == "packed" else examples()
        global_targets = sum(token_loss.targets_of(e.labels) for e in chosen)
        batches = [inputs([chosen[i] for i in b]) for b in micro_batches]
        summed = token_loss.step(engine, batches, global_targets, layout.data_size)
        reported = process_group.all_reduce([share * float(summed)], "sum", None)[0] / global_targets
    probe = inputs(examples()[:3])
    engine.eval()
    with torch.no_grad():  # every rank: a sharded forward is a collective of its group
        logits = engine(**probe).logits.detach().clone()
    after = full_state_dict(engine, zero_stage=1)  # every rank: the export's gather
    result: dict[str, Any] = {"loss": reported, "logits": logits}
    if after is not None:
        before = model(tied).state_dict()
        result["delta"] = {n: before[n] - after[n] for n in after}
        result["export_logits"] = exported_logits(
            engine, after, probe, out.parent / f"export-{tp}-{kind}-{tied}"
        )
    engine.destroy()
    return result


def exported_logits(engine: Any, state: dict[str, torch.Tensor], probe: dict[str, Any], where: Path) -> Any:
    """Rank 0: the gathered weights saved as export.py saves them, loaded back by plain transformers
    (no DeepSpeed layer in it)."""
    from transformers import AutoModelForCausalLM

    engine.module.save_pretrained(where, state_dict=state, safe_serialization=True)
    plain = AutoModelForCausalLM.from_pretrained(where).eval()
    assert not [m for m in plain.modules() if "deepspeed" in type(m).__module__]
    with torch.no_grad():
        return plain(**probe).logits


def main(tp: int, out: Path) -> None:
    faulthandler.enable()  # a rank that aborts in C++ (gloo) still shows where it was
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for kind, tied in (("plain", False), ("packed", False), ("plain", True), ("dpo", False), ("dpo", True)):
        results[f"{kind}-{'tied' if tied else 'untied'}"] = case(tp, kind, tied, out)
        torch.distributed.barrier()  # rank 0's export check done before the next engine is built
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
