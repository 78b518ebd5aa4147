"""The check that no source trains silently on a remnant: a source whose records are mostly lost
(malformed when read, unencodable or without a target when tokenized) stops the run with exit 2 and
a report per reason, before any step, instead of training on what is left of it.

The threshold is `dataset.maxDroppedFraction` of a source's records. It is checked twice, because
the two kinds of loss are known at different times: rank 0's plan knows what could not be read;
the merged tokenization knows what could not be labelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator.api import TrainerConfig
from finetune_operator.api.status import DataSourceReport

from finetune_trainer.failures import InvalidInput
from finetune_trainer.records import source_name


class MostlyDropped(InvalidInput):
    """A source lost more of its records than dataset.maxDroppedFraction allows (exit 2)."""


def _fix(config: TrainerConfig, index: int, reasons: Mapping[str, int], stage: str) -> str:
    template = any("template" in r or "message" in r for r in reasons)
    if stage == "tokenized" and template:
        return "choose a template that renders these records with dataset.chatTemplate"
    return (
        f"check dataset.sources[{index}]'s shape, format and field names against the file "
        f"(shape is {config.dataset.sources[index].shape})"
    )


def _refuse(config: TrainerConfig, index: int, lost: int, total: int, reasons: Mapping[str, int],
            stage: str) -> None:  # fmt: skip
    if not total or lost / total <= config.dataset.max_dropped_fraction:
        return
    name = source_name(config.dataset.sources[index], index)
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:4])
    raise MostlyDropped(
        f"dataset.sources[{index}] ({name}): {lost} of {total} records {stage} were dropped ({why}), "
        f"more than dataset.maxDroppedFraction {config.dataset.max_dropped_fraction:g}; "
        f"{_fix(config, index, reasons, stage)}, or raise dataset.maxDroppedFraction"
    )


def check_plan(config: TrainerConfig, sources: Mapping[str, Mapping[str, Any]]) -> None:
    """`sources`: the plan's report per source name (DataReport.as_dict)."""
    for index, source in enumerate(config.dataset.sources):
        counts = sources.get(source_name(source, index))
        if counts:
            reasons = counts.get("malformedReasons", {})
            _refuse(config, index, counts["malformed"], counts["read"], reasons, "read")


def check_encoding(config: TrainerConfig, encoding: Mapping[str, Any]) -> None:
    """`encoding`: the merged EncodingReport (its `records` and `lost` per source)."""
    for index, source in enumerate(config.dataset.sources):
        name = source_name(source, index)
        reasons = encoding.get("lost", {}).get(name, {})
        total = encoding.get("records", {}).get(name, 0)
        _refuse(config, index, sum(reasons.values()), total, reasons, "tokenized")


def summary(report: Mapping[str, Any]) -> list[DataSourceReport]:
    """The prepared data's report per source, as status.progress.data shows it."""
    lost = report.get("encoding", {}).get("lost", {})
    out = []
    for name, counts in sorted(report.get("sources", {}).items()):
        reasons = dict(counts.get("malformedReasons", {}))
        for reason, n in lost.get(name, {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
        top = {k[:200]: n for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:8]}
        out.append(DataSourceReport(
            name=name, read=counts["read"], kept=counts["kept"], duplicates=counts["duplicates"],
            empty=counts["empty"], dropped=sum(reasons.values()), reasons=top,
        ))  # fmt: skip
    return out
