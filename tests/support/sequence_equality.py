"""One optimizer step of a tiny Llama (4 attention heads, 2 key/value heads) on 2 ranks through
DeepSpeed, the same global batch trained two ways; run under torchrun by
tests/integration/test_sequence_parallel.py.

- data parallel: each rank trains half of the 16 examples (micro batch 4 x accumulation 2);
- sequence parallel 2 (Ulysses): both ranks train all 16 examples (micro batch 4 x accumulation 4,
  one data-parallel rank), each feeding its half of every sequence.

Both through the trainer's own sft objective (`objectives.Supervised`: its step and its evaluation)
with plain SGD (lr 1), so the change of the weights is the gradient itself, and again with the
gradient clipped to a norm well below its own (the norm DeepSpeed computes over the group decides
the change). Examples are 7 to 47
tokens long, targets 1 to 41 (micro batches of odd widths: the padding to a multiple of the degree is
exercised, and some shards hold no target at all). ZeRO 0, 2 and 3, with the trainer's ZeRO
settings. The data-parallel runs come first: registering Ulysses replaces
sdpa in the whole process. Rank 0 saves every run's weight change, its loss (the step loop's
all-reduced sum over the global target count) and its held-out loss (6 examples: a short last
micro batch under sequence parallelism).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import deepspeed
import torch
from finetune_trainer import process_group, sequence_parallel
from finetune_trainer.ds_config import _zero as trainer_zero
from finetune_trainer.encoding import IGNORE_INDEX, Example
from finetune_trainer.objectives import Supervised
from finetune_trainer.parallel_layout import Layout
from finetune_trainer.sequence_parallel import Shards

from tests.support.grad_equality import PROMPT, Table, model, weights

STAGES = (0, 2, 3)
MICRO = 4
GLOBAL = 16
HELD_OUT = 6
CLIPPING = 0.01  # well below the gradient's norm: a norm counted wrong over the group clips differently
COMPLETIONS = (41, 1, 30, 3, 22, 1, 15, 8, 2, 27, 1, 11, 33, 5, 1, 19)


def examples() -> list[Example]:
    generator = torch.Generator().manual_seed(7)
    out = []
    for i, completion in enumerate(COMPLETIONS):
        ids = torch.randint(3, 120, (PROMPT + completion,), generator=generator).tolist()
        out.append(Example(id=str(i), input_ids=ids, labels=[IGNORE_INDEX] * PROMPT + ids[PROMPT:]))
    return out


def settings(degree: int, stage: int = 0) -> Any:
    return SimpleNamespace(
        dataset=SimpleNamespace(max_seq_length=64, packing=False),
        training=SimpleNamespace(attention_implementation="sdpa"),
        schedule=SimpleNamespace(micro_batch_size=MICRO),
        parallelism=SimpleNamespace(sequence=degree, tensor=1),
        deepspeed=SimpleNamespace(zero_stage=stage, offload_optimizer=False, offload_parameters=False),
    )


def one_step(stage: int, degree: int, mpu: Any, clipping: float) -> dict[str, Any]:
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    layout = Layout(data_rank=rank // degree, data_size=world // degree, model_parallel=degree,
                    model_rank=rank % degree)  # fmt: skip
    config = settings(degree, stage)
    per_rank = GLOBAL // layout.data_size
    accumulation = per_rank // MICRO
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": GLOBAL,
        "zero_optimization": trainer_zero(config),  # the trainer's ZeRO settings: its reduction paths
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": clipping,
    }
    if degree > 1:
        ds_config["sequence_parallel_size"] = degree
    net = model(lora=False)
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
                                      config=ds_config, mpu=mpu)  # fmt: skip
    before = weights(engine)
    table = Table(examples())
    held_out = Table(examples()[:HELD_OUT])
    objective = Supervised(config, layout, None, table, Shards.of(config, layout))
    everything = list(range(GLOBAL))
    mine = everything[layout.data_rank * per_rank : (layout.data_rank + 1) * per_rank]
    global_count = table.targets(everything)
    sums = objective.step(engine, [mine[at : at + MICRO] for at in range(0, per_rank, MICRO)], global_count,
                          layout.data_size)  # fmt: skip
    (loss,) = process_group.all_reduce([float(sums.loss)], "sum", None)
    after = weights(engine)
    evaluation = objective.evaluate(engine, held_out)
    engine.destroy()
    assert evaluation is not None
    return {
        "delta": {n: before[n] - after[n] for n in before},
        "loss": loss / global_count,
        "eval_loss": evaluation.loss,
    }


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for degree in (1, 2):
        mpu = None
        if degree == 2:
            torch.manual_seed(0)
            mpu = sequence_parallel.register(settings(2), model(lora=False))
        for stage in STAGES:
            for clipped, clipping in (("", 0.0), ("-clipped", CLIPPING)):
                results[f"z{stage}{clipped}-{'sp' if degree == 2 else 'dp'}"] = one_step(stage, degree, mpu,
                                                                                        clipping)  # fmt: skip
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
