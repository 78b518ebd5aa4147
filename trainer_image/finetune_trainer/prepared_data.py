"""From dataset sources to tokenized training and validation examples, cached in the job's store.

Rank 0 fetches the sources and derives the cache key from their bytes, the tokenizer and every
setting that shapes the examples. When `<job>/cache/tokenized-<key>/` is committed (its MANIFEST.json
written last, like a checkpoint) nobody tokenizes. Otherwise rank 0 cleans, splits and mixes (the
plan), every rank encodes its share of the plan, and rank 0 merges the shares in order, packs and
commits (tokenization.py). Every node then downloads the committed files once, and every rank
memory-maps them (example_table.py): a node's ranks share one copy through the page cache, and a
restarted attempt, on any node, starts training without tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer.checkpoint_store import FileEntry, sha256_of, upload_tree
from finetune_trainer.coordination import Coordinator
from finetune_trainer.data import DataNotFound, fetch_source
from finetune_trainer.data_plan import SPLITS, read_plan, write_plan
from finetune_trainer.dropped import check_encoding, check_plan
from finetune_trainer.encoding import EncodingReport, Example, encode_all
from finetune_trainer.example_table import ExampleTable, write_examples
from finetune_trainer.packing import iter_pack, padding_share
from finetune_trainer.storage import ObjectNotFound, ObjectStore, Opener, open_store
from finetune_trainer.tokenization import encode_share, encoding_settings, merged, merged_report

log = logging.getLogger(__name__)

# 2: memory-mapped columns (example_table.py); 3: packed parts' lengths, bin packing; 4: the plan
# streamed through disk, its subsample drawn by selection sampling (data.py); 5: chat labels from one
# render located by span, without role headers; prompt/completion and alpaca in the chat template
CACHE_FORMAT = 5
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
    """Everything one rank would do alone: the reference the spread tokenization must equal."""
    spec = config.dataset
    with tempfile.TemporaryDirectory() as scratch:
        plan = write_plan(config, files, Path(scratch) / "plan")
        encoding_report = EncodingReport()
        kwargs = encoding_settings(config, tokenizer)
        train = read_plan(Path(scratch) / "plan" / "train.jsonl")
        train_examples = encode_all(train, tokenizer, report=encoding_report, **kwargs)
        validation = read_plan(Path(scratch) / "plan" / "validation.jsonl")
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


def _prefix(key: str) -> str:
    return f"cache/tokenized-{key}"


def padding_report(lengths: Any, window: int) -> float:
    """The share of padding tokens when every sequence is padded to the window (what packing
    removes; collate pads a micro batch only to its longest sequence, so training pads less)."""
    return round(padding_share(lengths, len(lengths), window), 4)


def _commit(store: ObjectStore, key: str, splits: dict[str, Iterable[Example]], report: dict[str, Any],
            local: Path, window: int) -> None:  # fmt: skip
    """Write the examples memory-mappable, upload them, then MANIFEST.json last (the commit). The
    node's own copy becomes `local` only once complete, so a killed build leaves nothing reusable."""
    partial = local.with_name(local.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    report["paddingShare"] = {}
    for name, examples in splits.items():
        report[name] = write_examples(examples, partial, name)
        report["paddingShare"][name] = padding_report(ExampleTable(partial, name).lengths(), window)
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


def prepare(config: TrainerConfig, tokenizer: Any, store: ObjectStore, scratch: Path, phases: Coordinator,
            open_store: Opener = open_store) -> PreparedData:  # fmt: skip
    cache = scratch / "cache"

    def plan_or_reuse() -> tuple[str, dict[str, Any] | None]:
        sources = enumerate(config.dataset.sources)
        try:
            files = {i: fetch_source(s, scratch / "datasets", open_store) for i, s in sources}
            key = cache_key(config, files, tokenizer)
            if _read(store, key, cache / key):
                log.info("tokenized cache %s found: not tokenizing again", key)
                return key, None
            plan = write_plan(config, files, cache / f"{key}.plan")
            check_plan(config, plan.report.as_dict())
        finally:
            # The plan holds every record it needs: the sources' copies would only crowd the scratch
            # volume the checkpoints need (every attempt downloads them again for the key).
            shutil.rmtree(scratch / "datasets", ignore_errors=True)
        upload_tree(store, cache / f"{key}.plan", f"{_prefix(key)}/plan")
        return key, {**plan.counts, "sources": plan.report.as_dict()}

    # Rank 0 reads and plans while the others wait on the rendezvous store, not in a collective.
    started = time.monotonic()
    key, plan = phases.on_main("the data plan", plan_or_reuse)
    if plan is not None:
        _tokenize(config, tokenizer, store, cache, key, plan, phases, started)
    local = cache / key

    def download() -> None:
        # One download per node (rank 0 already holds the files it built or read).
        if not _read(store, key, local):
            raise DataNotFound(f"tokenized cache {key} is torn or vanished from the job's store")

    phases.per_node("the tokenized cache's download", download)
    # Every rank of the node maps the same files: one copy in the page cache, none per rank.
    report = json.loads((local / MANIFEST).read_text())["report"]
    train, validation = ExampleTable(local, "train"), ExampleTable(local, "validation")
    return PreparedData(key=key, train=train, validation=validation, report=report)


def _tokenize(config: TrainerConfig, tokenizer: Any, store: ObjectStore, cache: Path, key: str,
              plan: dict[str, Any], phases: Coordinator, started: float) -> None:  # fmt: skip
    """Every rank encodes its share of the plan (tokenization.py); rank 0 merges and commits."""
    ranks = phases.ranks
    plan_dir, shares = cache / f"{key}.plan", cache / f"{key}.shares"

    def fetch_plan() -> None:
        for name in ("train.jsonl", "validation.jsonl"):
            if not (plan_dir / name).exists():
                store.get_file(f"{_prefix(key)}/plan/{name}", plan_dir / name)

    phases.per_node("the data plan's download", fetch_plan)

    def encode_mine() -> dict[str, int]:
        mine = shares / f"rank-{ranks.rank:05d}"
        report = encode_share(config, tokenizer, plan_dir, plan, ranks.rank, ranks.world_size, mine)
        if not ranks.is_main:  # rank 0 merges from its own disk
            upload_tree(store, mine, f"{_prefix(key)}/shares/rank-{ranks.rank:05d}")
        return report

    reports = phases.every_rank("tokenization", encode_mine)

    def merge() -> None:
        parts = [shares / f"rank-{r:05d}" for r in range(ranks.world_size)]
        for rank, part in enumerate(parts[1:], 1):
            prefix = f"{_prefix(key)}/shares/rank-{rank:05d}/"
            for obj in store.list(prefix):
                store.get_file(obj.key, part / obj.key[len(prefix) :])
        report = {"sources": plan["sources"], "encoding": merged_report(reports)}
        check_encoding(config, report["encoding"])
        splits = {name: merged(config, parts, name) for name in SPLITS}
        _commit(store, key, splits, report, cache / key, config.dataset.max_seq_length)
        log.info("data: %s", json.dumps(report))
        log.info("planned, tokenized on %d ranks and committed in %.2fs", ranks.world_size,
                 time.monotonic() - started)  # fmt: skip
        leftovers = store.list(f"{_prefix(key)}/plan/") + store.list(f"{_prefix(key)}/shares/")
        store.delete([o.key for o in leftovers])
        shutil.rmtree(plan_dir, ignore_errors=True)
        shutil.rmtree(shares, ignore_errors=True)

    phases.on_main("merging the tokenized shares", merge)
