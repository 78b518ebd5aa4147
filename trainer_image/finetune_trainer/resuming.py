"""Resuming the DeepSpeed engine from the newest intact committed checkpoint, on every rank together.

Rank 0 picks the newest committed checkpoint whose files are all there; every node downloads and
verifies it; if any node finds a checksum wrong, all ranks move on to the next older one.
`checkpoint.resume` may instead name one committed checkpoint of another job (a warm start), until
this job has committed its own. A ZeRO checkpoint saved at another world size is loaded through its
universal conversion instead (universal.py), made once and committed next to it.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.api.spec import RESUME_LATEST, RESUME_NONE

from finetune_trainer import process_group, tensor_parallel
from finetune_trainer.checkpoint_store import (
    CheckpointManifest,
    CheckpointStore,
    TornCheckpoint,
    parse_checkpoint_uri,
)
from finetune_trainer.coordination import Coordinator
from finetune_trainer.failures import InputMissing
from finetune_trainer.model import load_trained, rebuilt_at_load
from finetune_trainer.position import DataPosition
from finetune_trainer.process_group import Ranks
from finetune_trainer.snapshot import tag
from finetune_trainer.universal import Reshaper, universal_loading

log = logging.getLogger(__name__)


class ResumeSourceNotFound(InputMissing):
    """checkpoint.resume names a checkpoint that is not committed and intact: exit 3."""


@dataclass(frozen=True)
class Loaded:
    step: int
    position: DataPosition | None  # None: the checkpoint stored no data position
    own: bool  # from this job's store, not a warm start's


class Resumer:
    def __init__(
        self, engine: Any, store: CheckpointStore, ranks: Ranks, phases: Coordinator, local_root: Path
    ) -> None:
        self.engine = engine
        self.store = store
        self.ranks = ranks
        self.phases = phases
        self.target = local_root / RESTART_COPY
        self.reshaper = Reshaper(engine, store, ranks, phases, local_root)

    def candidates(
        self, resume: str, address: tuple[str, int] | None, elsewhere: CheckpointStore | None
    ) -> list[tuple[bool, int]]:
        """(from `elsewhere`?, step) of every checkpoint to try, newest first."""
        own = [(False, m.step) for m in self.store.resumable()]
        if own or resume == RESUME_LATEST:
            return own  # once this job has committed, a restart continues its own run
        if resume == RESUME_NONE:
            return []
        if address is None:
            raise ResumeSourceNotFound(
                f"checkpoint.resume {resume}: expected <store>/<namespace>/<job>/checkpoints/step-NNNNNNNN"
            )
        _, step = address
        if elsewhere is None or step not in [m.step for m in elsewhere.resumable()]:
            raise ResumeSourceNotFound(f"checkpoint.resume {resume}: not a committed, intact checkpoint")
        return [(True, step)]

    def load(self, resume: str, open_elsewhere: Callable[[str], CheckpointStore]) -> Loaded | None:
        """Load the newest intact committed checkpoint into the engine; None to start fresh.
        `resume` is latest, none, or the uri of one committed checkpoint (of this or another job)."""
        address = resume_address(resume)
        elsewhere = open_elsewhere(address[0]) if address else None
        candidates = self.phases.on_main(
            "the checkpoint listing", lambda: self.candidates(resume, address, elsewhere)
        )
        target = self.target
        started = time.perf_counter()
        for from_elsewhere, step in candidates:
            source = elsewhere if from_elsewhere and elsewhere is not None else self.store

            def download(source: CheckpointStore = source, step: int = step) -> tuple[str, int, int]:
                keep_only(target, tag(step))  # the node's copy of this step, if any, is checked, not fetched
                manifest = source.manifest(step)
                try:
                    fetched = source.download(manifest, target / tag(step), self._node_files(manifest))
                except TornCheckpoint as exc:
                    log.warning("skipping checkpoint step %d: %s", step, exc)
                    return str(exc), 0, 0
                return "", fetched, sum(f.size for f in manifest.files)

            # Saved at another world size under ZeRO: its universal conversion instead (universal.py).
            reshaped = self.reshaper.prepare(source, step)
            if reshaped is not None and reshaped.problem:
                continue
            fetch = functools.partial(self.reshaper.download, reshaped, target) if reshaped else download
            # Each node downloads while its ranks wait on the rendezvous store: a 70B checkpoint takes
            # longer than a collective may. One torn copy anywhere moves every rank to the next older.
            outcomes = self.phases.per_node(f"the download of step {step}", fetch)
            if any(problem for problem, _, _ in outcomes):
                continue
            if self.ranks.is_main:  # the resume benchmark reads this line
                log.info(
                    "downloaded checkpoint step %d: %s of %d bytes",
                    step, ", ".join(f"node {n} {b}" for n, (_, b, _) in enumerate(outcomes)), outcomes[0][2],
                )  # fmt: skip
            with universal_loading(self.engine, reshaped is not None):
                _, client_state = self.engine.load_checkpoint(
                    str(target), tag=tag(step), load_optimizer_states=True, load_lr_scheduler_states=True,
                    custom_load_fn=load_trained if rebuilt_at_load(self.engine.module) else None,
                )  # fmt: skip
            loaded = Loaded(
                step=step,
                position=DataPosition.from_json((client_state or {}).get("data_position", {})),
                own=source is self.store,
            )
            process_group.barrier()
            if self.ranks.is_main:  # the recovery benchmark splits a restart's time with this line
                log.info("loaded checkpoint step %d in %.2fs", step, time.perf_counter() - started)
            return loaded  # its files stay on scratch: an in-place restart loads them again
        return None

    def _node_files(self, manifest: CheckpointManifest) -> Callable[[str], bool] | None:
        reads_all = self.engine.zero_elastic_checkpoint() or self.engine.load_universal_checkpoint()
        return node_files(self.ranks, manifest.world_size, reads_all, tensor_parallel.degree_of(self.engine))


RESTART_COPY = "resume"  # under the checkpoints' scratch root: the node's copy of one checkpoint


def keep_only(target: Path, name: str) -> None:
    """Leave `target/name` and nothing else in `target`."""
    if target.exists():
        for entry in target.iterdir():
            if entry.name != name:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()


def keep_for_restart(local_root: Path, uploaded: Path) -> None:
    """Once a node uploaded its files of a checkpoint they become its copy for an in-place restart,
    before the commit (a failure right after it must not lose the copy): resuming checks them
    against the committed manifest instead of downloading them. The newest two are kept, so the
    newest committed one is always among them (at most one newer upload is uncommitted); a copy of
    a step that never commits is never a candidate, so it is never read."""
    target = local_root / RESTART_COPY
    target.mkdir(parents=True, exist_ok=True)
    kept = sorted(p.name for p in target.iterdir() if p.is_dir() and p.name != uploaded.name)
    for old in kept[:-1]:
        shutil.rmtree(target / old, ignore_errors=True)
    shutil.rmtree(target / uploaded.name, ignore_errors=True)
    uploaded.rename(target / uploaded.name)


def node_files(ranks: Ranks, saved_world_size: int, reads_all: bool, tensor: int = 1
               ) -> Callable[[str], bool] | None:  # fmt: skip
    """The files a node's ranks load: their own ZeRO shards plus the shared files, when the world
    size is unchanged; None (every file) otherwise. DeepSpeed 0.19 reads only the loading rank's
    `zero_pp_rank_<rank>_*` files (`_get_all_zero_checkpoint_state_dicts`, and `_get_ckpt_name` under
    ZeRO-3), except for elastic and universal checkpoints (`reads_all`), which read them all. The
    rank there is the data-parallel one: under tensor parallelism of degree `tensor`, the global rank
    over the degree (every `mp_rank_NN` of the node's data ranks)."""
    if saved_world_size != ranks.world_size or reads_all:
        return None
    first = ranks.node_rank * ranks.local_world_size
    mine = tensor_parallel.node_data_ranks(first, ranks.local_world_size, tensor)
    return lambda path: (rank := shard_rank(path)) is None or rank in mine


SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt$")


def shard_rank(path: str) -> int | None:
    """The data-parallel rank a DeepSpeed file belongs to, or None for a file every rank reads."""
    match = SHARD.match(path.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def resume_address(resume: str) -> tuple[str, int] | None:
    """(the job store's uri, the step) of the checkpoint `checkpoint.resume` names; None for latest,
    none, and a uri that names no checkpoint (refused by `candidates` unless the job has its own)."""
    return None if resume in (RESUME_LATEST, RESUME_NONE) else parse_checkpoint_uri(resume)
