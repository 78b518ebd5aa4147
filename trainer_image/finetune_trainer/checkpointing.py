"""Saving the DeepSpeed engine through the checkpoint store, without stalling training.

Save: training blocks only while every rank snapshots its DeepSpeed state to host memory (DeepSpeed's
save_checkpoint through `snapshot.SnapshotEngine`). Behind training, each rank writes its snapshot
to the node's scratch disk and marks it written; the node's local rank 0 waits for its node's marks,
uploads the node's files, and on rank 0 then waits for every node's report, commits MANIFEST.json
and applies keepLast. A new save first waits for all of that (on the rendezvous store, not in a
collective), so at most one snapshot is held in host memory, local disk holds at most two
checkpoints in flight, and commits happen in step order. A node's uploaded files then stay on its
disk as its copy of the newest checkpoint (resuming.keep_for_restart): an in-place restart reloads
them from there, checked against the committed manifest, instead of downloading them.

Resume (resuming.py) loads through the same engine, so DeepSpeed reads the files it always reads.
What a save does to training (how long it blocked, what was committed) goes to one
`CheckpointListener`, on rank 0 the reporter.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from finetune_trainer import process_group
from finetune_trainer.checkpoint_store import CheckpointStore, step_dir
from finetune_trainer.coordination import Coordinator
from finetune_trainer.model import rebuilt_at_load
from finetune_trainer.position import DataPosition
from finetune_trainer.process_group import Ranks
from finetune_trainer.resuming import Resumer, keep_for_restart
from finetune_trainer.snapshot import SnapshotEngine, tag, test_pause, write, written_marker

log = logging.getLogger(__name__)

NODE_REPORT_TIMEOUT = 1800.0  # seconds rank 0 waits for the slowest node's upload


class CheckpointListener(Protocol):
    """What training learns about its checkpoints. `stalled` runs on the training thread after each
    save; `committed` and then `settled` on rank 0's upload thread, after the commit point and after
    keepLast, in step order."""

    def stalled(self, seconds: float) -> None: ...

    def committed(self, step: int, uri: str, at: datetime, seconds: float | None = None) -> None: ...

    def settled(self, step: int) -> None: ...


class NoListener:
    def stalled(self, seconds: float) -> None:
        pass

    def committed(self, step: int, uri: str, at: datetime, seconds: float | None = None) -> None:
        pass

    def settled(self, step: int) -> None:
        pass


class Checkpointer:
    def __init__(
        self,
        engine: Any,
        store: CheckpointStore,
        ranks: Ranks,
        *,
        nnodes: int,
        local_root: Path,
        job_uri: str,
        keep_last: int,
        phases: Coordinator,
    ) -> None:
        self.engine = engine
        self.store = store
        self.ranks = ranks
        self.nnodes = nnodes
        self.local_root = local_root
        self.job_uri = job_uri
        self.keep_last = keep_last
        self.phases = phases
        self.listener: CheckpointListener = NoListener()
        self.resumed_from: int | None = None
        self.run_id: str = process_group.broadcast(uuid.uuid4().hex if ranks.is_main else None)
        self.last_saved: int | None = None
        # Rank 0's figures for the emergency checkpoint's plan (grace.py): the newest commit, how long
        # its save took from start to commit, and when the save in flight (if any) started.
        self.last_committed: int | None = None
        self.last_save_seconds: float | None = None
        self._save_started: float | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # DeepSpeed's writes go through this engine, which only snapshots (snapshot.py).
        self.snapshots = SnapshotEngine()
        engine.checkpoint_engine = self.snapshots

    def report_to(self, listener: CheckpointListener) -> None:
        """The reporter exists only once the run has resumed (its clock starts with training), so it
        is told about saves from then on; resuming reports nothing."""
        self.listener = listener

    def resume(self, resume: str, open_elsewhere: Callable[[str], CheckpointStore]) -> DataPosition | None:
        """Load the newest intact committed checkpoint; its data position, or None to start fresh."""
        loaded = Resumer(self.engine, self.store, self.ranks, self.phases, self.local_root).load(
            resume, open_elsewhere
        )
        if loaded is None:
            return None
        if loaded.own:
            # keepLast spares it until this run commits a newer one, and the run does not save it again.
            self.resumed_from = self.last_saved = self.last_committed = loaded.step
        return loaded.position

    def save(self, step: int, position: DataPosition, *, block: bool) -> None:
        """Training blocks for the previous checkpoint's tail (at most one snapshot is ever held) and
        for the snapshot to host memory; the write, the upload and the commit run behind it."""
        started = time.perf_counter()
        self._wait_for_background(f"the checkpoint of step {self.last_saved}")
        waited = time.perf_counter() - started
        # This save's own time starts here: the previous one's tail is that one's.
        own_start = self._save_started = started + waited
        local = self.local_root / tag(step)
        if self.ranks.is_node_main:
            # Leftovers of the same step from a killed attempt must not be uploaded as this run's, nor
            # its ranks' "written" marks taken for ours. DeepSpeed's first barrier orders this before
            # any rank of this run writes.
            shutil.rmtree(local, ignore_errors=True)
            shutil.rmtree(written_marker(self.local_root, step, 0).parent, ignore_errors=True)
        self.local_root.mkdir(parents=True, exist_ok=True)
        self.snapshots.step = step
        stored = position.to_json()  # the same JSON in DeepSpeed's client state and in the manifest
        self.engine.save_checkpoint(
            str(self.local_root), tag=tag(step), client_state={"data_position": stored}, save_latest=False,
            exclude_frozen_parameters=rebuilt_at_load(self.engine.module),
        )  # fmt: skip
        snapshots = self.snapshots.take()
        snapshotted = time.perf_counter() - started - waited
        self.last_saved = step
        self._thread = threading.Thread(
            target=self._background,
            args=(step, stored, snapshots, own_start),
            name=f"checkpoint-{step}",
            daemon=True,
        )
        self._thread.start()
        if block:
            self._wait_for_background(f"the write, upload and commit of step {step}")
        if self.ranks.is_main:
            blocked = time.perf_counter() - started
            self.listener.stalled(blocked)
            log.info(
                "checkpoint step %d: training blocked %.3fs (previous checkpoint %.3fs, snapshot %.3fs)%s",
                step, blocked, waited, snapshotted, " until committed" if block else "",
            )  # fmt: skip

    def save_last(self, step: int, position: DataPosition) -> None:
        """The run's last checkpoint, waited for until committed; not taken again when the run
        resumed from a checkpoint of that step."""
        if self.last_saved != step:
            self.save(step, position, block=True)
        self.wait()

    def _wait_for_background(self, what: str) -> None:
        """Each rank's own write first; then every node's upload (and rank 0's commit), awaited on the
        rendezvous store: an upload may outlast any collective timeout."""
        if not self.ranks.is_node_main:
            self.wait()
        self.phases.per_node(what, self.wait)

    def _background(
        self, step: int, position: dict[str, Any], snapshots: list[tuple[str, Any]], began: float
    ) -> None:
        marker = written_marker(self.local_root, step, self.ranks.local_rank)
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            started = time.perf_counter()
            test_pause("write", step)
            for path, state in snapshots:
                write(path, state)
            snapshots.clear()  # the host copy goes as soon as it is on disk
            marker.write_text("")
            if self.ranks.is_main:
                log.info("checkpoint step %d: local write %.3fs", step, time.perf_counter() - started)
        except BaseException as exc:
            marker.write_text(f"rank {self.ranks.rank}: {type(exc).__name__}: {exc}"[:500] or "failed")
            self._error = exc
            return
        if self.ranks.is_node_main:
            try:
                self._wait_for_local_writes(step)
                test_pause("upload", step)
                self._upload(step, position, began)
            except BaseException as exc:
                self._error = exc

    def _wait_for_local_writes(self, step: int) -> None:
        """The node uploads once every local rank's files are on disk (their marks, read from disk)."""
        deadline = time.monotonic() + self.phases.deadline
        marks = [written_marker(self.local_root, step, r) for r in range(self.ranks.local_world_size)]
        while not all(m.exists() for m in marks):
            if time.monotonic() > deadline:
                raise TimeoutError(f"step {step}: the node's ranks did not finish writing in time")
            time.sleep(0.02)
        failed = [text for m in marks if (text := m.read_text())]
        if failed:
            raise RuntimeError(f"checkpoint step {step}: a rank could not write its files: {failed[0]}")

    def _upload(self, step: int, position: dict[str, Any], began: float) -> None:
        local = self.local_root / tag(step)
        self.store.upload_node(step, self.ranks.node_rank, local, self.run_id)
        keep_for_restart(self.local_root, local)
        if self.ranks.is_main:
            reports = self.store.wait_for_nodes(step, self.nnodes, NODE_REPORT_TIMEOUT, self.run_id)
            manifest = self.store.commit(
                step, reports, world_size=self.ranks.world_size, data_position=position
            )
            # Snapshot to commit: what a blocking emergency save takes once no other save is in flight.
            seconds = time.perf_counter() - began
            self.last_committed, self.last_save_seconds = step, seconds
            if self._save_started == began:  # not the next save's start, if that one began already
                self._save_started = None
            log.info("checkpoint step %d: saved in %.3fs from start to commit", step, seconds)
            self.listener.committed(step, f"{self.job_uri}/{step_dir(step)}", manifest.created_at, seconds)
            deleted = self.store.retain(self.keep_last, protect=self.resumed_from)
            # From this commit on the run can resume from its own newer checkpoint, so the one
            # it started from falls under keepLast like any other.
            self.resumed_from = None
            if deleted:
                log.info("keepLast %d: deleted checkpoints %s", self.keep_last, deleted)
            self.listener.settled(step)
        shutil.rmtree(local, ignore_errors=True)
        shutil.rmtree(written_marker(self.local_root, step, 0).parent, ignore_errors=True)

    def in_flight_estimate(self) -> float:
        """Rank 0: what is left, judged by the last save's duration, of a save still in flight, which
        an emergency save waits for first (0 when none is, or nothing was measured yet)."""
        began = self._save_started
        if self.last_save_seconds is None or began is None:
            return 0.0
        return max(0.0, self.last_save_seconds - (time.perf_counter() - began))

    def wait(self) -> None:
        """Block until this rank's background checkpoint (write; on a node's local rank 0 also the
        upload, and on rank 0 the commit) finished; its failure surfaces here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
