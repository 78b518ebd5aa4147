"""Pure builders for the objects an attempt needs besides its pods: the headless Service, the
attempt's trainer ConfigMap and, when the installation asks for it, the job's NetworkPolicy. Plain
dicts, exactly what is sent to the API server."""

from __future__ import annotations

from typing import Any

from finetune_operator import contract
from finetune_operator.api import API_VERSION, FineTuneJob, resolve_trainer_config
from finetune_operator.builders import naming

Manifest = dict[str, Any]


def owner_references(job: FineTuneJob) -> list[dict[str, Any]]:
    """Children are owned by the job, so deleting it garbage-collects them. A job that was never
    stored in a cluster (the local run) has no uid and owns nothing."""
    if not job.metadata.uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": contract.KIND,
            "name": job.metadata.name,
            "uid": job.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def child_metadata(job: FineTuneJob, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": job.metadata.namespace, "labels": labels}
    owners = owner_references(job)
    if owners:
        meta["ownerReferences"] = owners
    return meta


def build_service(job: FineTuneJob) -> Manifest:
    """Headless, and publishing not-ready addresses: ranks must resolve rank 0 while they all start,
    before any of them is Ready."""
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(job, naming.service_name(name), naming.job_labels(name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {contract.LABEL_JOB: name},
            "ports": [
                {
                    "name": contract.RENDEZVOUS_PORT_NAME,
                    "port": contract.MASTER_PORT,
                    "targetPort": contract.MASTER_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_network_policy(job: FineTuneJob) -> Manifest:
    """Ingress to a job's pods only from the same job's pods. All ports, not just the rendezvous
    port: NCCL and gloo open their data connections on ephemeral ports. Egress is left alone (the
    ranks must reach DNS, the checkpoint store and the model source). A static policy in the chart
    cannot say "the same job as me", hence one per job, owned by it."""
    name = job.metadata.name
    own_pods = {"matchLabels": {contract.LABEL_JOB: name}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(job, naming.network_policy_name(name), naming.job_labels(name)),
        "spec": {
            "podSelector": own_pods,
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": own_pods}]}],
        },
    }


def build_config_map(job: FineTuneJob, attempt: int) -> Manifest:
    name = job.metadata.name
    config = resolve_trainer_config(job)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(
            job, naming.config_map_name(name, attempt), naming.attempt_labels(name, attempt)
        ),
        "immutable": True,
        "data": {
            contract.CONFIG_FILE_NAME: config.model_dump_json(by_alias=True, exclude_none=True, indent=2)
        },
    }
