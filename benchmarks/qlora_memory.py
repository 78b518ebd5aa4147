"""QLoRA against LoRA: model-state memory (parameters, gradients, optimizer states, in bytes) of the same
tiny-but-wide Llama loaded by the trainer's own path (model.load_model), unquantised and in 4 bits.
Aim: QLoRA / LoRA <= 0.35 in bf16 at the default adapter rank.

Every figure is the bytes of tensors that exist after one real training step, counted once per
storage: parameters (the 4-bit layers' packed weights and their quantisation state included) cast to
the training precision as DeepSpeed casts them when it builds the engine (floating parameters only),
the trained parameters' gradients, and the optimizer's: AdamW's two moments and, in bf16, the fp32
master copy DeepSpeed's mixed precision keeps of every trained parameter (fp32 trains in place).
Activations are left out: they depend on the batch, not on how the base is held.

The model's vocabulary is the tiny word-level one, so its embeddings and output layer (which stay
unquantised) weigh next to nothing; a real vocabulary adds them to both sides and raises the ratio.
The adapters and their states (16 bytes a parameter in bf16) are the same on both sides, and their
share falls with the width: at hidden 1024 and rank 16 they are 1.6% of the projections' parameters
and weigh almost as much as the 4-bit base, so the ratio there is above the aim that wider models
(2048 and up) meet.

    .venv/bin/python benchmarks/qlora_memory.py [--hidden 1024] [--layers 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import print_table
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer.model import load_model, torch_dtype
from finetune_trainer.tiny import write_tiny_model

from tests.support.factories import job

AIM = 0.35
RANKS = (16, 8)  # the API's default, and a smaller one


def _config(precision: str, rank: int, quantization: str) -> Any:
    return resolve_trainer_config(job({
        "spec.dataset.sources": [{"uri": "file:///unused.jsonl"}],
        "spec.deepspeed.zeroStage": 2,
        "spec.training.method": "lora",
        "spec.training.lora": {"rank": rank, "quantization": quantization},
        "spec.training.precision": precision,
        "spec.training.gradientCheckpointing": False,
    }))  # fmt: skip


def _quantisation_state(model: Any) -> list[torch.Tensor]:
    import bitsandbytes as bnb

    tensors = []
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            for part in (state, getattr(state, "state2", None)):
                tensors += [v for v in vars(part or object()).values() if isinstance(v, torch.Tensor)]
    return tensors


def _bytes(tensors: list[torch.Tensor]) -> int:
    """Each storage once (the 4-bit code tables are shared between layers)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def model_states(source: str, precision: str, rank: int, quantization: str) -> dict[str, int]:
    model, _ = load_model(_config(precision, rank, quantization), source, {})
    dtype = torch_dtype(precision)
    for p in model.parameters():  # DeepSpeed's cast when it builds the engine
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    trained = [p for p in model.parameters() if p.requires_grad]
    masters = trained if dtype == torch.float32 else [p.detach().float().requires_grad_() for p in trained]
    optimizer = torch.optim.AdamW(masters, lr=1e-4)
    ids = torch.randint(8, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for master, p in zip(masters, trained, strict=True):
        if master is not p:
            master.grad = p.grad.float()
    optimizer.step()
    if masters is not trained:
        for master in masters:
            master.grad = None  # DeepSpeed frees the fp32 gradient partition after its step
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    return {
        "parameters": _bytes([*model.parameters(), *model.buffers(), *_quantisation_state(model)]),
        "gradients": _bytes([p.grad for p in trained if p.grad is not None]),
        "optimizer": _bytes(moments + ([] if masters is trained else masters)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = str(write_tiny_model(Path(tmp) / "model", hidden=args.hidden, layers=args.layers))
        rows, headline = [], None
        for precision in ("bf16", "fp32"):
            for rank in RANKS:
                lora = model_states(source, precision, rank, "none")
                qlora = model_states(source, precision, rank, "nf4")
                ratio = sum(qlora.values()) / sum(lora.values())
                headline = ratio if (precision, rank) == ("bf16", RANKS[0]) else headline
                for name, states in (("LoRA", lora), ("QLoRA", qlora)):
                    rows.append([
                        precision, str(rank), name,
                        *(f"{states[k] / 2**20:.1f}" for k in ("parameters", "gradients", "optimizer")),
                        f"{sum(states.values()) / 2**20:.1f}", f"{ratio:.3f}" if name != "LoRA" else "",
                    ])  # fmt: skip
    print_table(
        f"Llama hidden {args.hidden}, {args.layers} layers: model states (MiB)",
        ["precision", "rank", "method", "params", "grads", "optim", "total", "QLoRA/LoRA"],
        rows,
    )
    assert headline is not None
    verdict = "met" if headline <= AIM else "MISSED"
    print(f"bf16, rank {RANKS[0]}: QLoRA/LoRA = {headline:.3f} (aim <= {AIM}): {verdict}")


if __name__ == "__main__":
    main()
