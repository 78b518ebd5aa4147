"""The rank pod: one per node rank per attempt, following the pod contract (finetune_operator.contract)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_operator import contract
from finetune_operator.api import FineTuneJob
from finetune_operator.builders import naming
from finetune_operator.builders.objects import Manifest, child_metadata

SCRATCH_VOLUME = "scratch"
SHM_VOLUME = "dshm"
CONFIG_VOLUME = "config"


@dataclass(frozen=True)
class BuildContext:
    """What the operator's installation contributes to every job (set by the Helm chart)."""

    default_image: str


def _value(name: str, value: object) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def _secret_ref(name: str, secret: str, *, optional: bool) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name, "optional": optional}}}


def shutdown_timeout(job: FineTuneJob) -> int:
    grace = job.spec.run_policy.termination_grace_period_seconds
    return max(1, grace - contract.SHUTDOWN_MARGIN_SECONDS)


def rank_env(job: FineTuneJob, attempt: int, rank: int) -> list[dict[str, Any]]:
    """The container env of one rank: rendezvous, identity, storage, then the user's extras."""
    name, namespace = job.metadata.name, job.metadata.namespace
    resources, checkpoint = job.spec.resources, job.spec.checkpoint
    env = [
        _value(contract.ENV_NNODES, resources.nodes),
        _value(contract.ENV_NPROC_PER_NODE, resources.procs_per_node),
        _value(contract.ENV_NODE_RANK, rank),
        _value(contract.ENV_MASTER_ADDR, naming.master_addr(name, namespace, attempt)),
        _value(contract.ENV_MASTER_PORT, contract.MASTER_PORT),
        _value(contract.ENV_JOB_NAME, name),
        _value(contract.ENV_JOB_NAMESPACE, namespace),
        _value(contract.ENV_ATTEMPT, attempt),
        _value(contract.ENV_SCRATCH_DIR, contract.SCRATCH_DIR),
        _value(contract.ENV_TERMINATION_LOG, contract.TERMINATION_LOG),
        _value(contract.ENV_SHUTDOWN_TIMEOUT, shutdown_timeout(job)),
        _value("HF_HOME", f"{contract.SCRATCH_DIR}/hf"),
        *(_value(k, v) for k, v in contract.COMMUNICATION_ENV.items()),
    ]
    if checkpoint.endpoint_url:
        env.append(_value(contract.ENV_S3_ENDPOINT, checkpoint.endpoint_url))
    if checkpoint.region:
        env.append(_value(contract.ENV_S3_REGION, checkpoint.region))
    if checkpoint.credentials_secret:
        env += [
            _secret_ref(k, checkpoint.credentials_secret, optional=False)
            for k in contract.REQUIRED_SECRET_KEYS
        ]
        env += [
            _secret_ref(k, checkpoint.credentials_secret, optional=True)
            for k in contract.OPTIONAL_SECRET_KEYS
        ]
    user_env = [e.to_wire() for e in resources.env]
    if not resources.gpus_per_node and all(e["name"] != "DS_ACCELERATOR" for e in user_env):
        # DeepSpeed picks its accelerator from the machine; a CPU job says so rather than rely on
        # the image finding no GPU (a CUDA build of torch on a GPU-less node still probes for one).
        env.append(_value("DS_ACCELERATOR", "cpu"))
    return env + user_env


def _container_resources(job: FineTuneJob) -> dict[str, Any]:
    res = job.spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if res.gpus_per_node:
        # Quantities are strings on the wire (the API also takes numbers, its clients do not).
        requests[res.gpu_resource_name] = limits[res.gpu_resource_name] = str(res.gpus_per_node)
    if res.cpu is not None:
        requests["cpu"] = str(res.cpu)  # no CPU limit: throttling a data loader stalls every GPU of the gang
    if res.memory is not None:
        requests["memory"] = limits["memory"] = str(res.memory)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container(job: FineTuneJob, attempt: int, rank: int, image: str) -> dict[str, Any]:
    return {
        "name": contract.CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": job.spec.resources.image_pull_policy,
        "command": contract.launch_command(),
        "env": rank_env(job, attempt, rank),
        "ports": [
            {"name": contract.RENDEZVOUS_PORT_NAME, "containerPort": contract.MASTER_PORT, "protocol": "TCP"}
        ],
        "resources": _container_resources(job),
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": contract.CONFIG_DIR, "readOnly": True},
            {"name": SHM_VOLUME, "mountPath": contract.SHM_DIR},
            {"name": SCRATCH_VOLUME, "mountPath": contract.SCRATCH_DIR},
        ],
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def build_rank_pod(job: FineTuneJob, attempt: int, rank: int, ctx: BuildContext) -> Manifest:
    name = job.metadata.name
    res = job.spec.resources
    pod_name = naming.pod_name(name, attempt, rank)
    spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator restarts the whole gang, never one rank alone
        "hostname": pod_name,
        "subdomain": naming.service_name(name),
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # trainer pods hold no cluster credentials
        "terminationGracePeriodSeconds": job.spec.run_policy.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": contract.TRAINER_UID,
            "runAsGroup": contract.TRAINER_UID,
            "fsGroup": contract.TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, attempt, rank, res.image or ctx.default_image)],
        "volumes": [
            {
                "name": CONFIG_VOLUME,
                "configMap": {"name": naming.config_map_name(name, attempt)},
            },
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
            {"name": SCRATCH_VOLUME, "emptyDir": {}},
        ],
    }
    optional = {
        "nodeSelector": res.node_selector or None,
        "tolerations": [t.to_wire() for t in res.tolerations] or None,
        "affinity": res.affinity,
        "priorityClassName": res.priority_class_name,
        "schedulerName": res.scheduler_name,
        "serviceAccountName": res.service_account_name,
        "imagePullSecrets": [{"name": s} for s in res.image_pull_secrets] or None,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": child_metadata(job, pod_name, naming.rank_labels(name, attempt, rank)),
        "spec": spec,
    }
