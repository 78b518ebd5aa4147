"""From dataset sources to tokenized training and validation examples, cached in the job's store.

Rank 0 fetches the sources and derives the cache key from their bytes, the tokenizer and every
setting that shapes the examples. When `<job>/cache/tokenized-<key>/` is committed (its MANIFEST.json
written last, like a checkpoint) nobody tokenizes; otherwise rank 0 cleans, splits, mixes, encodes
and packs, then commits the cache. Every node then reads the same examples, so a restarted attempt,
on any node, starts training without tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer.checkpoint_store import sha256_of
from finetune_trainer.coordination import Coordinator
from finetune_trainer.data import DataNotFound, DataReport, fetch_source, load_records, mix, split
from finetune_trainer.encoding import EncodingReport, Example, encode_all, pack
from finetune_trainer.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
EXAMPLES_FILE = "examples.pkl"
MANIFEST = "MANIFEST.json"


@dataclass
class PreparedData:
    key: str
    train: list[Example]
    validation: list[Example]
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


def _commit(store: ObjectStore, key: str, payload: dict[str, Any], workdir: Path) -> None:
    local = workdir / EXAMPLES_FILE
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(local.name + ".partial")
    with partial.open("wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(partial, local)  # a process killed mid-write leaves no torn cache behind
    store.put_file(local, f"{_prefix(key)}/{EXAMPLES_FILE}")
    manifest = {"size": local.stat().st_size, "sha256": sha256_of(local), "report": payload["report"]}
    store.put_bytes(f"{_prefix(key)}/{MANIFEST}", json.dumps(manifest, indent=1).encode())


def _read(store: ObjectStore, key: str, workdir: Path) -> dict[str, Any] | None:
    """The cached examples, or None when the cache is not committed or torn (a rebuild then
    replaces it)."""
    local = workdir / EXAMPLES_FILE
    try:
        manifest = json.loads(store.get_bytes(f"{_prefix(key)}/{MANIFEST}"))
        store.get_file(f"{_prefix(key)}/{EXAMPLES_FILE}", local)
    except ObjectNotFound:
        return None
    if local.stat().st_size != manifest["size"] or sha256_of(local) != manifest["sha256"]:
        local.unlink()
        return None
    with local.open("rb") as f:
        payload: dict[str, Any] = pickle.load(f)
    return payload


def prepare(config: TrainerConfig, tokenizer: Any, store: ObjectStore, scratch: Path,
            phases: Coordinator) -> PreparedData:  # fmt: skip
    def build_or_reuse() -> str:
        files = {i: fetch_source(s, scratch / "datasets") for i, s in enumerate(config.dataset.sources)}
        key = cache_key(config, files, tokenizer)
        if _read(store, key, scratch / "cache" / key) is not None:
            log.info("tokenized cache %s found: not tokenizing again", key)
        else:
            train, validation, report = build(config, files, tokenizer)
            payload = {"train": train, "validation": validation, "report": report}
            _commit(store, key, payload, scratch / "cache" / key)
            log.info("data: %s", json.dumps(report))
        return key

    # Rank 0 fetches and tokenizes while the others wait on the rendezvous store, not in a collective.
    key = phases.on_main("tokenization", build_or_reuse)
    local = scratch / "cache" / key / EXAMPLES_FILE

    def download() -> None:
        # One download per node (rank 0 already holds the file it built or read).
        if not local.exists() and _read(store, key, local.parent) is None:
            raise DataNotFound(f"tokenized cache {key} is torn or vanished from the job's store")

    phases.per_node("the tokenized cache's download", download)
    with local.open("rb") as f:
        payload = pickle.load(f)
    return PreparedData(
        key=key, train=payload["train"], validation=payload["validation"], report=payload["report"]
    )
