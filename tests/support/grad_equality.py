"""One optimizer step of a tiny Llama through DeepSpeed, the global batch cut two ways; run under
torchrun by tests/integration/test_token_weighted_loss.py.

Every rank trains its share of the same global batch (examples whose targets differ in length 1 to
~40 tokens) with token_loss.step, once as micro batch 1 x accumulation 4 and once as micro batch 4 x
accumulation 1, with plain SGD (lr 1): the change of the weights is the gradient itself, which
AdamW's first step (about lr x sign) would hide. Rank 0 saves each run's weight change, and the
same cut under the naive per-micro-batch mean as a control that must differ.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
from finetune_trainer import token_loss
from finetune_trainer.encoding import IGNORE_INDEX, Example, collate
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
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    # An orderly end: no rank tears its process group down while another still talks to it.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
