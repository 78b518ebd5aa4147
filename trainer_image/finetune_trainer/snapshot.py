"""The checkpoint's blocking part is a copy of the state to host memory; the write happens behind.

DeepSpeed 0.19 writes a checkpoint through a pluggable checkpoint engine (`engine.checkpoint_engine`:
`create`, `save(state_dict, path)` per file, `commit`). Its own engines either write synchronously
(TorchCheckpointEngine: the whole local save blocks training), need DeepNVMe's async I/O op built
for the GPU (FastCheckpointEngine), or hand each state dict to a spawned writer process through a
pipe (DecoupledCheckpointEngine: the pickling and the transfer still block the rank, CUDA tensors are
shared with the writer while training goes on changing them, and its commit waits for the writer).
None of them stops at "the state is safe in host memory". `SnapshotEngine` does exactly that: its
`save` copies every tensor of the state dict to host memory (a device-to-host copy on GPUs, a clone
on CPU) and keeps the copy with its path; `take()` hands the copies to the checkpointer's background
writer, which `torch.save`s them to the same paths DeepSpeed would have written. Loading is
DeepSpeed's own (`TorchCheckpointEngine.load`), so the files are the ones it always reads.

`FTJOB_TEST_CHECKPOINT_PAUSE=<stage>:<seconds>` (stage: snapshot, write or upload) holds every
checkpoint that long inside the stage, announcing it in the log: the recovery tests kill a rank
exactly there. Off unless set.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from finetune_trainer.checkpoint_store import step_dir

log = logging.getLogger(__name__)

ENV_TEST_PAUSE = "FTJOB_TEST_CHECKPOINT_PAUSE"


def test_pause(stage: str, step: int) -> None:
    setting = os.environ.get(ENV_TEST_PAUSE, "")
    wanted, _, seconds = setting.partition(":")
    if wanted == stage and seconds:
        log.warning("checkpoint step %d: paused %ss in %s (%s)", step, seconds, stage, ENV_TEST_PAUSE)
        time.sleep(float(seconds))


def to_host(value: Any) -> Any:
    """A copy of a state dict that training can no longer change: tensors copied to host memory,
    containers rebuilt, everything else deep-copied (plain numbers, strings, configs)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps OrderedDict and friends
        for key, item in value.items():
            out[key] = to_host(item)
        return out
    if isinstance(value, list):
        return [to_host(item) for item in value]
    if isinstance(value, tuple):
        items = [to_host(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, str | int | float | bool | bytes | type(None)):
        return value
    return copy.deepcopy(value)


def write(path: str, state: Any) -> None:
    """`torch.save` to a temporary name, then rename: a killed writer leaves no file that looks done."""
    import torch

    partial = f"{path}.partial"
    torch.save(state, partial)
    os.replace(partial, path)


class SnapshotEngine(TorchCheckpointEngine):  # type: ignore[misc]
    """DeepSpeed's checkpoint engine whose `save` only snapshots; the files are written by `write`."""

    def __init__(self) -> None:
        super().__init__(None)
        self.name = "SnapshotEngine"
        self.step = 0
        self._taken: list[tuple[str, Any]] = []

    def save(self, state_dict: Any, path: str) -> None:
        if not self._taken:
            test_pause("snapshot", self.step)
        self._taken.append((path, to_host(state_dict)))

    def commit(self, info: Any) -> bool:
        return True

    def take(self) -> list[tuple[str, Any]]:
        """The snapshots of the last `save_checkpoint`, handed over (at most one set is ever held)."""
        taken, self._taken = self._taken, []
        return taken

    def bytes_held(self) -> int:
        import torch

        def size(value: Any) -> int:
            if isinstance(value, torch.Tensor):
                return value.numel() * value.element_size()
            if isinstance(value, dict):
                return sum(size(v) for v in value.values())
            if isinstance(value, list | tuple):
                return sum(size(v) for v in value)
            return 0

        return sum(size(state) for _, state in self._taken)


def tag(step: int) -> str:
    """The directory DeepSpeed saves and loads a step under, on the node's disk: the name it has in
    the store."""
    return step_dir(step).rsplit("/", 1)[-1]


def written_marker(root: Path, step: int, rank: int) -> Path:
    """Where a rank records that its files of `step` are on the node's disk (outside the step's
    directory, so the node's upload never carries it)."""
    return root / ".written" / f"step-{step:08d}" / f"rank-{rank:05d}"
