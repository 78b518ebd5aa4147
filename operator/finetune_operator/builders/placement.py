"""Where the ranks of an attempt go relative to each other: the user's own affinity, plus, with
`spec.placement.topologyKey`, a pod affinity among the attempt's pods on that node label, so a gang
lands in one rack or network block.

The term selects this attempt's pods only: a restarted gang gathers around itself, not around the
previous attempt's pods still terminating elsewhere. A required term does not strand the first rank:
kube-scheduler admits a pod that matches its own required affinity terms when no existing pod matches
them (pkg/scheduler/framework/plugins/interpodaffinity/filtering.go, satisfyPodAffinity), and the
rest then follow it into its domain."""

from __future__ import annotations

import copy
from typing import Any

from finetune_operator import contract
from finetune_operator.api import FineTuneJob

PREFERRED_WEIGHT = 100  # the largest the API allows: outweighs the scheduler's spreading scores


def gang_affinity_term(job: FineTuneJob, attempt: int, topology_key: str) -> dict[str, Any]:
    selector = {contract.LABEL_JOB: job.metadata.name, contract.LABEL_ATTEMPT: str(attempt)}
    return {"labelSelector": {"matchLabels": selector}, "topologyKey": topology_key}


def affinity(job: FineTuneJob, attempt: int) -> dict[str, Any] | None:
    """The pod's affinity: the user's, with the gang's term appended to its podAffinity."""
    user = copy.deepcopy(job.spec.resources.affinity) if job.spec.resources.affinity else None
    placement = job.spec.placement
    if placement.topology_key is None:
        return user
    out = user or {}
    pod_affinity = out.setdefault("podAffinity", {})
    term = gang_affinity_term(job, attempt, placement.topology_key)
    if placement.topology_policy == "Required":
        pod_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(term)
    else:
        preferred = {"weight": PREFERRED_WEIGHT, "podAffinityTerm": term}
        pod_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(preferred)
    return out
