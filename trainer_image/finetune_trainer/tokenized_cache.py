"""The tokenized cache: what names it, where each of its pieces lives, and its commit.

In the job's store (`CacheLayout.prefix` and below):

    cache/tokenized-<key>/<split>.<column>.bin     the examples, memory-mappable (example_table.py)
    cache/tokenized-<key>/MANIFEST.json            <- written last: the files, and the data report
    cache/tokenized-<key>/plan/<split>.jsonl       while building: rank 0's plan, for the other nodes
    cache/tokenized-<key>/shares/rank-NNNNN/       while building: a rank's encoded share, for rank 0

On a node's scratch disk (`<scratch>/cache/`):

    <key>/                   the node's verified copy, its MANIFEST.json included
    <key>.partial/           a copy being written or downloaded; renamed to <key>/ once complete
    <key>.plan/              the plan (and <key>.plan.work/ while data_plan.py writes it)
    <key>.shares/rank-NNNNN/ each rank's share (rank 0 holds them all for the merge)

The cache is a directory committed by its manifest (committed_dir.py). Its key names its content
(`cache_key`: the sources' bytes, the tokenizer, every setting that shapes the examples), so a
rebuild after a torn cache writes the same files again and needs no uncommit first. The manifest is
`{"files": [...], "report": {...}}` as `json.dumps(indent=1)` writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer.committed_dir import MANIFEST, CommittedDir, FileEntry, fetch_whole, sha256_of
from finetune_trainer.encoding import Example
from finetune_trainer.example_table import ExampleTable, write_examples
from finetune_trainer.packing import padding_share
from finetune_trainer.storage import ObjectStore

# 2: memory-mapped columns (example_table.py); 3: packed parts' lengths, bin packing; 4: the plan
# streamed through disk, its subsample drawn by selection sampling (data.py); 5: chat labels from one
# render located by span, without role headers; prompt/completion and alpaca in the chat template
CACHE_FORMAT = 5


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [tokenizer.chat_template, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id],
        default=str,
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()


def cache_key(config: TrainerConfig, files: dict[int, list[Path]], tokenizer: Any) -> str:
    digest = hashlib.sha256()
    settings = {
        "format": CACHE_FORMAT,
        "dataset": config.dataset.model_dump(mode="json", by_alias=True),
        "seed": config.training.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for index in sorted(files):
        for path in files[index]:
            digest.update(f"{index}:{path.name}:{sha256_of(path)}".encode())
    return digest.hexdigest()[:24]


def _rank(rank: int) -> str:
    return f"rank-{rank:05d}"


@dataclass(frozen=True)
class CacheLayout:
    """Every address of one key's cache, in the job's store and under the node's `local_root`."""

    key: str
    local_root: Path  # <scratch>/cache

    @classmethod
    def in_scratch(cls, scratch: Path, key: str) -> CacheLayout:
        return cls(key, scratch / "cache")

    @property
    def prefix(self) -> str:
        return f"cache/tokenized-{self.key}"

    @property
    def plan_prefix(self) -> str:
        return f"{self.prefix}/plan"

    @property
    def shares_prefix(self) -> str:
        return f"{self.prefix}/shares"

    def share_prefix(self, rank: int) -> str:
        return f"{self.shares_prefix}/{_rank(rank)}"

    @property
    def local(self) -> Path:
        return self.local_root / self.key

    @property
    def partial(self) -> Path:
        return self.local_root / f"{self.key}.partial"

    @property
    def plan_dir(self) -> Path:
        return self.local_root / f"{self.key}.plan"

    @property
    def shares_dir(self) -> Path:
        return self.local_root / f"{self.key}.shares"

    def share_dir(self, rank: int) -> Path:
        return self.shares_dir / _rank(rank)


def padding_report(lengths: Any, window: int) -> float:
    """The share of padding tokens when every sequence is padded to the window (what packing
    removes; collate pads a micro batch only to its longest sequence, so training pads less)."""
    return round(padding_share(lengths, len(lengths), window), 4)


def _install(layout: CacheLayout) -> None:
    shutil.rmtree(layout.local, ignore_errors=True)
    os.replace(layout.partial, layout.local)


def commit_cache(store: ObjectStore, layout: CacheLayout, splits: Mapping[str, Iterable[Example]],
                 report: dict[str, Any], window: int) -> None:  # fmt: skip
    """Write the examples memory-mappable, upload them, then MANIFEST.json last (the commit). The
    node's own copy becomes `layout.local` only once complete, so a killed build leaves nothing
    reusable."""
    partial = layout.partial
    shutil.rmtree(partial, ignore_errors=True)
    report["paddingShare"] = {}
    for name, examples in splits.items():
        report[name] = write_examples(examples, partial, name)
        report["paddingShare"][name] = padding_report(ExampleTable(partial, name).lengths(), window)
    cache = CommittedDir(store, layout.prefix)
    entries = cache.upload(partial)
    manifest = json.dumps({"files": [e.model_dump() for e in entries], "report": report}, indent=1)
    cache.commit(manifest, local_copy=partial)
    _install(layout)


def read_cache(store: ObjectStore, layout: CacheLayout) -> bool:
    """Whether the node holds a verified copy of the committed cache in `layout.local` (downloading
    it when it does not yet); False when the cache is not committed or torn (a rebuild then
    replaces it)."""
    return fetch_whole(CommittedDir(store, layout.prefix), layout.local, manifest_files)


def manifest_files(text: str) -> list[FileEntry]:
    """The files a `{"files": [...], ...}` manifest lists (the cache's, and the DPO reference table's)."""
    return [FileEntry.model_validate(f) for f in json.loads(text).get("files", [])]


def cached_report(layout: CacheLayout) -> dict[str, Any]:
    """The data report in the node's copy of the manifest."""
    report: dict[str, Any] = json.loads((layout.local / MANIFEST).read_text())["report"]
    return report
