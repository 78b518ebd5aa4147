"""From dataset sources to tokenized training and validation examples, cached in the job's store.

Rank 0 fetches the sources and derives the cache key from their bytes, the tokenizer and every
setting that shapes the examples. When `<job>/cache/tokenized-<key>/` is committed (its MANIFEST.json
written last, like a checkpoint; tokenized_cache.py holds its layout and commit) nobody tokenizes.
Otherwise rank 0 cleans, splits and mixes (the plan), every rank encodes its share of the plan, and
rank 0 merges the shares in order, packs and commits (tokenization.py). Every node then downloads
the committed files once, and every rank memory-maps them (example_table.py): a node's ranks share
one copy through the page cache, and a restarted attempt, on any node, starts training without
tokenizing again.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer.committed_dir import upload_tree
from finetune_trainer.coordination import Coordinator
from finetune_trainer.data_plan import SPLITS, plan_file, read_plan, write_plan
from finetune_trainer.dropped import check_encoding, check_plan
from finetune_trainer.encoding import EncodingReport, Example, encode_all
from finetune_trainer.example_table import ExampleTable
from finetune_trainer.packing import iter_pack
from finetune_trainer.records import DataNotFound, fetch_source
from finetune_trainer.storage import ObjectStore, Opener, open_store
from finetune_trainer.tokenization import encode_share, encoding_settings, merged, merged_report
from finetune_trainer.tokenized_cache import (
    CacheLayout,
    cache_key,
    cached_report,
    commit_cache,
    padding_report,
    read_cache,
)

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    key: str
    train: ExampleTable
    validation: ExampleTable
    report: dict[str, Any]


def build(config: TrainerConfig, files: dict[int, list[Path]], tokenizer: Any) -> tuple[list[Example], ...]:
    """Everything one rank would do alone: the reference the spread tokenization must equal."""
    spec = config.dataset
    with tempfile.TemporaryDirectory() as scratch:
        plan = write_plan(config, files, Path(scratch) / "plan")
        encoding_report = EncodingReport()
        kwargs = encoding_settings(config, tokenizer)
        train = read_plan(Path(scratch) / "plan" / plan_file("train"))
        train_examples = encode_all(train, tokenizer, report=encoding_report, **kwargs)
        validation = read_plan(Path(scratch) / "plan" / plan_file("validation"))
        validation_examples = encode_all(validation, tokenizer, report=EncodingReport(), **kwargs)
    if spec.packing:
        train_examples = list(
            iter_pack(train_examples, [len(e.input_ids) for e in train_examples], spec.max_seq_length)
        )
        validation_examples = list(
            iter_pack(
                validation_examples, [len(e.input_ids) for e in validation_examples], spec.max_seq_length
            )
        )
    report = {
        "sources": plan.report.as_dict(),
        "encoding": asdict(encoding_report),
        "train": len(train_examples),
        "validation": len(validation_examples),
        "paddingShare": {
            name: padding_report([len(e.input_ids) for e in examples], spec.max_seq_length)
            for name, examples in (("train", train_examples), ("validation", validation_examples))
        },
    }
    return train_examples, validation_examples, report  # type: ignore[return-value]


def prepare(config: TrainerConfig, tokenizer: Any, store: ObjectStore, scratch: Path, phases: Coordinator,
            open_store: Opener = open_store) -> PreparedData:  # fmt: skip
    sources_dir = scratch / "datasets"

    def plan_or_reuse() -> tuple[str, dict[str, Any] | None]:
        sources = enumerate(config.dataset.sources)
        try:
            files = {i: fetch_source(s, sources_dir, open_store) for i, s in sources}
            layout = CacheLayout.in_scratch(scratch, cache_key(config, files, tokenizer))
            if read_cache(store, layout):
                log.info("tokenized cache %s found: not tokenizing again", layout.key)
                return layout.key, None
            plan = write_plan(config, files, layout.plan_dir)
            check_plan(config, plan.report.as_dict())
        finally:
            # The plan holds every record it needs: the sources' copies would only crowd the scratch
            # volume the checkpoints need (every attempt downloads them again for the key).
            shutil.rmtree(sources_dir, ignore_errors=True)
        upload_tree(store, layout.plan_dir, layout.plan_prefix)
        return layout.key, {**plan.counts, "sources": plan.report.as_dict()}

    # Rank 0 reads and plans while the others wait on the rendezvous store, not in a collective.
    started = time.monotonic()
    key, plan = phases.on_main("the data plan", plan_or_reuse)
    layout = CacheLayout.in_scratch(scratch, key)
    if plan is not None:
        _tokenize(config, tokenizer, store, layout, plan, phases, started)

    def download() -> None:
        # One download per node (rank 0 already holds the files it built or read).
        if not read_cache(store, layout):
            raise DataNotFound(f"tokenized cache {key} is torn or vanished from the job's store")

    phases.per_node("the tokenized cache's download", download)
    # Every rank of the node maps the same files: one copy in the page cache, none per rank.
    train, validation = ExampleTable(layout.local, "train"), ExampleTable(layout.local, "validation")
    return PreparedData(key=key, train=train, validation=validation, report=cached_report(layout))


def _tokenize(config: TrainerConfig, tokenizer: Any, store: ObjectStore, layout: CacheLayout,
              plan: dict[str, Any], phases: Coordinator, started: float) -> None:  # fmt: skip
    """Every rank encodes its share of the plan (tokenization.py); rank 0 merges and commits."""
    ranks = phases.ranks

    def fetch_plan() -> None:
        for name in (plan_file(split) for split in SPLITS):
            if not (layout.plan_dir / name).exists():
                store.get_file(f"{layout.plan_prefix}/{name}", layout.plan_dir / name)

    phases.per_node("the data plan's download", fetch_plan)

    def encode_mine() -> dict[str, int]:
        mine = layout.share_dir(ranks.rank)
        report = encode_share(config, tokenizer, layout.plan_dir, plan, ranks.rank, ranks.world_size, mine)
        if not ranks.is_main:  # rank 0 merges from its own disk
            upload_tree(store, mine, layout.share_prefix(ranks.rank))
        return report

    reports = phases.every_rank("tokenization", encode_mine)

    def merge() -> None:
        parts = [layout.share_dir(r) for r in range(ranks.world_size)]
        for rank, part in enumerate(parts[1:], 1):
            prefix = f"{layout.share_prefix(rank)}/"
            for obj in store.list(prefix):
                store.get_file(obj.key, part / obj.key[len(prefix) :])
        report = {"sources": plan["sources"], "encoding": merged_report(reports)}
        check_encoding(config, report["encoding"])
        splits = {name: merged(config, parts, name) for name in SPLITS}
        commit_cache(store, layout, splits, report, config.dataset.max_seq_length)
        log.info("data: %s", json.dumps(report))
        log.info("planned, tokenized on %d ranks and committed in %.2fs", ranks.world_size,
                 time.monotonic() - started)  # fmt: skip
        leftovers = store.list(f"{layout.plan_prefix}/") + store.list(f"{layout.shares_prefix}/")
        store.delete([o.key for o in leftovers])
        shutil.rmtree(layout.plan_dir, ignore_errors=True)
        shutil.rmtree(layout.shares_dir, ignore_errors=True)

    phases.on_main("merging the tokenized shares", merge)
