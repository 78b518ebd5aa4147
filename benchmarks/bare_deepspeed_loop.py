"""The baseline of trainer_overhead.py: the smallest DeepSpeed loop that trains the same model on
batches of the same shape with the same DeepSpeed config. Run by torchrun; rank 0 prints steps/s.

    torchrun --nproc-per-node=2 benchmarks/bare_deepspeed_loop.py MODEL_DIR DS_CONFIG.json SEQ STEPS WARMUP
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, config_path, seq, steps, warmup = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    ds_config = json.loads(Path(config_path).read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    micro, accumulation = (
        ds_config["train_micro_batch_size_per_gpu"],
        ds_config["gradient_accumulation_steps"],
    )
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    batches = [
        torch.randint(8, model.config.vocab_size, (micro, seq), generator=generator) for _ in range(16)
    ]
    started = 0.0
    for step in range(steps):
        if step == warmup:
            started = time.perf_counter()
        for m in range(accumulation):
            ids = batches[(step * accumulation + m) % len(batches)]
            loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            engine.backward(loss)
            engine.step()
    elapsed = time.perf_counter() - started
    if torch.distributed.get_rank() == 0:
        print(f"BARE_STEPS_PER_SECOND {(steps - warmup) / elapsed:.4f}", flush=True)


if __name__ == "__main__":
    main()
