"""Pure builders: a FineTuneJob and an attempt number in, Kubernetes manifests out. No I/O, so the
reconcile's decide step and both backends (cluster and local) share them."""

from __future__ import annotations

from finetune_operator.api import FineTuneJob
from finetune_operator.builders import naming
from finetune_operator.builders.objects import (
    Manifest,
    build_config_map,
    build_network_policy,
    build_service,
    owner_references,
)
from finetune_operator.builders.pod import BuildContext, build_gang_group, build_rank_pod, rank_env


def build_attempt(job: FineTuneJob, attempt: int, ctx: BuildContext) -> list[Manifest]:
    """Everything attempt `attempt` needs, in creation order: Service, ConfigMap, the gang's
    PodGroup (spec.gang with Volcano or Coscheduling), then rank pods."""
    group = build_gang_group(job, attempt)
    return [
        build_service(job),
        build_config_map(job, attempt),
        *([group] if group is not None else []),
        *(build_rank_pod(job, attempt, rank, ctx) for rank in range(job.spec.resources.nodes)),
    ]


__all__ = [
    "BuildContext",
    "Manifest",
    "build_attempt",
    "build_config_map",
    "build_gang_group",
    "build_network_policy",
    "build_rank_pod",
    "build_service",
    "naming",
    "owner_references",
    "rank_env",
]
