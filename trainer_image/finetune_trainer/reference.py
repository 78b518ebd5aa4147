"""DPO's reference: each pair's chosen and rejected log-probability under the model as it was before
the first step, computed once, spread over the ranks, and committed beside the tokenized cache.

In the job's store:

    cache/reference-<key>/<split>.npy        float64 [examples, 2]: chosen, rejected (sums over the
                                             answer's target tokens), in the table's order
    cache/reference-<key>/MANIFEST.json      <- written last: the commit point (committed_dir.py)
    cache/reference-<key>/shares/rank-NNNNN/ while building: a rank's share, for rank 0

`<key>` names the examples (the tokenized cache's key) and the model that scored them (source,
revision, precision, attention kernel), so any change that would change a number computes anew.

Why precomputed and not a frozen copy of the model beside the trained one: a copy doubles the
weights' memory under full fine-tuning (sharded or not) and costs a forward of every pair at every
step and epoch; the table costs 16 bytes a pair and one forward of each pair, once. It is scored
before the attempt loads its checkpoint: every attempt builds its engine from the base model first,
so the weights are the reference's even on a restart (which finds the table committed and scores
nothing). With LoRA the reference is the base with its adapters disabled (`disable_adapter`), no
second copy of anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from finetune_operator.api import TrainerConfig

from finetune_trainer.committed_dir import CommittedDir, fetch_whole
from finetune_trainer.coordination import Coordinator
from finetune_trainer.data_plan import SPLITS
from finetune_trainer.example_table import ExampleTable
from finetune_trainer.failures import InputMissing
from finetune_trainer.parallel_layout import Layout
from finetune_trainer.preference_loss import sequence_logps
from finetune_trainer.preferences import pair_columns
from finetune_trainer.storage import ObjectStore
from finetune_trainer.tokenization import share
from finetune_trainer.tokenized_cache import manifest_files

log = logging.getLogger(__name__)


class ReferenceMissing(InputMissing):
    """The reference table vanished between its commit and a node's download: exit 3."""


def reference_key(config: TrainerConfig, data_key: str) -> str:
    identity = {
        "examples": data_key,
        "model": config.model.source,
        "revision": config.model.revision,
        "precision": config.training.precision,
        "attention": config.training.attention_implementation,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _scored(engine: Any, examples: list[Any], device: Any) -> np.ndarray[Any, Any]:
    """[len(examples), 2] reference log-probabilities, adapters off when the model has them."""
    import torch

    from finetune_trainer.encoding import model_inputs

    columns = pair_columns(examples, pad_id=0)
    labels = torch.tensor(columns.pop("labels"), device=device)
    module = engine.module
    adapters_off = (
        module.disable_adapter() if hasattr(module, "disable_adapter") else contextlib.nullcontext()
    )
    with adapters_off:
        logits = engine(**model_inputs(columns, device)).logits
    logps, _ = sequence_logps(logits, labels)
    half = len(examples)
    return torch.stack([logps[:half], logps[half:]], dim=1).to(torch.float64).cpu().numpy()


def _score_share(engine: Any, table: ExampleTable, rank: int, world_size: int, micro: int,
                 device: Any) -> np.ndarray[Any, Any]:  # fmt: skip
    """This rank's contiguous share of `table`, scored. Every rank runs as many forwards as the
    largest share needs (ZeRO-3 gathers weights collectively in each), repeating an example in the
    spare ones and dropping their results."""
    import torch

    start, stop = share(len(table), rank, world_size)
    largest = max(b - a for a, b in (share(len(table), r, world_size) for r in range(world_size)))
    rounds = -(-largest // micro)
    out = []
    engine.eval()
    with torch.no_grad():
        for n in range(rounds):
            indices = list(range(start + n * micro, min(start + (n + 1) * micro, stop)))
            scored = _scored(engine, [table[i] for i in indices or [0]], device)
            if indices:
                out.append(scored)
    engine.train()
    return np.concatenate(out) if out else np.zeros((0, 2))


class ReferenceTable:
    """The committed reference log-probabilities of one split, memory-mapped."""

    def __init__(self, path: Path) -> None:
        self.values = np.load(path, mmap_mode="r")

    def __getitem__(self, indices: list[int]) -> tuple[list[float], list[float]]:
        rows = self.values[indices]
        return rows[:, 0].tolist(), rows[:, 1].tolist()


def _read(store: ObjectStore, prefix: str, local: Path) -> bool:
    return fetch_whole(CommittedDir(store, prefix), local, manifest_files)


def reference_tables(config: TrainerConfig, engine: Any, splits: dict[str, ExampleTable], *, data_key: str,
                     store: ObjectStore, scratch: Path, phases: Coordinator, device: Any
                     ) -> dict[str, ReferenceTable]:  # fmt: skip
    """Every split's reference table: the committed one, or scored now by every rank (the engine
    must hold the base weights: before any checkpoint is loaded) and committed by rank 0."""
    key = reference_key(config, data_key)
    prefix, local = f"cache/reference-{key}", scratch / "cache" / f"reference-{key}"
    ranks = phases.ranks
    layout = Layout.of(config, ranks)
    found = phases.on_main("the reference table's lookup", lambda: _read(store, prefix, local))
    if not found:
        log.info("scoring %s pairs with the reference model", " and ".join(f"{len(t)} {n}" for n, t in
                                                                            splits.items()))  # fmt: skip
        mine = local.with_name(local.name + ".shares") / f"rank-{ranks.rank:05d}"
        mine.mkdir(parents=True, exist_ok=True)
        micro = config.schedule.micro_batch_size
        for name, table in splits.items():
            # A model-parallel group's ranks score the same share together (their forward is one).
            scored = _score_share(engine, table, layout.data_rank, layout.data_size, micro, device)
            np.save(mine / f"{name}.npy", scored)

        def upload_mine() -> None:
            if not ranks.is_main and layout.model_rank == 0:
                CommittedDir(store, f"{prefix}/shares/rank-{ranks.rank:05d}").upload(mine)

        phases.every_rank("the reference shares' upload", upload_mine)
        phases.on_main(
            "the reference table's commit", lambda: _merge_and_commit(store, prefix, local, layout)
        )
    phases.per_node("the reference table's download", lambda: _read(store, prefix, local) or _torn(prefix))
    return {name: ReferenceTable(local / f"{name}.npy") for name in splits}


def _torn(prefix: str) -> bool:
    raise ReferenceMissing(f"the DPO reference table {prefix} is torn or vanished from the job's store")


def _merge_and_commit(store: ObjectStore, prefix: str, local: Path, layout: Layout) -> None:
    shares_dir = local.with_name(local.name + ".shares")
    # The first rank of each model-parallel group uploaded its group's share (data rank r: rank r x degree).
    groups = [r * layout.model_parallel for r in range(layout.data_size)]
    for rank in groups[1:]:
        for name in SPLITS:
            key = f"{prefix}/shares/rank-{rank:05d}/{name}.npy"
            store.get_file(key, shares_dir / f"rank-{rank:05d}" / f"{name}.npy")
    partial = local.with_name(local.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in SPLITS:
        parts = [np.load(shares_dir / f"rank-{r:05d}" / f"{name}.npy") for r in groups]
        np.save(partial / f"{name}.npy", np.concatenate(parts))
    directory = CommittedDir(store, prefix)
    entries = [e for e in directory.upload(partial) if not e.path.startswith("shares/")]
    directory.commit(json.dumps({"files": [e.model_dump() for e in entries]}, indent=1), local_copy=partial)
    store.delete([o.key for o in store.list(f"{prefix}/shares/")])
    shutil.rmtree(shares_dir, ignore_errors=True)
    shutil.rmtree(local, ignore_errors=True)
    partial.rename(local)
