"""From dataset sources to tokenized training and validation examples, cached in the job's store.

Rank 0 fetches the sources and derives the cache key from their bytes, the tokenizer and every
setting that shapes the examples. When `<job>/cache/tokenized-<key>/` is committed (its MANIFEST.json
written last, like a checkpoint) nobody tokenizes; otherwise rank 0 cleans, splits, mixes, encodes
and packs, then commits the cache. Every node then downloads the same files once, and every rank
memory-maps them (example_table.py): a node's ranks share one copy through the page cache, and a
restarted attempt, on any node, starts training without tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer.checkpoint_store import FileEntry, sha256_of, upload_tree
from finetune_trainer.coordination import Coordinator
from finetune_trainer.data import DataNotFound, DataReport, fetch_source, load_records, mix, split
from finetune_trainer.encoding import EncodingReport, Example, encode_all, pack
from finetune_trainer.example_table import ExampleTable, write_examples
from finetune_trainer.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: memory-mapped columns (example_table.py) instead of one pickle
MANIFEST = "MANIFEST.json"


@dataclass
class PreparedData:
    key: str
    train: ExampleTable
    validation: ExampleTable
    report: dict[str, Any]


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


def build(config: TrainerConfig, files: dict[int, list[Path]], tokenizer: Any) -> tuple[list[Example], ...]:
    spec, seed = config.dataset, config.training.seed
    data_report = DataReport()
    per_source = load_records(spec, files, data_report)
    splits = [split(records, spec.validation_fraction, seed) for records in per_source]
    train = mix([t for t, _ in splits], [s.weight for s in spec.sources], seed)
    # Mixing lays sources out one after another; shuffling once before packing keeps packed
    # windows from being single-source. The per-epoch order is shuffled again when training.
    random.Random(f"{seed}:mix").shuffle(train)
    validation = [record for _, v in splits for record in v]
    encoding_report = EncodingReport()
    kwargs: dict[str, Any] = {"max_len": spec.max_seq_length, "overlength": spec.overlength}
    train_examples = encode_all(train, tokenizer, report=encoding_report, **kwargs)
    validation_examples = encode_all(validation, tokenizer, report=EncodingReport(), **kwargs)
    if spec.packing:
        train_examples = pack(train_examples, spec.max_seq_length)
        validation_examples = pack(validation_examples, spec.max_seq_length)
    report = {
        "sources": data_report.as_dict(),
        "encoding": asdict(encoding_report),
        "train": len(train_examples),
        "validation": len(validation_examples),
    }
    return train_examples, validation_examples, report  # type: ignore[return-value]


def _prefix(key: str) -> str:
    return f"cache/tokenized-{key}"


def _commit(store: ObjectStore, key: str, splits: dict[str, Iterable[Example]], report: dict[str, Any],
            local: Path) -> None:  # fmt: skip
    """Write the examples memory-mappable, upload them, then MANIFEST.json last (the commit). The
    node's own copy becomes `local` only once complete, so a killed build leaves nothing reusable."""
    partial = local.with_name(local.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for name, examples in splits.items():
        write_examples(examples, partial, name)
    entries = upload_tree(store, partial, _prefix(key))
    manifest = json.dumps({"files": [e.model_dump() for e in entries], "report": report}, indent=1)
    store.put_bytes(f"{_prefix(key)}/{MANIFEST}", manifest.encode())
    (partial / MANIFEST).write_text(manifest)
    shutil.rmtree(local, ignore_errors=True)
    os.replace(partial, local)


def _read(store: ObjectStore, key: str, local: Path) -> bool:
    """Whether the node holds a verified copy of the committed cache in `local` (downloading it when
    it does not yet); False when the cache is not committed or torn (a rebuild then replaces it)."""
    if (local / MANIFEST).exists():
        return True
    try:
        text = store.get_bytes(f"{_prefix(key)}/{MANIFEST}").decode()
    except ObjectNotFound:
        return False
    files = [FileEntry.model_validate(f) for f in json.loads(text).get("files", [])]
    partial = local.with_name(local.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for entry in files:
        path = partial / entry.path
        try:
            store.get_file(f"{_prefix(key)}/{entry.path}", path)
        except ObjectNotFound:
            return False
        if path.stat().st_size != entry.size or sha256_of(path) != entry.sha256:
            return False
    (partial / MANIFEST).write_text(text)
    shutil.rmtree(local, ignore_errors=True)
    os.replace(partial, local)
    return True


def prepare(config: TrainerConfig, tokenizer: Any, store: ObjectStore, scratch: Path,
            phases: Coordinator) -> PreparedData:  # fmt: skip
    def build_or_reuse() -> str:
        files = {i: fetch_source(s, scratch / "datasets") for i, s in enumerate(config.dataset.sources)}
        key = cache_key(config, files, tokenizer)
        if _read(store, key, scratch / "cache" / key):
            log.info("tokenized cache %s found: not tokenizing again", key)
        else:
            started = time.monotonic()
            train, validation, report = build(config, files, tokenizer)
            _commit(store, key, {"train": train, "validation": validation}, report, scratch / "cache" / key)
            log.info("data: %s", json.dumps(report))
            log.info("tokenized and committed in %.2fs", time.monotonic() - started)
        return key

    # Rank 0 fetches and tokenizes while the others wait on the rendezvous store, not in a collective.
    key = phases.on_main("tokenization", build_or_reuse)
    local = scratch / "cache" / key

    def download() -> None:
        # One download per node (rank 0 already holds the files it built or read).
        if not _read(store, key, local):
            raise DataNotFound(f"tokenized cache {key} is torn or vanished from the job's store")

    phases.per_node("the tokenized cache's download", download)
    # Every rank of the node maps the same files: one copy in the page cache, none per rank.
    report = json.loads((local / MANIFEST).read_text())["report"]
    train, validation = ExampleTable(local, "train"), ExampleTable(local, "validation")
    return PreparedData(key=key, train=train, validation=validation, report=report)
