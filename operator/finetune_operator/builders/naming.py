"""Deterministic names and labels of a job's children: a restarted operator finds and recreates
exactly the objects it would have created, and creating one that exists is success."""

from __future__ import annotations

from finetune_operator import contract


def pod_name(job: str, attempt: int, rank: int) -> str:
    return f"{job}-a{attempt}-n{rank}"


def service_name(job: str) -> str:
    """The headless Service that gives every rank pod a DNS name (one per job, all attempts)."""
    return f"{job}-ranks"


def network_policy_name(job: str) -> str:
    """The job's ingress policy (one per job, all attempts), when the installation enables them."""
    return f"{job}-ranks"


def config_map_name(job: str, attempt: int) -> str:
    """One immutable ConfigMap per attempt, so an attempt never reads another's config."""
    return f"{job}-a{attempt}-config"


def master_addr(job: str, namespace: str, attempt: int) -> str:
    """DNS name of node rank 0 of this attempt; new each attempt, so no rank meets a stale gang."""
    return f"{pod_name(job, attempt, 0)}.{service_name(job)}.{namespace}.svc"


def job_labels(job: str) -> dict[str, str]:
    return {
        contract.LABEL_JOB: job,
        contract.LABEL_APP_NAME: "finetune-trainer",
        contract.LABEL_MANAGED_BY: "finetune-operator",
    }


def attempt_labels(job: str, attempt: int) -> dict[str, str]:
    return {**job_labels(job), contract.LABEL_ATTEMPT: str(attempt)}


def rank_labels(job: str, attempt: int, rank: int) -> dict[str, str]:
    return {**attempt_labels(job, attempt), contract.LABEL_RANK: str(rank)}


def group_name(job: str, attempt: int) -> str:
    """The attempt's gang (a Kueue pod group, a Volcano or Coscheduling PodGroup): one per attempt, so
    a restarted gang is admitted as a new whole and never counted against the old group's pods."""
    return f"{job}-a{attempt}"
