"""Tokenization spread over the ranks produces exactly the examples one rank would, in the same
order, with the same counts: each rank encodes a contiguous share, rank 0 merges in rank order."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer.coordination import Coordinator
from finetune_trainer.prepared_data import PreparedData, build, prepare
from finetune_trainer.process_group import Ranks
from finetune_trainer.storage import FileStore
from finetune_trainer.tiny import counting_records, tiny_tokenizer, write_jsonl
from finetune_trainer.tokenization import share
from torch.distributed import HashStore

from tests.support.factories import job

CORPUS = ["count continue list go after :", " ".join(f"n{i}" for i in range(48))]


def _config(data: Path, packing: bool) -> Any:
    return resolve_trainer_config(job({
        "spec.dataset.sources": [{"uri": f"file://{data}", "shape": "promptCompletion"}],
        "spec.dataset.maxSeqLength": 24, "spec.dataset.packing": packing, "spec.dataset.dedupe": False,
        "spec.dataset.validationFraction": 0.1,
    }))  # fmt: skip


def _gang(config: Any, tmp_path: Path, world: int, local_world: int) -> list[PreparedData]:
    """Every rank of a world of `world` prepares the data, each in a thread, each node its own disk."""
    kv, store = HashStore(), FileStore(tmp_path / "store")
    results: list[Any] = [None] * world
    # Built before the threads start: transformers' first, lazy import is not safe across threads.
    tokenizers = [tiny_tokenizer(CORPUS) for _ in range(world)]

    def rank(r: int) -> None:
        ranks = Ranks(rank=r, local_rank=r % local_world, world_size=world, local_world_size=local_world,
                      node_rank=r // local_world)  # fmt: skip
        phases = Coordinator(kv, ranks, deadline=60, poll=0.001)
        try:
            node_disk = tmp_path / f"node{ranks.node_rank}"
            results[r] = prepare(config, tokenizers[r], store, node_disk, phases)
        except Exception as exc:
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("packing", [False, True])
def test_three_ranks_on_two_nodes_tokenize_exactly_what_one_rank_would(tmp_path: Path, packing: bool) -> None:
    data = write_jsonl(tmp_path / "data" / "train.jsonl", counting_records(97))
    config = _config(data, packing)
    train, validation, report = build(config, {0: [data]}, tiny_tokenizer(CORPUS))
    prepared = _gang(config, tmp_path, world=3, local_world=2)
    for result in prepared:
        assert isinstance(result, PreparedData), result
        assert list(result.train) == train and list(result.validation) == validation
        assert result.report == report


def test_the_sources_local_copies_are_gone_once_planned(tmp_path: Path) -> None:
    """They would take as much of rank 0's scratch volume as the dataset, next to the checkpoints."""
    data = write_jsonl(tmp_path / "data" / "train.jsonl", counting_records(20))
    prepared = _gang(_config(data, packing=False), tmp_path, world=2, local_world=2)
    assert all(isinstance(p, PreparedData) for p in prepared), prepared
    assert (tmp_path / "node0" / "cache").is_dir() and not (tmp_path / "node0" / "datasets").exists()


@pytest.mark.parametrize(("count", "world"), [(10, 3), (2, 4), (0, 2), (97, 8)])
def test_shares_cover_every_record_once_in_order(count: int, world: int) -> None:
    bounds = [share(count, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
