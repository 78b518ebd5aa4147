"""The GPU check: a ~1B-parameter Llama (random init) trained through the real trainer entrypoint
(`finetune_trainer.launch` -> `python -m finetune_trainer`, as a rank pod runs it) on one GPU in bf16
with ZeRO-2, packing and sdpa (flash_attention_2 when the machine has flash-attn) at a 4096-token
window, then a short fp16 run with DeepSpeed's dynamic loss scaling. Prints tokens/s/GPU, MFU (6N plus
the attention term 12 x layers x hidden x window per token, against the chip's dense bf16 peak) and
the device's peak memory in use. Then a QLoRA run of the same model (its base in 4-bit NF4,
bitsandbytes, rank-16 adapters in bf16). Then a sequence-parallel run (`parallelism.sequence`, Ulysses) of the
same model over 2 or 4 GPUs (as many as the machine has, heads permitting) at a 32768-token sequence,
unpacked under sdpa (packed under flash_attention_2), with gradient checkpointing: its tokens/s per
GPU, MFU and the largest peak memory of its GPUs. One GPU cannot hold two ranks (NCCL refuses a
duplicate device), so on a one-GPU machine that run is reported as skipped.

On a GPU machine without network whose python3 lacks DeepSpeed, pydantic, boto3 and kopf (prepared
here by `make gpu-wheels`):

    python3 tools/gpu_check.py --wheels gpu-wheels

`--cpu` runs the same path end to end on CPU with a tiny model in fp32 (DeepSpeed's fp16 needs a GPU),
the sequence-parallel run on 2 CPU ranks at 512 tokens, which is what tests/integration/test_gpu_check.py
does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SOURCES = [REPO / "operator", REPO / "trainer_image"]
# Dense bf16 peaks (no sparsity), from NVIDIA's datasheets.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}
ONE_B = {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32000}
TINY = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128}


def install(wheels: Path) -> None:
    """Install what the machine lacks from the prepared wheels, never replacing its torch."""
    missing = [
        m
        for m in ("deepspeed", "pydantic", "boto3", "kopf", "tensorboard")
        if not importlib.util.find_spec(m)
    ]
    if not missing:
        return
    env = {**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_CONSTRAINT": ""}
    base = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels)]
    print(f"installing {', '.join(missing)} from {wheels}", flush=True)
    subprocess.run([*base, *missing], check=True, env=env)


def write_model(dest: Path, shape: dict[str, int], gpu: bool) -> int:
    """A randomly initialised Llama of `shape` with the tiny word-level tokenizer; its parameter count."""
    import torch
    from finetune_trainer.tiny import NUMBER_WORDS, VERBS, tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer([" ".join(VERBS) + " after :", " ".join(NUMBER_WORDS)])
    config = LlamaConfig(
        vocab_size=max(shape["vocab"], len(tokenizer)), hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=32768, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if gpu else torch.float32)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return sum(p.numel() for p in model.parameters())


def write_long_data(path: Path, records: int, window: int) -> None:
    """Text records of a whole window each (truncated to it): one sequence per example, unpacked."""
    from finetune_trainer.tiny import NUMBER_WORDS

    rng = random.Random(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(records):
            f.write(json.dumps({"text": " ".join(rng.choices(NUMBER_WORDS, k=window))}) + "\n")


def write_data(path: Path, records: int, window: int) -> None:
    """Text records from 32 tokens to a whole window, log-uniform: what packing is for."""
    from finetune_trainer.tiny import NUMBER_WORDS

    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(records):
            length = int(2 ** rng.uniform(5, max(5.0, (window - 2).bit_length() - 1)))
            f.write(json.dumps({"text": " ".join(rng.choices(NUMBER_WORDS, k=length))}) + "\n")


def manifest(root: Path, name: str, *, precision: str, window: int, steps: int, attention: str, gpu: bool,
             torch_adam: bool, sequence: int = 1, data: str = "train.jsonl", quantization: str | None = None
             ) -> dict[str, Any]:  # fmt: skip
    """One GPU (or CPU rank) per process; `sequence` processes sharing each sequence (Ulysses), unpacked
    unless flash_attention_2 keeps packed documents apart; `quantization` a QLoRA run on that 4-bit base."""
    spec: dict[str, Any] = {
        "model": {"source": f"file://{root / 'model'}"},
        "dataset": {
            "sources": [{"uri": f"file://{root / 'data' / data}", "shape": "text"}],
            "maxSeqLength": window,
            "packing": sequence == 1 or attention == "flash_attention_2",
            "validationFraction": 0.0,
        },
        "parallelism": {"sequence": sequence},
        "training": {
            "maxSteps": steps,
            "microBatchSize": 1,
            "globalBatchSize": 4 if sequence == 1 else 2,
            "learningRate": 1e-4,
            "warmupSteps": 2,
            "precision": precision,
            "gradientCheckpointing": True,
            "logEverySteps": 2,
            "attentionImplementation": attention,
        },
        "deepspeed": {"zeroStage": 2},
        "resources": {"gpusPerNode": sequence if gpu else 0, "processesPerNode": sequence},
        "checkpoint": {"uri": f"file://{root / 'store'}", "everySteps": 10 * steps, "keepLast": 1},
    }
    if quantization:
        spec["training"] |= {"method": "lora", "lora": {"rank": 16, "quantization": quantization},
                             "learningRate": 2e-4}  # fmt: skip
    if torch_adam:  # no CUDA toolkit to JIT-build DeepSpeed's fused Adam: PyTorch's fused AdamW
        spec["deepspeed"]["override"] = {"optimizer": {"params": {"torch_adam": True, "adam_w_mode": True}}}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "check"}, "spec": spec}  # fmt: skip


class MemoryPoll:
    """The device's memory in use, polled from nvidia-smi (the trainer runs in its own processes)."""

    def __init__(self, gpu: bool) -> None:
        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = (
            threading.Thread(target=self._run, daemon=True) if gpu and shutil.which("nvidia-smi") else None
        )
        if self._thread:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True)  # fmt: skip
            if out.returncode == 0 and out.stdout.strip():  # one line per GPU: the fullest counts
                self.peak_mib = max(self.peak_mib, *map(int, out.stdout.split()))

    def stop(self) -> str:
        self._stop.set()
        return f"{self.peak_mib / 1024:.1f} GiB" if self._thread else "n/a (no GPU)"


def train(root: Path, name: str, document: dict[str, Any], gpu: bool, processes: int = 1
          ) -> tuple[int, str, float]:  # fmt: skip
    from finetune_operator.api import parse_manifest, resolve_trainer_config

    config = resolve_trainer_config(parse_manifest(document))
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*map(str, SOURCES), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "FTJOB_SCRATCH_DIR": str(work / "scratch"),
        "FTJOB_TERMINATION_LOG": str(work / "termination.log"),
    }
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
        if processes > 1:  # the ranks share the cores
            env.setdefault("OMP_NUM_THREADS", "1")
    command = [
        sys.executable, "-m", "finetune_trainer.launch", "--nnodes=1", f"--nproc-per-node={processes}",
        "--node-rank=0",
        "--master-addr=127.0.0.1", f"--master-port={port}", "--max-restarts=0",
        "-m", "finetune_trainer", "--config", str(work / "config.json"),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    (work / "output.log").write_text(done.stdout + done.stderr)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def report(label: str, code: int, output: str, seconds: float, peak: str, params: int, shape: dict[str, int],
           seq: int, steps: int, device: str, gpus: int) -> bool:  # fmt: skip
    """One run's line: tokens/s per GPU (the trainer counts a sequence-parallel group's tokens once),
    MFU, peak memory (the fullest GPU), the loss; False, with the output's tail, when it failed."""
    from finetune_operator.progress import parse_all

    if code != 0:
        print(output[-4000:])
        print(f"FAILED: the {label} run exited {code}")
        return False
    progress = [r.progress for r in parse_all(output)]
    rates = [p.tokens_per_second for p in progress if p.tokens_per_second and (p.step or 0) > 2]
    losses = [f"{p.loss:.3f}" for p in progress if p.loss is not None] or ["n/a"]
    tokens_per_second = sum(rates) / len(rates) / gpus if rates else float("nan")
    flops_per_token = 6 * params + 12 * shape["layers"] * shape["hidden"] * seq
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in device), None)
    mfu = f"{tokens_per_second * flops_per_token / peak_flops:.1%}" if peak_flops else "n/a"
    overflows = output.count("OVERFLOW!")
    print(
        f"{label} run: {steps} steps in {seconds:.0f}s | "
        f"tokens/s/GPU {tokens_per_second:,.0f} | MFU {mfu} | peak memory {peak} | "
        f"loss {losses[0]} -> {losses[-1]} | skipped steps (overflow) {overflows}",
        flush=True,
    )
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="a tiny model on CPU, end to end")
    parser.add_argument("--wheels", type=Path, help="install missing packages from these wheels first")
    parser.add_argument("--window", type=int, default=None, help="tokens per sequence (4096 on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="bf16 steps (24 on GPU)")
    parser.add_argument("--sp-window", type=int, default=None,
                        help="tokens per sequence of the sequence-parallel run (32768 on GPU)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.wheels:
        install(args.wheels)
    sys.path[:0] = [str(p) for p in SOURCES]
    import torch

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu for the CPU rehearsal")
    shape = ONE_B if gpu else TINY
    window = args.window or (4096 if gpu else 256)
    steps = args.steps or (24 if gpu else 6)
    flash = gpu and importlib.util.find_spec("flash_attn") is not None
    attention = "flash_attention_2" if flash else "sdpa"
    torch_adam = gpu and not (shutil.which("nvcc") or os.environ.get("CUDA_HOME"))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    started = time.monotonic()
    params = write_model(root / "model", shape, gpu)
    write_data(root / "data" / "train.jsonl", records=2000 if gpu else 300, window=window)
    device = torch.cuda.get_device_name(0) if gpu else "CPU"
    print(f"{device}: {params / 1e9:.2f}B-parameter Llama, window {window}, {attention}, ZeRO-2, packing"
          f"{', PyTorch AdamW (no nvcc for fused Adam)' if torch_adam else ''}; model written in "
          f"{time.monotonic() - started:.0f}s", flush=True)  # fmt: skip

    runs = [
        ("bf16" if gpu else "fp32", window, steps),
        ("fp16" if gpu else "fp32", window // 2, max(steps // 3, 4)),
    ]
    for index, (precision, seq, count) in enumerate(runs):
        memory = MemoryPoll(gpu)
        document = manifest(
            root, f"gpu-check-{index}-{precision}", precision=precision, window=seq, steps=count,
            attention=attention, gpu=gpu, torch_adam=torch_adam,
        )  # fmt: skip
        code, output, seconds = train(root, f"run-{index}-{precision}", document, gpu)
        label = "fp16 (loss scaling)" if index else precision
        if not report(label, code, output, seconds, memory.stop(), params, shape, seq, count, device, 1):
            return 1

    # QLoRA: the same model's base in 4 bits (NF4, double quantisation), the adapters trained in the
    # run's precision; bitsandbytes' CUDA kernels on a GPU, its CPU ones in the rehearsal.
    precision = "bf16" if gpu else "fp32"
    memory = MemoryPoll(gpu)
    document = manifest(
        root, "gpu-check-qlora", precision=precision, window=window, steps=max(steps // 2, 4),
        attention=attention, gpu=gpu, torch_adam=torch_adam, quantization="nf4",
    )  # fmt: skip
    code, output, seconds = train(root, "run-qlora", document, gpu)
    if not report(f"QLoRA nf4 ({precision}, rank 16)", code, output, seconds, memory.stop(), params, shape,
                  window, max(steps // 2, 4), device, 1):  # fmt: skip
        return 1

    # Sequence parallelism: as many GPUs as the machine has, up to 4, that divide the heads.
    gpus = torch.cuda.device_count() if gpu else 2
    degree = max((d for d in (2, 4) if d <= gpus and shape["heads"] % d == shape["kv_heads"] % d == 0),
                 default=1)  # fmt: skip
    sp_window = args.sp_window or (32768 if gpu else 512)
    if degree == 1:
        print(f"sequence parallel run: skipped ({gpus} GPU: two ranks cannot share one)", flush=True)
    else:
        sp_steps = 6 if gpu else 4
        write_long_data(root / "data" / "long.jsonl", records=2 * sp_steps, window=sp_window)
        precision = "bf16" if gpu else "fp32"
        memory = MemoryPoll(gpu)
        document = manifest(
            root, "gpu-check-sequence", precision=precision, window=sp_window, steps=sp_steps,
            attention=attention, gpu=gpu, torch_adam=torch_adam, sequence=degree, data="long.jsonl",
        )  # fmt: skip
        code, output, seconds = train(root, "run-sequence", document, gpu, processes=degree)
        packing = "packed" if attention == "flash_attention_2" else "unpacked"
        label = f"sequence parallel {degree} ({precision}, {sp_window} tokens, {attention}, {packing})"
        if not report(label, code, output, seconds, memory.stop(), params, shape, sp_window, sp_steps, device,
                      degree):  # fmt: skip
            return 1
    print(f"gpu check done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
