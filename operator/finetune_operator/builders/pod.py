"""The rank pod: one per node rank per attempt, following the pod contract (finetune_operator.contract)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_operator import contract
from finetune_operator.api import FineTuneJob
from finetune_operator.api.kubernetes import wire
from finetune_operator.builders import naming
from finetune_operator.builders.gang import build_pod_group, gang_pod_metadata
from finetune_operator.builders.objects import Manifest, child_metadata
from finetune_operator.builders.placement import affinity
from finetune_operator.policy import grace, in_place


@dataclass(frozen=True)
class BuildContext:
    """What the operator's installation contributes to every job (set by the Helm chart)."""

    default_image: str


def _value(name: str, value: object) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def _secret_ref(name: str, secret: str, *, optional: bool) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name, "optional": optional}}}


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
        _value(
            contract.ENV_SHUTDOWN_TIMEOUT,
            grace.shutdown_seconds(job.spec.run_policy.termination_grace_period_seconds),
        ),
        _value(contract.ENV_IN_PLACE_RESTARTS, in_place.allowance(job)),
        _value(contract.ENV_IN_PLACE_BACKOFF, ",".join(f"{s:.0f}" for s in in_place.backoffs(job, attempt))),
        _value("HF_HOME", f"{contract.SCRATCH_DIR}/hf"),
        *(_value(k, v) for k, v in contract.COMMUNICATION_ENV.items()),
    ]
    if checkpoint.endpoint_url:
        env.append(_value(contract.ENV_S3_ENDPOINT, checkpoint.endpoint_url))
    if checkpoint.region:
        env.append(_value(contract.ENV_S3_REGION, checkpoint.region))
    token = job.spec.model.token_secret
    if token:
        ref = {"name": token.name, "key": token.key, "optional": False}
        env.append({"name": contract.ENV_HF_TOKEN, "valueFrom": {"secretKeyRef": ref}})
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
    for name, count in sorted(res.extended_resources.items()):
        # Extended resources cannot be overcommitted: the API requires requests to equal limits.
        requests[name] = limits[name] = str(count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _rendezvous_port(job: FineTuneJob) -> dict[str, Any]:
    port: dict[str, Any] = {
        "name": contract.RENDEZVOUS_PORT_NAME,
        "containerPort": contract.MASTER_PORT,
        "protocol": "TCP",
    }
    if job.spec.resources.host_network:
        # On the host network the API requires hostPort == containerPort (core validation,
        # validateHostNetwork) and defaults it so; written here, the manifest says what the
        # scheduler will do: two such rank pods never share a node (its NodePorts filter).
        port["hostPort"] = contract.MASTER_PORT
    return port


def _capabilities(job: FineTuneJob) -> dict[str, Any]:
    capabilities: dict[str, Any] = {"drop": ["ALL"]}
    if job.spec.resources.ipc_lock:
        capabilities["add"] = ["IPC_LOCK"]  # pinning memory for RDMA; see docs/operations.md
    return capabilities


def _container(job: FineTuneJob, attempt: int, rank: int, image: str) -> dict[str, Any]:
    res = job.spec.resources
    return {
        "name": contract.CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": res.image_pull_policy,
        "command": contract.launch_command(),
        "env": rank_env(job, attempt, rank),
        "ports": [_rendezvous_port(job)],
        "resources": _container_resources(job),
        "volumeMounts": [
            {"name": contract.CONFIG_VOLUME, "mountPath": contract.CONFIG_DIR, "readOnly": True},
            {"name": contract.SHM_VOLUME, "mountPath": contract.SHM_DIR},
            {"name": contract.SCRATCH_VOLUME, "mountPath": contract.SCRATCH_DIR},
            *(wire(m) for m in res.volume_mounts),
        ],
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "runAsNonRoot": True,
            "capabilities": _capabilities(job),
        },
    }


def _scratch_volume(job: FineTuneJob) -> dict[str, Any]:
    """An emptyDir bounded by sizeLimit, or a generic ephemeral PVC of the chosen class: created with
    the pod, owned by it and deleted with it, so a restarted gang starts on clean disks."""
    scratch = job.spec.resources.scratch
    if scratch.storage_class_name is None:
        return {"name": contract.SCRATCH_VOLUME, "emptyDir": {"sizeLimit": str(scratch.size)}}
    claim = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": scratch.storage_class_name,
        "resources": {"requests": {"storage": str(scratch.size)}},
    }
    template = {"metadata": {"labels": naming.job_labels(job.metadata.name)}, "spec": claim}
    return {"name": contract.SCRATCH_VOLUME, "ephemeral": {"volumeClaimTemplate": template}}


def _pod_metadata(job: FineTuneJob, pod_name: str, attempt: int, rank: int) -> dict[str, Any]:
    """The user's labels first, the operator's over them: the operator finds its pods by its labels,
    so no manifest may move a pod out of (or into) a job. The API refuses such keys too."""
    extra, gang = job.spec.resources.pod_metadata, gang_pod_metadata(job, attempt)
    labels = {**extra.labels, **gang.labels, **naming.rank_labels(job.metadata.name, attempt, rank)}
    meta = child_metadata(job, pod_name, labels)
    annotations = {**extra.annotations, **gang.annotations}
    if annotations:
        meta["annotations"] = annotations
    return meta


def build_gang_group(job: FineTuneJob, attempt: int) -> Manifest | None:
    """The attempt's PodGroup when spec.gang needs one, asking for every rank's requests."""
    return build_pod_group(job, attempt, _container_resources(job).get("requests", {}))


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
            # A dataset or checkpoint volume can hold millions of files: the kubelet's recursive
            # chown to fsGroup at every pod start would hold up each gang start; skip it once the
            # volume's root already belongs to the group.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, attempt, rank, res.image or ctx.default_image)],
        "volumes": [
            {
                "name": contract.CONFIG_VOLUME,
                "configMap": {"name": naming.config_map_name(name, attempt)},
            },
            {"name": contract.SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": str(res.shm_size)}},
            _scratch_volume(job),
            *(wire(v) for v in res.volumes),
        ],
    }
    if res.host_network:
        # On the node's network the pod would use the node's resolver and could not resolve the
        # Service names of MASTER_ADDR; ClusterFirstWithHostNet keeps cluster DNS. The record itself
        # still exists: the EndpointSlice controller names an endpoint by spec.hostname whenever
        # spec.subdomain is the Service (pkg/controller/util/endpoint ShouldSetHostname).
        spec["hostNetwork"] = True
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    optional = {
        "nodeSelector": res.node_selector or None,
        "tolerations": [t.to_wire() for t in res.tolerations] or None,
        "affinity": affinity(job, attempt),
        "priorityClassName": res.priority_class_name,
        "schedulerName": gang_pod_metadata(job, attempt).scheduler_name or res.scheduler_name,
        "serviceAccountName": res.service_account_name,
        "imagePullSecrets": [{"name": s} for s in res.image_pull_secrets] or None,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _pod_metadata(job, pod_name, attempt, rank),
        "spec": spec,
    }
