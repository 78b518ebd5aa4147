"""Resuming at another world size: a committed checkpoint converted once to DeepSpeed's universal
checkpoint format, committed next to it, and loaded with `load_universal`.

ZeRO partitions the optimizer state (and the fp32 master weights) by data-parallel rank, and DeepSpeed
0.19 refuses to load such a checkpoint at another data-parallel world size ("Automatic adjustment of
ZeRO's optimizer state partitioning with a new world size is not currently supported"). Its own
answer is the universal checkpoint: `deepspeed.checkpoint.ds_to_universal` merges every rank's
fragments into one file per parameter and state, and an engine whose config says
`checkpoint.load_universal` slices them for its own partitioning. We call DeepSpeed's converter
(its `main`), not a converter of our own.

Once per checkpoint: rank 0 (node 0's local rank 0) looks for a committed conversion of the very
checkpoint it resumes (the conversion's manifest names the sha256 of the checkpoint's manifest, so a
step retrained and committed again is converted again); without one it downloads the checkpoint to
its scratch disk, converts it there and commits the result under
`checkpoints/step-NNNNNNNN/universal/` (checkpoint_store.py's layout, committed_dir.py's rules:
its MANIFEST.json written last). The other ranks wait on the rendezvous store meanwhile. Then every
node fetches the committed conversion (node 0 keeps its own copy) and all ranks load it. A
conversion killed half-way has no manifest and is redone; one whose files do not match is skipped
like a torn checkpoint. Later attempts at the same new world size find it committed and reuse it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from finetune_trainer import sequence_parallel, tensor_parallel
from finetune_trainer.checkpoint_store import CheckpointManifest, CheckpointStore, TornCheckpoint, step_dir
from finetune_trainer.committed_dir import CommittedDir, FileEntry, TornDirectory
from finetune_trainer.coordination import Coordinator
from finetune_trainer.failures import InvalidInput
from finetune_trainer.process_group import Ranks
from finetune_trainer.snapshot import tag
from finetune_trainer.storage import ObjectNotFound

log = logging.getLogger(__name__)

UNIVERSAL = "universal"
FORMAT_VERSION = 1
# The files DeepSpeed partitions by data-parallel rank: a checkpoint without them (ZeRO off, fp32)
# holds the whole optimizer state in mp_rank_00_model_states.pt and loads at any world size.
ZERO_OPTIMIZER_SHARD = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$")


class WorldSizeChangeRefused(InvalidInput):
    """The world size changed, but the checkpoint cannot continue at it as configured: exit 2."""


class UniversalManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    step: int
    source_world_size: int
    source_manifest_sha256: str  # the checkpoint manifest converted: a re-committed step is not it
    files: list[FileEntry]
    convert_seconds: float
    created_at: datetime


def universal_dir(step: int) -> str:
    return f"{step_dir(step)}/{UNIVERSAL}"


def manifest_sha256(manifest: CheckpointManifest) -> str:
    return hashlib.sha256(manifest.model_dump_json(indent=1).encode()).hexdigest()


def needs_conversion(manifest: CheckpointManifest, world_size: int) -> bool:
    sharded = any(ZERO_OPTIMIZER_SHARD.search(f.path) for f in manifest.files)
    return sharded and manifest.world_size != world_size


def convert(source: Path, output: Path) -> None:
    """DeepSpeed's own converter, in this process (one worker: no process pool inside a rank).
    `inject_missing_state`: a Hugging Face model carries no Megatron universal-checkpoint info,
    which the converter otherwise requires; DeepSpeed's docs name this flag for exactly that."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(output, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(source), output_folder=str(output), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    ds_to_universal.main(args)
    (output.parent / "latest_universal").unlink(missing_ok=True)  # it writes one; we load by tag


def check_global_batch(checkpoint: CheckpointManifest, global_batch: int) -> None:
    """A resume at another world size keeps the global batch: the checkpoint's data position and
    learning-rate schedule count steps of it. The API server refuses a world-size change without
    training.globalBatchSize; this catches what it cannot see (a local run, an edited config)."""
    position = checkpoint.data_position
    steps, seen = int(position.get("globalStep", 0)), int(position.get("samplesSeen", 0))
    if steps and seen != steps * global_batch:
        raise WorldSizeChangeRefused(
            f"checkpoint step {checkpoint.step} was trained with a global batch of {seen // steps} "
            f"at world size {checkpoint.world_size}; this run's is {global_batch}: set "
            f"training.globalBatchSize to {seen // steps} (a multiple of microBatchSize x world size)"
        )


@contextlib.contextmanager
def universal_loading(engine: Any, on: bool) -> Iterator[None]:
    """`checkpoint.load_universal` for this one load: DeepSpeed reads the flag at load time, and
    saves (which never write the universal format) must not see it."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = on or before
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


@dataclass(frozen=True)
class Reshaped:
    """A checkpoint to load through its committed universal conversion ("" problem), or why not."""

    step: int
    manifest: UniversalManifest | None
    problem: str


class Reshaper:
    def __init__(
        self, engine: Any, store: CheckpointStore, ranks: Ranks, phases: Coordinator, scratch: Path
    ) -> None:
        self.engine = engine
        self.store = store  # the job's own: conversions are written here, also of a warm start's
        self.ranks = ranks
        self.phases = phases
        self.scratch = scratch / UNIVERSAL

    def _dir(self, step: int) -> CommittedDir:
        return CommittedDir(self.store.store, universal_dir(step))

    def prepare(self, source: CheckpointStore, step: int) -> Reshaped | None:
        """On every rank: None when `step` loads as saved; else its committed conversion (made now
        by rank 0 if there is none yet), or the problem that skips the checkpoint."""
        what = f"the universal checkpoint of step {step}"
        return self.phases.on_main(what, lambda: self._on_main(source, step))

    def _on_main(self, source: CheckpointStore, step: int) -> Reshaped | None:
        checkpoint = source.manifest(step)
        degree = tensor_parallel.degree_of(self.engine)
        paths = [f.path for f in checkpoint.files]
        tensor_parallel.check_resume(step, paths, checkpoint.world_size, degree, self.ranks.world_size)
        if checkpoint.world_size != self.ranks.world_size:
            check_global_batch(checkpoint, self.engine.train_batch_size())
        if not needs_conversion(checkpoint, self.ranks.world_size):
            return None
        sequence_parallel.refuse_conversion(self.engine, step, checkpoint.world_size, self.ranks.world_size)
        wanted = manifest_sha256(checkpoint)
        existing = self.committed(step, wanted)
        if existing is not None:
            log.info("step %d: reusing its committed universal checkpoint", step)
            return Reshaped(step, existing, "")
        try:
            manifest = self._convert(source, checkpoint, wanted)
        except TornCheckpoint as exc:
            log.warning("skipping checkpoint step %d: %s", step, exc)
            return Reshaped(step, None, str(exc))
        return Reshaped(step, manifest, "")

    def committed(self, step: int, source_sha256: str) -> UniversalManifest | None:
        """The committed conversion of exactly this checkpoint with all its files listed; None
        when there is none (never made, killed half-way, stale, or torn)."""
        directory = self._dir(step)
        try:
            manifest = UniversalManifest.model_validate_json(directory.manifest())
        except ObjectNotFound:
            return None
        except ValueError as exc:
            log.warning("step %d: unreadable universal manifest (%s); converting again", step, exc)
            return None
        if manifest.source_manifest_sha256 != source_sha256:
            log.info("step %d: its universal checkpoint is of an earlier commit; converting again", step)
            return None
        problem = directory.problem(manifest.files)
        if problem:
            log.warning("step %d: torn universal checkpoint (%s); converting again", step, problem)
            return None
        return manifest

    def _convert(
        self, source: CheckpointStore, checkpoint: CheckpointManifest, sha: str
    ) -> UniversalManifest:
        step = checkpoint.step
        started = time.perf_counter()
        original, output = self.scratch / "source" / tag(step), self.scratch / tag(step)
        shutil.rmtree(original, ignore_errors=True)
        source.download(checkpoint, original)  # every rank's files: TornCheckpoint if one is off
        convert(original, output)
        shutil.rmtree(original, ignore_errors=True)
        seconds = time.perf_counter() - started
        directory = self._dir(step)
        directory.uncommit()  # a stale or torn one's manifest goes before any of its files change
        files = directory.upload(output)
        manifest = UniversalManifest(
            step=step, source_world_size=checkpoint.world_size, source_manifest_sha256=sha, files=files,
            convert_seconds=round(seconds, 3), created_at=datetime.now(UTC),
        )  # fmt: skip
        directory.commit(manifest.model_dump_json(indent=1), local_copy=output)
        log.info(
            "step %d: converted to a universal checkpoint (world size %d -> %d) in %.2fs, committed",
            step, checkpoint.world_size, self.ranks.world_size, seconds,
        )  # fmt: skip
        return manifest

    def download(self, reshaped: Reshaped, target: Path) -> tuple[str, int, int]:
        """On each node's local rank 0: the committed conversion into `target/<tag>`, verified;
        (problem, bytes fetched, bytes in all), as resuming's. It joins the node's copy of the step
        (resuming.keep_for_restart) rather than replacing it: the two share only
        mp_rank_00_model_states.pt, which the converter copies unchanged, and each load reads only
        its own files (universal: zero/<param>/; otherwise the zero_pp_rank_* shards). Files already
        there with the manifest's checksum are kept (an in-place restart, and node 0's conversion)."""
        from finetune_trainer.resuming import keep_only  # resuming imports this module

        manifest = reshaped.manifest
        assert manifest is not None
        dest = target / tag(reshaped.step)
        keep_only(target, tag(reshaped.step))
        converted = self.scratch / tag(reshaped.step)
        if converted.is_dir():  # node 0's own conversion: moved, not fetched again
            shutil.copytree(converted, dest, dirs_exist_ok=True)
            shutil.rmtree(converted, ignore_errors=True)
        total, text = sum(f.size for f in manifest.files), manifest.model_dump_json(indent=1)
        try:  # its MANIFEST.json replaces the checkpoint's there: a marker nothing reads back
            fetched = self._dir(reshaped.step).download(manifest.files, dest, text)
        except TornDirectory as exc:
            log.warning("skipping checkpoint step %d: its universal checkpoint: %s", reshaped.step, exc)
            return str(exc), 0, total
        return "", fetched, total
