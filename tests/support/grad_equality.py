"""One optimizer step of a tiny Llama through DeepSpeed, the global batch cut two ways; run under
torchrun by tests/integration/test_token_weighted_loss.py.

Every rank trains its share of the same global batch (examples whose targets differ in length 1 to
~40 tokens) with token_loss.step, once as micro batch 1 x accumulation 4 and once as micro batch 4 x
accumulation 1, with plain SGD (lr 1): the change of the weights is the gradient itself, which
AdamW's first step (about lr x sign) would hide. Rank 0 saves each run's weight change, and the
same cut under the naive per-micro-batch mean as a control that must differ. The dpo and distill
objectives step the same way through their own `step` (a mean over the global batch's pairs, and over
its target tokens), on pairs of different answer lengths and against a fixed teacher.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import deepspeed
import torch
from finetune_operator.api.spec import DistillationSpec, DpoSpec
from finetune_trainer import token_loss
from finetune_trainer.distill_objective import Distillation
from finetune_trainer.encoding import IGNORE_INDEX, Example, collate
from finetune_trainer.preference_objective import Preference
from finetune_trainer.preferences import join_pair
from transformers import LlamaConfig, LlamaForCausalLM

PER_RANK = 4
PROMPT = 6


def examples(world: int) -> list[Example]:
    generator = torch.Generator().manual_seed(7)
    out = []
    for i in range(PER_RANK * world):
        completion = 1 if i % 2 else 40 - 3 * i  # very different target counts side by side
        ids = torch.randint(3, 120, (PROMPT + completion,), generator=generator).tolist()
        out.append(Example(id=str(i), input_ids=ids, labels=[IGNORE_INDEX] * PROMPT + ids[PROMPT:]))
    return out


def model(lora: bool) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config)
    if not lora:
        return base
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, peft)


def weights(engine: Any) -> dict[str, torch.Tensor]:
    params = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def one_step(stage: int, lora: bool, micro: int, accumulation: int, naive: bool) -> dict[str, torch.Tensor]:
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    net = model(lora)
    trainable = [p for p in net.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(trainable, lr=1.0), config=config)
    before = weights(engine)
    everything = examples(world)
    mine = everything[rank * PER_RANK : (rank + 1) * PER_RANK]
    batches = [
        {k: torch.tensor(v) for k, v in collate(mine[at : at + micro], 0, 64).items()}
        for at in range(0, PER_RANK, micro)
    ]
    if naive:  # what the trainer did before: a mean per micro batch, averaged by DeepSpeed
        for batch in batches:
            engine.backward(engine(**batch).loss)
            engine.step()
    else:
        global_targets = sum(token_loss.targets_of(e.labels) for e in everything)
        token_loss.step(engine, batches, global_targets, world)
    after = weights(engine)
    engine.destroy()
    return {n: before[n] - after[n] for n in before}


class Table(list[Example]):
    """The examples as the objectives read them (by index, with their target count)."""

    def targets(self, indices: list[int]) -> int:
        return sum(token_loss.targets_of(self[i].labels) for i in indices)


def pairs(world: int) -> Table:
    """Pairs sharing a prompt, their answers 1 to ~40 tokens long."""
    table = Table()
    for i, e in enumerate(examples(world)):
        rejected_ids = e.input_ids[:PROMPT] + list(reversed(e.input_ids[PROMPT:])) + [5] * (i % 3)
        rejected = Example(e.id, rejected_ids, [IGNORE_INDEX] * PROMPT + rejected_ids[PROMPT:])
        table.append(join_pair(e, rejected))
    return table


class FixedReference:
    """Reference log-probabilities of every pair: any fixed values serve a gradient comparison."""

    def __getitem__(self, indices: list[int]) -> tuple[list[float], list[float]]:
        return [-30.0 - i for i in indices], [-25.0 - 2 * i for i in indices]


def objective_step(kind: str, micro: int, accumulation: int) -> dict[str, torch.Tensor]:
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    net = model(lora=False)
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
                                      config=config)  # fmt: skip
    before = weights(engine)
    settings = SimpleNamespace(
        training=SimpleNamespace(dpo=DpoSpec(beta=0.5), distillation=DistillationSpec(teacher="file:///t")),
        dataset=SimpleNamespace(max_seq_length=64, packing=False),
        schedule=SimpleNamespace(micro_batch_size=micro),
    )
    settings.training.attention_implementation = "sdpa"
    layout = SimpleNamespace(data_rank=rank, data_size=world)
    if kind == "dpo":
        table = pairs(world)
        objective: Any = Preference(settings, layout, None, table, {"train": FixedReference()})
        global_count = len(table)
    else:
        table = Table(examples(world))
        torch.manual_seed(5)
        teacher = model(lora=False).eval()
        objective = Distillation(settings, layout, None, table, teacher)
        global_count = table.targets(list(range(len(table))))
    mine = list(range(rank * PER_RANK, (rank + 1) * PER_RANK))
    objective.step(engine, [mine[at : at + micro] for at in range(0, PER_RANK, micro)], global_count, world)
    after = weights(engine)
    engine.destroy()
    return {n: before[n] - after[n] for n in before}


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for stage, lora in ((0, False), (2, False), (3, False), (2, True)):
        for micro, accumulation in ((1, 4), (4, 1)):
            results[f"z{stage}-{'lora' if lora else 'full'}-{micro}x{accumulation}"] = one_step(
                stage, lora, micro, accumulation, naive=False
            )
    for micro, accumulation in ((1, 4), (4, 1)):
        results[f"naive-{micro}x{accumulation}"] = one_step(2, False, micro, accumulation, naive=True)
        for kind in ("dpo", "distill"):
            results[f"z2-{kind}-{micro}x{accumulation}"] = objective_step(kind, micro, accumulation)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    # An orderly end: no rank tears its process group down while another still talks to it.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
