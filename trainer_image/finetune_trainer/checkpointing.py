"""Saving and resuming the DeepSpeed engine through the checkpoint store, without stalling training.

Save: every rank writes its DeepSpeed files to the node's scratch disk (a collective), then the
node's local rank 0 uploads the node's files in a background thread while training goes on; on rank 0
that thread then waits for every node's report, commits MANIFEST.json and applies keepLast. A new
save first waits for the previous upload, so local disk holds at most two checkpoints and commits
happen in step order.

Resume: rank 0 picks the newest committed checkpoint whose files are all there; every node downloads
and verifies it; if any node finds a checksum wrong, all ranks move on to the next older one.
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
from typing import Any

from finetune_trainer import ranks as dist
from finetune_trainer.checkpoint_store import (
    CheckpointStore,
    TornCheckpoint,
    step_dir,
)
from finetune_trainer.coordination import Coordinator
from finetune_trainer.failures import InputMissing

log = logging.getLogger(__name__)

NODE_REPORT_TIMEOUT = 1800.0  # seconds rank 0 waits for the slowest node's upload


def tag(step: int) -> str:
    return step_dir(step).rsplit("/", 1)[-1]


class Checkpointer:
    def __init__(
        self,
        engine: Any,
        store: CheckpointStore,
        ranks: dist.Ranks,
        *,
        nnodes: int,
        local_root: Path,
        job_uri: str,
        keep_last: int,
        on_commit: Callable[[int, str, datetime], None],
        phases: Coordinator,
        after_commit: Callable[[], None] = lambda: None,
        device: Any = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.ranks = ranks
        self.nnodes = nnodes
        self.local_root = local_root
        self.job_uri = job_uri
        self.keep_last = keep_last
        self.on_commit = on_commit
        self.after_commit = after_commit
        self.device = device
        self.phases = phases
        self.resumed_from: int | None = None
        self.run_id: str = dist.broadcast(uuid.uuid4().hex if ranks.is_main else None)
        self.last_saved: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- saving ------------------------------------------------------------------------------

    def save(self, step: int, position: dict[str, Any], *, block: bool) -> None:
        started = time.perf_counter()
        # The previous checkpoint's upload may outlast any collective timeout: the node's ranks wait
        # for it on the rendezvous store before the save's own collectives.
        self.phases.per_node(f"the upload of step {self.last_saved}", self.wait)
        waited = time.perf_counter() - started
        self.local_root.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(
            str(self.local_root), tag=tag(step), client_state={"data_position": position}, save_latest=False
        )
        dist.barrier()  # every rank of the node has written its files before the node uploads them
        self.last_saved = step
        if self.ranks.is_node_main:
            self._thread = threading.Thread(
                target=self._upload, args=(step, position), name=f"upload-step-{step}", daemon=True
            )
            self._thread.start()
        if block:
            self.phases.per_node(f"the upload and commit of step {step}", self.wait)
        if self.ranks.is_main:
            blocked = time.perf_counter() - started
            log.info(
                "checkpoint step %d: training blocked %.3fs (previous upload %.3fs, local save %.3fs)%s",
                step, blocked, waited, blocked - waited, " until committed" if block else "",
            )  # fmt: skip

    def _upload(self, step: int, position: dict[str, Any]) -> None:
        local = self.local_root / tag(step)
        try:
            self.store.upload_node(step, self.ranks.node_rank, local, self.run_id)
            if self.ranks.is_main:
                reports = self.store.wait_for_nodes(step, self.nnodes, NODE_REPORT_TIMEOUT, self.run_id)
                manifest = self.store.commit(
                    step, reports, world_size=self.ranks.world_size, data_position=position
                )
                self.on_commit(step, f"{self.job_uri}/{step_dir(step)}", manifest.created_at)
                deleted = self.store.retain(self.keep_last, protect=self.resumed_from)
                # From this commit on the run can resume from its own newer checkpoint, so the one
                # it started from falls under keepLast like any other.
                self.resumed_from = None
                if deleted:
                    log.info("keepLast %d: deleted checkpoints %s", self.keep_last, deleted)
                self.after_commit()
            shutil.rmtree(local, ignore_errors=True)
        except BaseException as exc:
            self._error = exc

    def wait(self) -> None:
        """Block until the running upload (and commit) finished; its failure surfaces here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # -- resuming ----------------------------------------------------------------------------

    def _candidates(self, resume: str, elsewhere: CheckpointStore | None) -> list[int]:
        own = [m.step for m in self.store.resumable()]
        if own or resume == "latest":
            return own  # once this job has committed, a restart continues its own run
        if resume == "none" or elsewhere is None:
            return []
        step = _checkpoint_step(resume)
        if step not in [m.step for m in elsewhere.resumable()]:
            raise ResumeSourceNotFound(f"checkpoint.resume {resume}: not a committed, intact checkpoint")
        return [-step]  # negative: taken from `elsewhere`

    def resume(self, resume: str, open_elsewhere: Callable[[str], CheckpointStore]) -> dict[str, Any] | None:
        """Load the newest intact committed checkpoint; its data position, or None to start fresh.
        `resume` is latest, none, or the uri of one committed checkpoint (of this or another job)."""
        elsewhere = None
        if resume not in ("latest", "none"):
            elsewhere = open_elsewhere(resume.rstrip("/").rsplit("/checkpoints/", 1)[0])
        candidates = self.phases.on_main(
            "the checkpoint listing", lambda: self._candidates(resume, elsewhere)
        )
        target = self.local_root / "resume"
        started = time.perf_counter()
        for signed_step in candidates:
            source = self.store if signed_step >= 0 or elsewhere is None else elsewhere
            step = abs(signed_step)

            def download(source: CheckpointStore = source, step: int = step) -> str:
                shutil.rmtree(target, ignore_errors=True)
                try:
                    source.download(source.manifest(step), target / tag(step))
                except TornCheckpoint as exc:
                    log.warning("skipping checkpoint step %d: %s", step, exc)
                    return str(exc)
                return ""

            # Each node downloads while its ranks wait on the rendezvous store: a 70B checkpoint takes
            # longer than a collective may. One torn copy anywhere moves every rank to the next older.
            if any(self.phases.per_node(f"the download of step {step}", download)):
                continue
            _, client_state = self.engine.load_checkpoint(
                str(target), tag=tag(step), load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if source is self.store:
                self.resumed_from = self.last_saved = step
            dist.barrier()
            if self.ranks.is_main:  # the recovery benchmark splits a restart's time with this line
                log.info("loaded checkpoint step %d in %.2fs", step, time.perf_counter() - started)
            if self.ranks.is_node_main:
                shutil.rmtree(target, ignore_errors=True)
            position: dict[str, Any] = (client_state or {}).get("data_position", {})
            return position
        return None


class ResumeSourceNotFound(InputMissing):
    """checkpoint.resume names a checkpoint that is not committed and intact: exit 3."""


def _checkpoint_step(uri: str) -> int:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if "/checkpoints/" not in uri or not name.startswith("step-") or not name[5:].isdigit():
        raise ResumeSourceNotFound(
            f"checkpoint.resume {uri}: expected <store>/<namespace>/<job>/checkpoints/step-NNNNNNNN"
        )
    return int(name[5:])
