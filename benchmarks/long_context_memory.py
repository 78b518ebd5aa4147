"""Long contexts: peak memory per rank of one training step, each model-parallel way of fitting a
long sequence against its baseline measured in the same run, steps/s beside each.

One section per mechanism; each launches 2 CPU ranks under torchrun per configuration (fresh
processes, so no configuration inherits another's allocator state) and prints its own table and ratio.

- sequence (`parallelism.sequence`, sequence_parallel.py): Ulysses over 2 ranks against plain data
  parallelism (each rank a whole sequence), a tiny-but-wide Llama (512 wide, 8 heads, 4 key/value
  heads, 2 layers, vocabulary 2048, fp32, sdpa, no gradient checkpointing) at one sequence of
  --seq tokens per data-parallel rank. Aim: the step's peak per rank at SP 2 / SP 1 <= 0.6. The
  baseline trains twice the tokens per step (two ranks, two sequences), so its tokens/s is the
  figure to compare, not steps/s.
- tensor (`parallelism.tensor`): benchmarks/tensor_parallel_memory.py, model state (parameters,
  gradients, optimizer states), peak and steps/s per rank at TP 2 against TP 1 at the same
  data-parallel degree, and against ZeRO-2 over the same ranks. Aim: model state TP 2 / TP 1 <= 0.6.
- qlora (`training.lora.quantization`): benchmarks/qlora_memory.py, model state of LoRA on a 4-bit
  NF4 base against LoRA on the bf16/fp32 base. Aim: QLoRA / LoRA <= 0.35.
  Both run as their own scripts (each prints its table and ratio); `--part` picks one section.

How memory is measured: torch's CPU tensors come from malloc, which tracemalloc does not see, and
torch's profiler sees allocations but not the allocator's fragmentation or what it keeps; what a rank
needs from the machine is its resident set. Each rank trains one step first (DeepSpeed allocates its
gradient partitions and AdamW its states there), hands what malloc kept of that step's freed memory
back (glibc's malloc_trim: else the measured step reuses it unseen, by a different amount on each
rank), resets its peak resident set to the current one (`echo 5 > /proc/self/clear_refs`, Linux
4.0+) and reads VmRSS, trains the measured step and reads
VmHWM: "step peak" is VmHWM - VmRSS before the step (activations, all-to-all buffers, gradients in
flight: what the sequence costs), "peak RSS" VmHWM itself (torch, the model, its optimizer state,
and the step). Without clear_refs (another kernel) the step peak falls back to the difference of
getrusage's ru_maxrss, which is right only when the step sets a new peak.

    .venv/bin/python benchmarks/long_context_memory.py [--seq 8192] [--part sequence]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import REPO, print_table
from finetune_trainer.process_group import free_port

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 512, 2, 8, 4, 2048


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _release_free_memory() -> None:
    """Hand the memory malloc keeps after frees back to the system (glibc's malloc_trim), so the
    resident set before the measured step is what is live, not what the warm-up step left behind."""
    import contextlib
    import ctypes

    # Not glibc: nothing to call, and the step peak may be understated by what the allocator kept.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sequence_worker(degree: int, seq: int, out: Path) -> None:
    """One rank: the trainer's own config, Ulysses registration and sft step (objectives.Supervised)
    on a synthetic long example per data-parallel rank; its measurements as JSON in `out`."""
    import deepspeed
    import torch
    from finetune_operator.api.trainer_config import resolve_trainer_config
    from finetune_trainer import sequence_parallel
    from finetune_trainer.ds_config import deepspeed_config, parameter_groups
    from finetune_trainer.encoding import Example
    from finetune_trainer.objectives import Supervised
    from finetune_trainer.parallel_layout import Layout
    from finetune_trainer.process_group import Ranks
    from finetune_trainer.sequence_parallel import Shards
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.support.factories import job

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = resolve_trainer_config(job({
        "spec.dataset.sources": [{"uri": "file:///unused.jsonl"}],
        "spec.dataset.maxSeqLength": seq,
        "spec.resources.gpusPerNode": 0,
        "spec.resources.processesPerNode": world,
        "spec.parallelism.sequence": degree,
        "spec.training.microBatchSize": 1,
        "spec.training.globalBatchSize": world // degree,
        "spec.training.precision": "fp32",
        "spec.training.gradientCheckpointing": False,
        "spec.training.attentionImplementation": "sdpa",
        "spec.deepspeed.zeroStage": 2,
    }))  # fmt: skip
    layout = Layout.of(config, Ranks(rank, rank, world, world, 0))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=HIDDEN * 8 // 3,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                    max_position_embeddings=seq, attn_implementation="sdpa", use_cache=False)
    )  # fmt: skip
    ds_config = deepspeed_config(config, cpu=True)
    mpu = sequence_parallel.register(config, model)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model.named_parameters(), 0.0),
        config=ds_config,
        mpu=mpu,
    )
    generator = torch.Generator().manual_seed(1)

    class Table(list[Example]):
        def targets(self, indices: list[int]) -> int:
            return sum(len(self[i].labels) - 1 for i in indices)

    table = Table(
        Example(id=str(i), input_ids=(ids := torch.randint(3, VOCAB, (seq,), generator=generator).tolist()),
                labels=ids)
        for i in range(layout.data_size)
    )  # fmt: skip
    objective = Supervised(config, layout, None, table, Shards.of(config, layout))
    everything = list(range(layout.data_size))

    def step() -> float:
        started = time.perf_counter()
        objective.step(engine, [[layout.data_rank]], table.targets(everything), layout.data_size)
        torch.distributed.barrier()
        return time.perf_counter() - started

    step()  # gradient partitions and optimizer states are allocated here, not by the sequence
    _release_free_memory()
    reset = _reset_peak()
    before, maxrss_before = _status("VmRSS"), _maxrss()
    seconds = step()
    peak = _status("VmHWM") if reset else _maxrss()
    step_peak = peak - before if reset else max(0, _maxrss() - maxrss_before)
    result = {"rank": rank, "step_peak": step_peak, "peak": peak, "seconds": seconds, "clear_refs": reset,
              "tokens": seq * layout.data_size}  # fmt: skip
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    engine.destroy()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _launch(worker: str, out: Path, *arguments: str) -> list[dict[str, Any]]:
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               f"--master-port={free_port()}", str(Path(__file__).resolve()), "--worker", worker,
               "--out", str(out), *arguments]  # fmt: skip
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "trainer_image"), str(REPO / "operator")]),
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{worker} {arguments} failed:\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def sequence_section(args: argparse.Namespace) -> None:
    rows, step_peaks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for degree in (1, 2):
            ranks = _launch(
                "sequence", Path(tmp) / f"sp{degree}", "--degree", str(degree), "--seq", str(args.seq)
            )
            step_peaks[degree] = max(r["step_peak"] for r in ranks)
            seconds = max(r["seconds"] for r in ranks)
            rows.append([
                f"SP {degree}" + (" (baseline)" if degree == 1 else ""),
                f"{args.seq // degree}",
                " / ".join(_mib(r["step_peak"]) for r in ranks),
                " / ".join(_mib(r["peak"]) for r in ranks),
                f"{1 / seconds:.3f}",
                f"{ranks[0]['tokens'] / seconds:.0f}",
            ])  # fmt: skip
        method = "clear_refs" if all(r["clear_refs"] for r in ranks) else "getrusage (no clear_refs)"
    print_table(
        f"Sequence parallelism: one training step at {args.seq} tokens a sequence, 2 CPU ranks, "
        f"{LAYERS}-layer {HIDDEN}-wide Llama, fp32, ZeRO-2",
        ["run", "tokens a rank holds", "step peak MiB, rank 0 / 1", "peak RSS MiB, rank 0 / 1", "steps/s",
         "tokens/s"],
        rows,
    )  # fmt: skip
    print(f"memory: {method}; step peak = VmHWM - VmRSS before the step, after one step of warm-up")
    print(f"ratio (step peak per rank, SP 2 / SP 1): {step_peaks[2] / step_peaks[1]:.3f}  (aim <= 0.6)")


def _script(name: str) -> Callable[[argparse.Namespace], None]:
    """A section that is a benchmark script of its own, run with its defaults."""

    def section(args: argparse.Namespace) -> None:
        subprocess.run([sys.executable, str(REPO / "benchmarks" / name)], check=True)

    return section


# Each part of the benchmark: its name, and the function that runs it and prints its table.
SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "sequence": sequence_section,
    "tensor": _script("tensor_parallel_memory.py"),
    "qlora": _script("qlora_memory.py"),
}
WORKERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "sequence": lambda a: sequence_worker(a.degree, a.seq, Path(a.out)),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=[*SECTIONS, "all"], default="all")
    parser.add_argument("--seq", type=int, default=8192, help="tokens a sequence (sequence section)")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--degree", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        WORKERS[args.worker](args)
        return
    for name, section in SECTIONS.items():
        if args.part in (name, "all"):
            section(args)


if __name__ == "__main__":
    main()
