"""Two nodes resume a checkpoint of an unchanged world size on empty scratch disks (a new attempt's
pods): each downloads only what its ranks load (its own ZeRO shard and the shared files), not the
whole checkpoint. Pods restarted in place keep their scratch and fetch even less:
tests/integration/test_in_place_restarts.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.process_group import free_port
from finetune_trainer.resuming import shard_rank
from finetune_trainer.storage import open_store

from tests.support.trainer_run import Finished, Workspace, start, trainer_config

pytestmark = pytest.mark.slow

DOWNLOADED = re.compile(r"downloaded checkpoint step (\d+): node 0 (\d+), node 1 (\d+) of (\d+) bytes")


def _two_nodes(config: object, root: Path, name: str) -> list[Finished]:
    port = free_port()
    nodes = [
        start(config, root / f"node{n}", nproc=1, nnodes=2, node_rank=n, master_port=port, name=name)  # type: ignore[arg-type]
        for n in range(2)
    ]
    return [node.finish() for node in nodes]


def test_each_node_downloads_its_own_shard_and_the_shared_files(workspace: Workspace, tmp_path: Path) -> None:
    store_uri = f"file://{tmp_path}/store"

    def config(steps: int) -> object:
        return trainer_config(workspace, store_uri, {
            "spec.resources.nodes": 2, "spec.resources.processesPerNode": 1,
            "spec.checkpoint.everySteps": 4, "spec.training.maxSteps": steps,
        })  # fmt: skip

    first = _two_nodes(config(4), tmp_path, "a")
    assert [f.code for f in first] == [0, 0], first[0].output[-3000:]
    resumed = _two_nodes(config(6), tmp_path / "new-pods", "b")
    assert [f.code for f in resumed] == [0, 0], resumed[0].output[-3000:]

    step, node0, node1, total = map(int, DOWNLOADED.search(resumed[0].output).groups())  # type: ignore[union-attr]
    files = CheckpointStore(open_store(f"{store_uri}/team-a/tiny")).manifest(step).files
    shard = {rank: sum(f.size for f in files if shard_rank(f.path) == rank) for rank in (0, 1)}
    assert shard[0] > 0 and shard[1] > 0
    assert (node0, node1) == (total - shard[1], total - shard[0])
