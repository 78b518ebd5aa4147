"""The Event a pass records for people to read (`kubectl describe ftj`, `kubectl get events`)."""

from __future__ import annotations

from datetime import datetime

from finetune_operator import contract
from finetune_operator.api import API_VERSION, FineTuneJob
from finetune_operator.builders.objects import Manifest
from finetune_operator.policy.actions import Event
from finetune_operator.policy.observed import format_time

EVENT_MESSAGE_LIMIT = 1024  # the API server refuses longer messages


def build_event(job: FineTuneJob, event: Event, *, now: datetime, suffix: str, instance: str) -> Manifest:
    """`suffix` makes the name unique (every Event is its own object); `instance` is the operator
    replica that recorded it."""
    stamp = format_time(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{job.metadata.name}.{suffix}",
            "namespace": job.metadata.namespace,
        },
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": contract.KIND,
            "name": job.metadata.name,
            "namespace": job.metadata.namespace,
            "uid": job.metadata.uid,
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:EVENT_MESSAGE_LIMIT],
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "source": {"component": "finetune-operator"},
        "reportingComponent": "finetune.dev/operator",
        "reportingInstance": instance,
    }
