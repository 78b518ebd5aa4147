"""The peer side of vs_hf_trainer.py: transformers.Trainer with DeepSpeed (or its DDP path on gloo),
run by torchrun on the same model, examples, batch arithmetic and DeepSpeed config as
finetune_trainer. Rank 0 writes steps/s after the warm-up, mean tokens per step and the final
token-weighted validation loss as JSON.

    torchrun --nproc-per-node=2 benchmarks/hf_trainer_side.py SETTINGS.json OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())


def validation_loss(model: Any, examples: list[dict[str, list[int]]]) -> float:
    """Mean cross-entropy per target token, the measure finetune_trainer reports."""
    total, targets = 0.0, 0
    model.eval()
    with torch.no_grad():
        for e in examples:
            labels = torch.tensor([e["labels"]])
            count = int((labels[:, 1:] != -100).sum())
            if count:
                out = model(input_ids=torch.tensor([e["input_ids"]]), labels=labels, use_cache=False)
                total, targets = total + float(out.loss) * count, targets + count
    return total / targets


def main(settings_path: Path, out: Path) -> None:
    s = json.loads(settings_path.read_text())
    data = json.loads(Path(s["data"]).read_text())
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32, attn_implementation="sdpa")
    args = TrainingArguments(
        output_dir=s["output"],
        per_device_train_batch_size=s["micro"],
        gradient_accumulation_steps=s["accumulation"],
        max_steps=s["steps"],
        learning_rate=s["lr"],
        warmup_steps=s["warmup_steps"],
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=s["clipping"],
        adam_beta1=s["adam"]["betas"][0],
        adam_beta2=s["adam"]["betas"][1],
        adam_epsilon=s["adam"]["eps"],
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=s["seed"],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=True,
        ddp_backend="gloo",
        deepspeed=s.get("deepspeed"),
    )
    if s["packing"]:  # the Trainer's best packing: padding-free, position ids per example
        collator: Any = DataCollatorWithFlattening(return_position_ids=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(s["model"])
        collator = DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True, label_pad_token_id=-100)
    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], data_collator=collator,
                      callbacks=[clock])  # fmt: skip
    trainer.train()
    warm = s["warmup"]
    rate = (len(clock.times) - 1 - warm) / (clock.times[-1] - clock.times[warm])
    if torch.distributed.get_rank() == 0:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        result = {"steps_per_second": rate, "eval_loss": validation_loss(unwrapped, data["validation"])}
        out.write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
