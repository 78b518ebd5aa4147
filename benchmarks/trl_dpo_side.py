"""The peer side of vs_trl_dpo.py: TRL's DPOTrainer on DeepSpeed ZeRO-2 (its `deepspeed=` TrainingArguments
path), run by torchrun on the same model, pairs, batch arithmetic, schedule, beta, loss and DeepSpeed config
as finetune_trainer, with the reference log-probs precomputed before training as finetune_trainer does. TRL
reads the pairs as text and tokenizes them itself. The final model is saved in Hugging Face format for the
benchmark's shared held-out evaluation; rank 0 writes the token ids TRL trained on, and steps/s after the
warm-up, the step count and the set-up's (reference scoring included) and training's wall time as JSON.

    torchrun --nproc-per-node=2 benchmarks/trl_dpo_side.py SETTINGS.json OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())


def main(settings_path: Path, out: Path) -> None:
    s = json.loads(settings_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(s["model"])
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=s["output"],
        per_device_train_batch_size=s["micro"],
        gradient_accumulation_steps=s["accumulation"],
        max_steps=s["steps"],
        learning_rate=s["lr"],
        warmup_steps=s["warmup_steps"],
        lr_scheduler_type=s["schedule"],
        weight_decay=s["adam"]["weight_decay"],
        max_grad_norm=s["clipping"],
        adam_beta1=s["adam"]["betas"][0],
        adam_beta2=s["adam"]["betas"][1],
        adam_epsilon=s["adam"]["eps"],
        beta=s["beta"],
        loss_type=["sigmoid"],
        max_length=s["max_length"],
        precompute_ref_log_probs=True,
        bf16=False,  # DPOConfig's default is bf16; fp32 as finetune_trainer's run
        gradient_checkpointing=False,  # DPOConfig's default is on; off as finetune_trainer's run
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=s["seed"],
        dataloader_num_workers=0,
        use_cpu=True,
        ddp_backend="gloo",
        deepspeed=s["deepspeed"],
    )
    # File-backed in this run's own cache folder: TRL's precompute writes the reference log-probs to a cache
    # file beside the dataset's on rank 0 and every rank reads it back (an in-memory dataset would give each
    # rank a temporary folder of its own), and a fresh folder per run keeps a repeat from reusing them.
    with args.main_process_first(desc="the pairs' load"):
        pairs = Dataset.from_json(s["train"], cache_dir=s["cache"])
    clock = StepClock()
    started = time.perf_counter()
    # The reference log-probs are scored here, in the constructor (precompute_ref_log_probs).
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs,
                         processing_class=tokenizer, callbacks=[clock])  # fmt: skip
    prepared = time.perf_counter()
    if torch.distributed.get_rank() == 0:  # for the benchmark's check that both sides train on the same ids
        data = trainer.train_dataset
        ids = [[p + c, p + r] for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"],
                                                 strict=True)]  # fmt: skip
        Path(s["tokens"]).write_text(json.dumps(ids))
    trainer.train()
    trained = time.perf_counter()
    trainer.save_model(s["final"])  # ZeRO-2: rank 0 writes the whole model
    warm = s["warmup"]  # steps warm+1 .. last: clock.times[warm - 1] is the end of step `warm`
    rate = (len(clock.times) - warm) / (clock.times[-1] - clock.times[warm - 1])
    if torch.distributed.get_rank() == 0:
        result = {
            "steps_per_second": rate,
            "steps": len(clock.times),
            "prepare_seconds": prepared - started,
            "train_seconds": trained - prepared,
        }
        out.write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
