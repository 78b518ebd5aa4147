"""Tensor parallelism's memory: model-state memory per rank (parameters + gradients + optimizer
states) of a tiny-but-wide Llama under parallelism.tensor 2 against 1, with peak memory and steps/s
beside it. Aim: model state per rank at TP 2 / TP 1 (the same data-parallel degree) <= 0.6.

Three layouts, each under torchrun on CPU (gloo), each a DeepSpeed engine built as the trainer builds
it (ds_config.deepspeed_config from a resolved job, tensor_parallel.model_parallel_unit as the mpu,
the trainer's parameter groups and AdamW), trained a few steps through token_loss.step's arithmetic:
  baseline  TP 1 on 1 rank: the whole model on one rank (data-parallel degree 1);
  TP 2      on 2 ranks: the same data-parallel degree, each layer split in two;
  ZeRO dp 2 TP 1 on 2 ranks: the same 2 ranks spent on data parallelism instead (ZeRO shards the
            optimizer states, and at stage 2 the gradients, over them; parameters stay whole).
Model state is counted from the tensors the engine holds, each storage once: the module's parameters
(ZeRO's flat buffers), gradients (the parameters' .grad and ZeRO's gradient buffers, after the
backward) and optimizer states (fp32 master partitions and AdamW's moments, after the step). Peak is
the rank's VmHWM above its resident memory before the model was built (activations and allocator
slack included); steps/s is the mean of the timed steps (CPU: one thread per rank, so the 1-rank
baseline has half the cores; on CPU the all-reduces of TP cost more than they would over NVLink).

    .venv/bin/python benchmarks/tensor_parallel_memory.py [--hidden 1024] [--layers 4] [--zero 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _tensors(obj: Any, name: str, depth: int, out: list[tuple[str, Any]]) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out.append((name, obj))
        if obj.grad is not None:
            out.append((name + ".grad", obj.grad))
    elif depth and isinstance(obj, (list, tuple)):
        for item in obj:
            _tensors(item, name, depth - 1, out)
    elif depth and isinstance(obj, dict):
        for key, value in obj.items():
            _tensors(value, f"{name}.{key}" if isinstance(key, str) else name, depth - 1, out)


def model_state(engine: Any, seen: dict[int, tuple[str, int]]) -> None:
    """Add every storage the engine holds to `seen` (data pointer -> (kind, bytes)), the first kind
    that names it winning: parameters, then gradients, then optimizer states."""
    params = list(engine.module.parameters())
    found: list[tuple[str, Any]] = [("parameters", p) for p in params]
    found += [("gradients", p.grad) for p in params if p.grad is not None]
    held: list[tuple[str, Any]] = []
    for attribute, value in vars(engine.optimizer).items():
        _tensors(value, attribute, 3, held)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in getattr(inner, "state", {}).values():
        _tensors(state, "state", 2, held)
    for name, tensor in held:
        kind = "gradients" if "grad" in name or "ipg" in name else "optimizer states"
        found.append((kind, tensor))
    for kind, tensor in found:
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (kind, storage.nbytes())


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    from finetune_operator.api import resolve_trainer_config
    from finetune_trainer import process_group, tensor_parallel
    from finetune_trainer.ds_config import deepspeed_config, parameter_groups
    from finetune_trainer.parallel_layout import Layout
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.support.factories import job

    deepspeed.init_distributed(dist_backend="gloo")
    ranks = process_group.from_env()
    config = resolve_trainer_config(job({
        "spec.resources.gpusPerNode": 0, "spec.resources.processesPerNode": ranks.world_size,
        "spec.parallelism.tensor": args.tp, "spec.deepspeed.zeroStage": args.zero,
        "spec.training.precision": "fp32", "spec.training.microBatchSize": 1,
        "spec.training.globalBatchSize": ranks.world_size // args.tp,
    }))  # fmt: skip
    layout = Layout.of(config, ranks)
    baseline_kib = _status_kib("VmRSS")
    torch.manual_seed(0)
    heads = args.hidden // 64
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=args.seq,
    ))  # fmt: skip
    whole = sum(p.numel() for p in model.parameters())
    ds = deepspeed_config(config, cpu=True)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model.named_parameters(), 0.0), config=ds,
        mpu=tensor_parallel.model_parallel_unit(config, layout),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(layout.data_rank)
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=generator)
    batch = {"input_ids": ids, "labels": ids, "use_cache": False}
    seen: dict[int, tuple[str, int]] = {}
    times = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        loss = engine(**batch, num_items_in_batch=args.seq - 1).loss
        engine.backward(loss * layout.data_size, scale_wrt_gas=False)
        if step == 0:
            model_state(engine, seen)  # the gradients exist now
        engine.step()
        if step == 0:
            model_state(engine, seen)  # the optimizer states exist now
        elif step:
            times.append(time.perf_counter() - started)
    kinds = {k: sum(b for kind, b in seen.values() if kind == k) for k in
             ("parameters", "gradients", "optimizer states")}  # fmt: skip
    result = {
        "rank": ranks.rank,
        "local_parameters": sum(p.numel() for p in engine.module.parameters()),
        "whole_parameters": whole,
        **kinds,
        "peak_mib": (_status_kib("VmHWM") - baseline_kib) / 1024,
        "steps_per_second": len(times) / sum(times),
    }
    gathered = [None] * ranks.world_size
    torch.distributed.all_gather_object(gathered, result)
    if ranks.is_main:
        Path(args.out).write_text(json.dumps(gathered))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _launch(args: argparse.Namespace, tp: int, nproc: int, out: Path) -> list[dict[str, Any]]:
    from finetune_trainer.process_group import free_port

    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", __file__, "--worker", "--tp", str(tp), "--out", str(out),
        "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
        "--seq", str(args.seq), "--steps", str(args.steps), "--zero", str(args.zero),
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the TP {tp} run on {nproc} ranks failed:\n{done.stderr[-3000:]}")
    results: list[dict[str, Any]] = json.loads(out.read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import tempfile

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import print_table

    os.environ.setdefault("COLUMNS", "170")  # the table's 11 columns, unabridged when piped

    layouts = [("baseline: TP 1, 1 rank", 1, 1), ("TP 2, 2 ranks", 2, 2), ("ZeRO dp 2: TP 1, 2 ranks", 1, 2)]
    measured: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, tp, nproc in layouts:
            ranks = _launch(args, tp, nproc, Path(tmp) / f"{tp}-{nproc}.json")
            worst = max(ranks, key=lambda r: r["parameters"] + r["gradients"] + r["optimizer states"])
            measured[label] = {**worst, "state": worst["parameters"] + worst["gradients"]
                               + worst["optimizer states"], "steps_per_second": min(
                                   r["steps_per_second"] for r in ranks)}  # fmt: skip
    base = measured[layouts[0][0]]
    mib = 2**20
    rows = []
    for label, _, _ in layouts:
        m = measured[label]
        rows.append([
            label, f"{m['local_parameters'] / 1e6:.1f}M", f"{m['parameters'] / mib:.0f}",
            f"{m['gradients'] / mib:.0f}", f"{m['optimizer states'] / mib:.0f}", f"{m['state'] / mib:.0f}",
            f"{m['state'] / base['state']:.3f}",
            f"{m['peak_mib']:.0f}", f"{m['peak_mib'] / base['peak_mib']:.3f}",
            f"{m['steps_per_second']:.2f}", f"{m['steps_per_second'] / base['steps_per_second']:.2f}",
        ])  # fmt: skip
    print_table(
        f"Tensor parallelism: a {args.layers}-layer x {args.hidden} Llama "
        f"({base['whole_parameters'] / 1e6:.1f}M parameters, vocabulary {args.vocab}), fp32, "
        f"ZeRO-{args.zero}, {args.seq} tokens a step, per rank "
        "(the rank holding most)",
        ["layout", "params/rank", "params MiB", "grads MiB", "optim MiB", "model state MiB", "ratio",
         "peak MiB", "ratio", "steps/s", "ratio"],
        rows,
    )  # fmt: skip
    tp2, dp2 = measured[layouts[1][0]], measured[layouts[2][0]]
    print(f"ratio (model state per rank, TP 2 / TP 1 at data-parallel degree 1): "
          f"{tp2['state'] / base['state']:.3f}  (aim <= 0.6)")  # fmt: skip
    print(f"ratio (model state per rank, TP 2 / ZeRO-{args.zero} over the same 2 ranks): "
          f"{tp2['state'] / dp2['state']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
