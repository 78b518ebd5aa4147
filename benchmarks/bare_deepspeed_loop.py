"""The baseline of trainer_overhead.py and checkpoint_stall.py: the smallest DeepSpeed loop that
trains the same model on batches of the same shape with the same DeepSpeed config. Run by torchrun;
rank 0 prints steps/s, and with --save-to the mean seconds of three synchronous
`engine.save_checkpoint` calls through DeepSpeed's default checkpoint engine.

    torchrun --nproc-per-node=2 benchmarks/bare_deepspeed_loop.py MODEL_DIR DS_CONFIG.json SEQ STEPS WARMUP \\
        [--save-to DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("config_path", type=Path)
    parser.add_argument("seq", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("warmup", type=int)
    parser.add_argument("--save-to", type=Path)
    args = parser.parse_args()
    ds_config = json.loads(args.config_path.read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    micro, accumulation = (
        ds_config["train_micro_batch_size_per_gpu"],
        ds_config["gradient_accumulation_steps"],
    )
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    batches = [
        torch.randint(8, model.config.vocab_size, (micro, args.seq), generator=generator) for _ in range(16)
    ]
    started = 0.0
    for step in range(args.steps):
        if step == args.warmup:
            started = time.perf_counter()
        for m in range(accumulation):
            ids = batches[(step * accumulation + m) % len(batches)]
            loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            engine.backward(loss)
            engine.step()
    elapsed = time.perf_counter() - started
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        print(f"BARE_STEPS_PER_SECOND {(args.steps - args.warmup) / elapsed:.4f}", flush=True)
    if args.save_to:
        seconds = []
        for i in range(3):
            began = time.perf_counter()
            engine.save_checkpoint(str(args.save_to), tag=f"step-{i}", save_latest=False)
            seconds.append(time.perf_counter() - began)
        if rank0:
            print(f"BARE_SAVE_SECONDS {sum(seconds) / len(seconds):.4f}", flush=True)


if __name__ == "__main__":
    main()
