"""The checkpoint commit protocol: the data that must never be lost or half-used.

    <job uri>/checkpoints/step-00000100/<files each node saved>
    <job uri>/checkpoints/step-00000100/nodes/node-00001.json   <- a node's report: its files, sizes, sha256
    <job uri>/checkpoints/step-00000100/MANIFEST.json           <- written last, by rank 0: the commit point
    <job uri>/checkpoints/step-00000100/universal/<files>       <- its conversion to DeepSpeed's universal
    <job uri>/checkpoints/step-00000100/universal/MANIFEST.json    format, for a resume at another world
                                                                   size (universal.py): a committed
                                                                   directory of its own, naming the
                                                                   sha256 of the manifest it converted

A checkpoint is a directory committed by its manifest (committed_dir.py, whose rules it follows).
Every node uploads what it saved, then its report. Rank 0 writes MANIFEST.json only once every
node's report is there, and only from them. No manifest, no checkpoint: resume takes the newest
manifest whose files are all present with the recorded sizes and (when downloaded) checksums, and
skips a torn one with a warning. Retention deletes only committed checkpoints older than the newest
`keep_last`, never the one a run resumed from, plus uncommitted leftovers older than the newest commit;
a checkpoint's universal conversion lives inside its directory, so it goes with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from finetune_trainer.committed_dir import MANIFEST, CommittedDir, FileEntry, TornDirectory
from finetune_trainer.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class NodeReport(BaseModel):
    node_rank: int
    files: list[FileEntry]
    # Which run wrote it: a step retrained after a resume reuses its directory, and a report left
    # there by the earlier run must not count as this run's upload being done.
    run_id: str = ""


class CheckpointManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    step: int
    nnodes: int
    world_size: int
    files: list[FileEntry]
    data_position: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class TornCheckpoint(TornDirectory):
    pass


CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"


def step_dir(step: int) -> str:
    """A checkpoint's address inside its job's store; `parse_checkpoint_uri` reads it back."""
    return f"{CHECKPOINTS}/{STEP_PREFIX}{step:08d}"


def _step_name(name: str) -> int | None:
    digits = name[len(STEP_PREFIX) :]
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


def parse_checkpoint_uri(uri: str) -> tuple[str, int] | None:
    """`<job uri>/checkpoints/step-NNNNNNNN` -> (job uri, step); None when `uri` is not one."""
    job, separator, name = uri.rstrip("/").rpartition(f"/{CHECKPOINTS}/")
    step = _step_name(name) if separator and job.rstrip("/").count("/") > 2 and "/" not in name else None
    return None if step is None else (job, step)


def _step_of(key: str) -> int | None:
    parts = key.split("/")
    return _step_name(parts[1]) if len(parts) >= 2 and parts[0] == CHECKPOINTS else None


class CheckpointStore:
    def __init__(self, store: ObjectStore, *, poll_seconds: float = 0.2) -> None:
        self.store = store
        self.poll_seconds = poll_seconds

    def _dir(self, step: int) -> CommittedDir:
        return CommittedDir(self.store, step_dir(step))

    # -- writing -----------------------------------------------------------------------------

    def upload_node(self, step: int, node_rank: int, local_dir: Path, run_id: str = "") -> NodeReport:
        """Upload every file this node saved for `step`, then its report (the node's 'done').
        A manifest left by an earlier run of the same step is removed first: from the first
        replaced file on, that old commit would describe files that are no longer its own."""
        directory = self._dir(step)
        directory.uncommit()
        report = NodeReport(node_rank=node_rank, files=directory.upload(local_dir), run_id=run_id)
        report_key = directory.key(f"nodes/node-{node_rank:05d}.json")
        self.store.put_bytes(report_key, report.model_dump_json().encode())
        return report

    def wait_for_nodes(self, step: int, nnodes: int, timeout: float, run_id: str = "") -> list[NodeReport]:
        """Rank 0 waits (bounded) until every node of this run reported its upload done."""
        deadline = time.monotonic() + timeout
        prefix = self._dir(step).key("nodes/")
        reports: dict[str, NodeReport] = {}
        while True:
            for key in [o.key for o in self.store.list(prefix)]:
                if key not in reports:
                    report = NodeReport.model_validate_json(self.store.get_bytes(key))
                    if report.run_id == run_id:
                        reports[key] = report
            if len(reports) >= nnodes:
                return [reports[k] for k in sorted(reports)]
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"step {step}: {len(reports)} of {nnodes} nodes finished uploading in {timeout:.0f}s"
                )
            time.sleep(self.poll_seconds)

    def commit(
        self, step: int, reports: list[NodeReport], *, world_size: int, data_position: dict[str, Any]
    ) -> CheckpointManifest:
        seen: dict[str, FileEntry] = {}
        for report in reports:
            for entry in report.files:
                if entry.path in seen and seen[entry.path] != entry:
                    raise TornCheckpoint(f"step {step}: two nodes saved different {entry.path}")
                seen[entry.path] = entry
        manifest = CheckpointManifest(
            step=step,
            nnodes=len(reports),
            world_size=world_size,
            files=sorted(seen.values(), key=lambda e: e.path),
            data_position=data_position,
            created_at=datetime.now(UTC),
        )
        self._dir(step).commit(manifest.model_dump_json(indent=1))
        return manifest

    # -- reading -----------------------------------------------------------------------------

    def committed_steps(self) -> list[int]:
        listed = self.store.list(f"{CHECKPOINTS}/")
        # Only a step's own manifest commits it; its universal conversion's (one level down) does not.
        steps = {_step_of(o.key) for o in listed if o.key.endswith(f"/{MANIFEST}") and o.key.count("/") == 2}
        return sorted(s for s in steps if s is not None)

    def manifest(self, step: int) -> CheckpointManifest:
        return CheckpointManifest.model_validate_json(self._dir(step).manifest())

    def resumable(self, warn: Callable[[str], None] = log.warning) -> list[CheckpointManifest]:
        """Committed checkpoints whose files are all present, newest first; torn ones are skipped."""
        out = []
        for step in reversed(self.committed_steps()):
            try:
                manifest = self.manifest(step)
            except (ObjectNotFound, ValueError) as exc:
                warn(f"skipping checkpoint step {step}: unreadable manifest ({type(exc).__name__})")
                continue
            problem = self._dir(step).problem(manifest.files)
            if problem:
                warn(f"skipping torn checkpoint step {step}: {problem}")
                continue
            out.append(manifest)
        return out

    def download(
        self, manifest: CheckpointManifest, dest: Path, wanted: Callable[[str], bool] | None = None
    ) -> int:
        """Fetch a checkpoint's files (those `wanted`, or all) and verify every checksum; the bytes
        fetched. TornCheckpoint if any file does not match."""
        text = manifest.model_dump_json(indent=1)
        try:
            return self._dir(manifest.step).download(manifest.files, dest, text, wanted)
        except TornDirectory as exc:
            raise TornCheckpoint(f"step {manifest.step}: {exc}") from None

    # -- retention ---------------------------------------------------------------------------

    def retain(self, keep_last: int, *, protect: int | None = None) -> list[int]:
        """Delete committed checkpoints older than the newest `keep_last` (never `protect`), and
        uncommitted leftovers older than the newest commit. Newer uncommitted steps may be uploads
        in flight, so they are left alone. The manifest goes first: a half-deleted checkpoint is
        then merely uncommitted, never a torn committed one."""
        committed = self.committed_steps()
        if not committed:
            return []
        doomed = set(committed[:-keep_last]) if keep_last < len(committed) else set()
        if protect is not None:
            doomed.discard(protect)
        objects = self.store.list(f"{CHECKPOINTS}/")
        all_steps = {s for s in (_step_of(o.key) for o in objects) if s is not None}
        leftovers = {s for s in all_steps - set(committed) if s < committed[-1]}
        for step in sorted(doomed | leftovers):
            keys = [o.key for o in objects if _step_of(o.key) == step]
            manifest_key = self._dir(step).manifest_key
            if manifest_key in keys:
                self.store.delete([manifest_key])
            self.store.delete([k for k in keys if k != manifest_key])
        return sorted(doomed)
