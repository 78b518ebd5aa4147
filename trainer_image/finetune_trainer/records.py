"""Dataset expansion before tokenization: read every source, clean, dedupe, split and mix.

Every record keeps a stable id (`<source>:<row>`), so a sample can be traced from the mixture to
the file it came from, and a resumed run can prove it neither skipped nor repeated one. All
randomness is seeded: every rank computes the same split, mixture and order without talking.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from finetune_operator.api.spec import DATASET_EXTENSIONS, DATASET_EXTENSIONS_TEXT, DatasetSource, DatasetSpec

from finetune_trainer.data_files import Malformed, read_rows
from finetune_trainer.failures import InputMissing
from finetune_trainer.messages import Refused, conversation, has_target
from finetune_trainer.preference_records import clean_pair
from finetune_trainer.storage import ObjectNotFound, Opener, open_store

CHUNK = 1 << 16  # positions handed on at a time by the mixture


class DataNotFound(InputMissing):
    """A source is missing or unreadable: the trainer exits 3 (InputNotFound)."""


@dataclass(frozen=True)
class Record:
    id: str
    source: str
    fields: dict[str, Any]


@dataclass
class DataReport:
    """What cleaning did, per source; logged by rank 0 and kept next to the checkpoints."""

    read: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    empty: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    reasons: dict[str, Counter[str]] = field(default_factory=dict)  # per source: why records went

    def refuse(self, name: str, reason: str) -> None:
        self.malformed[name] += 1
        self.reasons.setdefault(name, Counter())[reason] += 1

    def as_dict(self) -> dict[str, dict[str, Any]]:
        names = sorted(set(self.read) | set(self.kept))
        kinds = ("read", "malformed", "empty", "duplicates", "kept")
        out: dict[str, dict[str, Any]] = {n: {k: getattr(self, k)[n] for k in kinds} for n in names}
        for name, reasons in self.reasons.items():
            out[name]["malformedReasons"] = dict(reasons.most_common())
        return out


def source_name(source: DatasetSource, index: int) -> str:
    return source.name or f"source{index}"


def fetch_source(source: DatasetSource, cache_dir: Path, open_store: Opener = open_store) -> list[Path]:
    """Local copies of a source's files: the file the uri names, or every data file under it."""
    uri = source.uri.rstrip("/")
    if uri.endswith(DATASET_EXTENSIONS):
        parent, _, name = uri.rpartition("/")
        store, keys = open_store(parent), [name]
    else:
        store = open_store(uri)
        keys = [o.key for o in store.list("") if o.key.endswith(DATASET_EXTENSIONS)]
    if not keys:
        raise DataNotFound(f"dataset {source.uri}: no {DATASET_EXTENSIONS_TEXT} files there")
    local_root = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
    out = []
    for key in sorted(keys):
        local = local_root / key
        try:
            store.get_file(key, local)
        except ObjectNotFound:
            raise DataNotFound(f"dataset {source.uri}: {key} not found") from None
        out.append(local)
    return out


def _clean(source: DatasetSource, row: dict[str, Any], reasoning: str) -> dict[str, Any] | None:
    """The record's fields by the source's shape, None when it has nothing to learn; `Refused` for a
    malformed one.

    alpaca records keep both layouts (`prompt` as plain text, `user` as the user turn of a chat),
    because which one trains depends on the tokenizer's template
    (promptFormat auto), which encoding knows."""
    if source.shape == "text":
        text = row.get(source.text_field)
        if not isinstance(text, str):
            raise Refused(f"no text under {source.text_field}")
        return {"text": text} if text.strip() else None
    if source.shape == "promptCompletion":
        prompt, completion = row.get(source.prompt_field), row.get(source.completion_field)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise Refused(f"no text under {source.prompt_field} and {source.completion_field}")
        fields = {"prompt": prompt, "completion": completion}  # the prompt is also the chat's user turn
        return fields if completion.strip() else None
    if source.shape == "alpaca":
        return _alpaca(source, row)
    if source.shape == "preference":
        return clean_pair(source, row, reasoning)
    record = conversation(source, row, reasoning)
    return record if has_target(record) else None


# Stanford Alpaca's own prompt (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), which models
# trained on Alpaca-format data expect at inference.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


def _alpaca(source: DatasetSource, row: dict[str, Any]) -> dict[str, Any] | None:
    instruction, extra = row.get(source.instruction_field), row.get(source.input_field)
    output, extra = row.get(source.output_field), "" if extra is None else extra
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        raise Refused(f"no text under {source.instruction_field} and {source.output_field}")
    if not instruction.strip() or not output.strip():
        return None
    prompt = ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if extra.strip() else "",
        instruction=instruction,
        input=f"### Input:\n{extra}\n\n" if extra.strip() else "",
    )
    # As a chat turn, instruction and input are one user message (LLaMA-Factory's alpaca reading).
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    fields: dict[str, Any] = {"prompt": prompt, "completion": output, "user": user}
    if isinstance(row.get("system"), str) and row["system"].strip():
        fields["system"] = row["system"]
    return fields


def iter_records(spec: DatasetSpec, index: int, paths: list[Path], report: DataReport,
                 seen: Callable[[bytes], bool]) -> Iterator[Record]:  # fmt: skip
    """Source `index`'s cleaned records, streamed from its files in order. `seen(digest)` says
    whether a record with the same fields came before (in any source) and remembers it: the
    caller owns that memory (data_plan.py keeps it on disk)."""
    source = spec.sources[index]
    name = source_name(source, index)
    row_number = 0
    for path in paths:
        for row in read_rows(path, source.format, source.records_field):
            row_id = f"{name}:{row_number}"
            row_number += 1
            report.read[name] += 1
            if row is None:
                report.empty[name] += 1
                continue
            if isinstance(row, Malformed):
                report.refuse(name, row.reason)
                continue
            try:
                fields = _clean(source, row, spec.reasoning)
            except Refused as exc:
                report.refuse(name, str(exc))
                continue
            if fields is None:
                report.empty[name] += 1
                continue
            if spec.dedupe and seen(hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()):
                report.duplicates[name] += 1
                continue
            report.kept[name] += 1
            yield Record(id=row_id, source=name, fields=fields)


def in_validation(record_id: str, fraction: float, seed: int) -> bool:
    """The train/validation split by hashed record id: deterministic, and stable when sources grow."""
    bucket = int(hashlib.sha256(f"{seed}:{record_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def shares(counts: list[int], weights: list[float]) -> list[int]:
    """How many records of each source one epoch holds: its normalised weight of the total number of
    records (none from a source that kept none)."""
    total = sum(counts)
    weight_sum = sum(w for w, n in zip(weights, counts, strict=True) if n)
    return [round(total * w / weight_sum) if n else 0 for w, n in zip(weights, counts, strict=True)]


def mixture(counts: list[int], weights: list[float], seed: int) -> Iterator[np.ndarray[Any, Any]]:
    """One epoch's training records as positions in the sources' kept train records laid end to
    end, in chunks, each source filling its share (`shares`): repeated whole, then subsampled
    without repeats. Positions, not records, and nothing held: a mixture costs 8 bytes a record, on
    disk (data_plan.py)."""
    rng = random.Random(seed)
    base = 0
    for count, share in zip(counts, shares(counts, weights), strict=True):
        if count:
            full, rest = divmod(share, count)
            for _ in range(full):
                for start in range(base, base + count, CHUNK):
                    yield np.arange(start, min(start + CHUNK, base + count), dtype=np.int64)
            yield from _subsample(rng, base, count, rest)
        base += count


def _subsample(rng: random.Random, base: int, count: int, wanted: int) -> Iterator[np.ndarray[Any, Any]]:
    """`wanted` of the positions base..base+count without repeats, in order, streamed: selection
    sampling (Knuth, TAOCP vol. 2, 3.4.2, Algorithm S) takes each candidate with probability
    still-wanted / still-left, so every subset is equally likely and no pool is held."""
    chosen: list[int] = []
    for offset in range(count):
        if not wanted:
            break
        if rng.random() * (count - offset) < wanted:
            chosen.append(base + offset)
            wanted -= 1
            if len(chosen) == CHUNK:
                yield np.asarray(chosen, dtype=np.int64)
                chosen = []
    if chosen:
        yield np.asarray(chosen, dtype=np.int64)
