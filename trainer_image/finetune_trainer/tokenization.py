"""Tokenization spread over the ranks: rank 0 plans, every rank encodes a share, rank 0 merges.

Cleaning, deduplication, the split and the mixture need every record once and are cheap; encoding
is what takes hours on one rank for a few GB. So rank 0 plans (data_plan.py: each split's records in
their final order, as jsonl, streamed through disk), every rank encodes its contiguous share of that
order into memory-mappable columns, and rank 0 concatenates the shares in rank order and packs them
(packing.py). Encoding is per record and the order is kept, so the result is exactly what one rank
encoding everything would produce, and the cache key keeps its meaning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from itertools import chain
from pathlib import Path
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer.data_plan import SPLITS, plan_file, read_plan
from finetune_trainer.encoding import EncodingReport, Example, chat_layout, iter_encode
from finetune_trainer.example_table import ExampleTable, write_examples
from finetune_trainer.packing import iter_pack
from finetune_trainer.records import Record, source_name

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10.0  # seconds between rank 0's progress lines


def share(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous share of `count` records: shares differ by at most one, in rank order."""
    return count * rank // world_size, count * (rank + 1) // world_size


def _with_progress(records: Iterator[Record], total: int, world_size: int) -> Iterator[Record]:
    started = last = time.monotonic()
    for done, record in enumerate(records, 1):
        yield record
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY:
            log.info(
                "tokenizing: %d of %d records of rank 0's share (%d ranks), %.0f records/s",
                done, total, world_size, done / (now - started),
            )  # fmt: skip
            last = now


def encode_share(config: TrainerConfig, tokenizer: Any, plan: Path, counts: dict[str, int], rank: int,
                 world_size: int, out: Path) -> dict[str, int]:  # fmt: skip
    """Encode this rank's share of every split into `out`; the encoding counts of its train share."""
    kwargs = encoding_settings(config, tokenizer)
    train_report = EncodingReport()
    for name in SPLITS:
        start, stop = share(counts[name], rank, world_size)
        records = read_plan(plan / plan_file(name), start, stop)
        if rank == 0:
            records = _with_progress(records, stop - start, world_size)
        report = train_report if name == "train" else EncodingReport()
        write_examples(iter_encode(records, tokenizer, report=report, **kwargs), out, name)
    return asdict(train_report)


class Concatenated:
    """Tables one after another as one random-access sequence (the shares in rank order)."""

    def __init__(self, tables: list[ExampleTable]) -> None:
        import numpy as np

        self.tables = tables
        self.starts = np.cumsum([0, *(len(t) for t in tables)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> Example:
        import numpy as np

        table = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.tables[table][index - int(self.starts[table])]

    def lengths(self) -> list[int]:
        return [int(n) for t in self.tables for n in t.lengths()]


def merged(config: TrainerConfig, shares: list[Path], name: str) -> Iterator[Example]:
    """Every rank's share of a split in rank order; whole examples packed into windows when packing
    is on (packing.py): the bins depend on every length, which is why packing happens here."""
    tables = [ExampleTable(directory, name) for directory in shares]
    if config.dataset.packing:
        examples = Concatenated(tables)
        return iter_pack(examples, examples.lengths(), config.dataset.max_seq_length)
    return chain.from_iterable(tables)


def encoding_settings(config: TrainerConfig, tokenizer: Any) -> dict[str, Any]:
    """iter_encode's keyword arguments for this job: the window, overlength and chat layouts."""
    spec = config.dataset
    return {"max_len": spec.max_seq_length, "overlength": spec.overlength,
            "chat_sources": chat_sources(config, tokenizer)}  # fmt: skip


def chat_sources(config: TrainerConfig, tokenizer: Any) -> frozenset[str]:
    """The sources whose prompt/completion and alpaca records go into the chat template."""
    sources = enumerate(config.dataset.sources)
    return frozenset(source_name(s, i) for i, s in sources if chat_layout(tokenizer, s.prompt_format))


def merged_report(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' encoding reports added up, per-source counts included."""
    return {key: _added([r[key] for r in reports]) for key in reports[0]}


def _added(values: list[Any]) -> Any:
    if isinstance(values[0], dict):
        keys = {k for v in values for k in v}
        return {k: _added([v[k] for v in values if k in v]) for k in sorted(keys)}
    return sum(values)
