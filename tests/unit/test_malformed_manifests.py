"""Every malformed manifest is refused twice, by the CRD (schema + CEL, as `kubectl apply` would) and
by the pydantic models (as `ftjob validate`, the local run and the trainer would), each naming the
offending field; where a CEL rule and a pydantic rule overlap, they say the same thing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.api import describe, parse_manifest
from finetune_operator.api.job import validate_manifest
from finetune_operator.api.spec import ResourcesSpec
from finetune_operator.cli import main
from finetune_operator.cli_errors import EXIT_INVALID
from pydantic import ValidationError

from tests.support.apiserver import FakeApiServer
from tests.support.factories import manifest


@dataclass(frozen=True)
class Bad:
    why: str
    changes: dict[str, Any]
    field: str
    drop: tuple[str, ...] = ()
    rule: bool = False  # refused by a cross-field rule, whose message both layers share
    extra: dict[str, Any] = field(default_factory=dict)


GPU8 = {"spec.resources.gpusPerNode": 8}
DPO = {"spec.training.objective": "dpo", "spec.dataset.sources.0.shape": "preference"}
PVC = {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}


def _mounted(*mounts: dict[str, Any], volumes: tuple[dict[str, Any], ...] = (PVC,)) -> dict[str, Any]:
    return {"spec.resources.volumes": list(volumes), "spec.resources.volumeMounts": list(mounts)}


def _mount_at(path: str) -> dict[str, Any]:
    return _mounted({"name": "data", "mountPath": path})


CASES = [
    # wrong types
    Bad("nodes as a word", {"spec.resources.nodes": "two"}, "spec.resources.nodes"),
    Bad(
        "micro batch as a numeric string",
        {"spec.training.microBatchSize": "4"},
        "spec.training.microBatchSize",
    ),
    Bad("dedupe as yes", {"spec.dataset.dedupe": "yes"}, "spec.dataset.dedupe"),
    Bad("sources as a map", {"spec.dataset.sources": {"uri": "s3://data/x.jsonl"}}, "spec.dataset.sources"),
    Bad("memory not a quantity", {"spec.resources.memory": "lots"}, "spec.resources.memory"),
    # unknown fields
    Bad("misspelt learning rate", {"spec.training.learningrate": 0.1}, "spec.training.learningrate"),
    Bad("field at the wrong level", {"spec.gpusPerNode": 8}, "spec.gpusPerNode"),
    Bad("unknown source field", {"spec.dataset.sources.0.path": "x"}, "spec.dataset.sources[0].path"),
    # missing
    Bad("no model", {}, "spec.model", drop=("spec.model",)),
    Bad("no checkpoint uri", {}, "spec.checkpoint.uri", drop=("spec.checkpoint.uri",)),
    Bad("no dataset sources", {"spec.dataset.sources": []}, "spec.dataset.sources"),
    # negative and zero counts
    Bad("zero nodes", {"spec.resources.nodes": 0}, "spec.resources.nodes"),
    Bad("negative GPUs", {"spec.resources.gpusPerNode": -1}, "spec.resources.gpusPerNode"),
    Bad("negative restarts", {"spec.runPolicy.maxRestarts": -1}, "spec.runPolicy.maxRestarts"),
    Bad("negative learning rate", {"spec.training.learningRate": -0.001}, "spec.training.learningRate"),
    Bad("zero keepLast", {"spec.checkpoint.keepLast": 0}, "spec.checkpoint.keepLast"),
    Bad("most data held out", {"spec.dataset.validationFraction": 0.7}, "spec.dataset.validationFraction"),
    # impossible batch arithmetic
    Bad(
        "global batch not a multiple of micro x world",
        {**GPU8, "spec.training.globalBatchSize": 12},
        "spec.training.globalBatchSize",
        rule=True,
    ),
    Bad(
        "global batch smaller than one micro batch",
        {"spec.training.microBatchSize": 4, "spec.training.globalBatchSize": 2},
        "spec.training.globalBatchSize",
        rule=True,
    ),
    Bad(
        "global batch ignores the second node",
        {"spec.resources.nodes": 2, "spec.training.globalBatchSize": 8},
        "spec.training.globalBatchSize",
        rule=True,
    ),
    # bad URIs
    Bad("http checkpoint uri", {"spec.checkpoint.uri": "http://store/ckpt"}, "spec.checkpoint.uri"),
    Bad("bucket with capitals", {"spec.checkpoint.uri": "s3://My_Bucket/ckpt"}, "spec.checkpoint.uri"),
    Bad(
        "relative file uri",
        {"spec.dataset.sources.0.uri": "file://data/x.jsonl"},
        "spec.dataset.sources[0].uri",
    ),
    Bad("model source with spaces", {"spec.model.source": "my model"}, "spec.model.source"),
    Bad("output to gcs scheme", {"spec.output.uri": "gs://out/final"}, "spec.output.uri"),
    Bad("resume from a made-up keyword", {"spec.checkpoint.resume": "earliest"}, "spec.checkpoint.resume"),
    Bad(
        "resume from a bucket name S3 does not allow",
        {"spec.checkpoint.resume": "s3://My_Bucket/ns/job/checkpoints/step-00000100"},
        "spec.checkpoint.resume",
    ),
    Bad("resume, unknown scheme", {"spec.checkpoint.resume": "gs://b/ns/job"}, "spec.checkpoint.resume"),
    Bad(
        "endpoint without scheme",
        {"spec.checkpoint.endpointUrl": "minio:9000"},
        "spec.checkpoint.endpointUrl",
    ),
    # cross-field rules
    Bad("lora settings on a full run", {"spec.training.lora": {"rank": 8}}, "spec.training.lora", rule=True),
    Bad(
        "epochs and maxSteps",
        {"spec.training.epochs": 2, "spec.training.maxSteps": 10},
        "spec.training.maxSteps",
        rule=True,
    ),
    Bad(
        "two warmups",
        {"spec.training.warmupSteps": 10, "spec.training.warmupRatio": 0.1},
        "spec.training.warmupRatio",
        rule=True,
    ),
    Bad(
        "flash-attention in fp32",
        {"spec.training.attentionImplementation": "flash_attention_2", "spec.training.precision": "fp32"},
        "spec.training.attentionImplementation",
        rule=True,
    ),
    Bad(
        "parameter offload below ZeRO-3",
        {"spec.deepspeed.offloadParameters": True},
        "spec.deepspeed.offloadParameters",
        rule=True,
    ),
    Bad(
        "optimizer offload without ZeRO",
        {"spec.deepspeed.zeroStage": 0, "spec.deepspeed.offloadOptimizer": True},
        "spec.deepspeed.offloadOptimizer",
        rule=True,
    ),
    Bad(
        "evaluation without held-out data",
        {"spec.training.evalEverySteps": 50, "spec.dataset.validationFraction": 0},
        "spec.training.evalEverySteps",
        rule=True,
    ),
    Bad(
        "backoff cap below base",
        {"spec.runPolicy.backoffBaseSeconds": 60, "spec.runPolicy.backoffCapSeconds": 30},
        "spec.runPolicy.backoffCapSeconds",
        rule=True,
    ),
    Bad(
        "user env overriding the node rank",
        {"spec.resources.env": [{"name": "NODE_RANK", "value": "0"}]},
        "spec.resources.env",
        rule=True,
    ),
    Bad(
        "user env with a storage credential",
        {"spec.resources.env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]},
        "spec.resources.env",
        rule=True,
    ),
    Bad(
        "env value and valueFrom",
        {"spec.resources.env": [{"name": "X", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]},
        "spec.resources.env[0].valueFrom",
        rule=True,
    ),
    Bad(
        "two processes per GPU",
        {"spec.resources.processesPerNode": 16},
        "spec.resources.processesPerNode",
        rule=True,
    ),
    Bad(
        "directory source without a format",
        {"spec.dataset.sources.0.uri": "s3://data/corpus/"},
        "spec.dataset.sources[0].format",
        rule=True,
    ),
    Bad(
        "no periodic checkpoints",
        {"spec.checkpoint.everySteps": 0, "spec.checkpoint.everyMinutes": 0},
        "spec.checkpoint.everySteps",
        rule=True,
    ),
    # objectives: what each needs and what cannot carry it
    Bad("dpo settings on an sft run", {"spec.training.dpo": {"beta": 0.2}}, "spec.training.dpo", rule=True),
    Bad(
        "distillation without its teacher settings",
        {"spec.training.objective": "distill"},
        "spec.training.distillation",
        rule=True,
    ),
    Bad(
        "a teacher on an sft run",
        {"spec.training.distillation": {"teacher": "s3://models/teacher"}},
        "spec.training.distillation",
        rule=True,
    ),
    Bad(
        "label smoothing with the ipo loss",
        {**DPO, "spec.training.dpo": {"lossType": "ipo", "labelSmoothing": 0.1}},
        "spec.training.dpo.labelSmoothing",
        rule=True,
    ),
    Bad("dpo on text records", {"spec.training.objective": "dpo"}, "spec.dataset.sources", rule=True),
    Bad(
        "preference pairs with objective sft",
        {"spec.dataset.sources.0.shape": "preference"},
        "spec.training.objective",
        rule=True,
    ),
    Bad("dpo with packing", {**DPO, "spec.dataset.packing": True}, "spec.dataset.packing", rule=True),
    Bad(
        "dpo pairs split into windows",
        {**DPO, "spec.dataset.overlength": "split"},
        "spec.dataset.overlength",
        rule=True,
    ),
    Bad(
        "a teacher at temperature zero",
        {
            "spec.training.objective": "distill",
            "spec.training.distillation": {"teacher": "s3://models/teacher", "temperature": 0},
        },
        "spec.training.distillation.temperature",
    ),
    Bad(
        "a divergence past reverse KL",
        {
            "spec.training.objective": "distill",
            "spec.training.distillation": {"teacher": "s3://models/teacher", "beta": 1.5},
        },
        "spec.training.distillation.beta",
    ),
    # model parallelism and QLoRA: what DeepSpeed's mechanisms cannot run
    Bad(
        "sequence and tensor parallel at once",
        {**GPU8, "spec.parallelism": {"sequence": 2, "tensor": 2}},
        "spec.parallelism.tensor",
        rule=True,
    ),
    Bad(
        "a sequence-parallel group wider than a node",
        {**GPU8, "spec.parallelism.sequence": 3},
        "spec.parallelism.sequence",
        rule=True,
    ),
    Bad(
        "a tensor-parallel group across nodes",
        {"spec.resources.gpusPerNode": 2, "spec.resources.nodes": 2, "spec.parallelism.tensor": 4},
        "spec.parallelism.tensor",
        rule=True,
    ),
    Bad(
        "tensor parallel on ZeRO-3",
        {**GPU8, "spec.parallelism.tensor": 2, "spec.deepspeed.zeroStage": 3},
        "spec.parallelism.tensor",
        rule=True,
    ),
    Bad(
        "sequence parallel with eager attention",
        {**GPU8, "spec.parallelism.sequence": 2, "spec.training.attentionImplementation": "eager"},
        "spec.training.attentionImplementation",
        rule=True,
    ),
    Bad(
        "sequence parallel packing under sdpa",
        {**GPU8, "spec.parallelism.sequence": 2, "spec.dataset.packing": True},
        "spec.dataset.packing",
        rule=True,
    ),
    Bad(
        "global batch counting model-parallel ranks as data-parallel",
        {
            **GPU8,
            "spec.parallelism.tensor": 8,
            "spec.training.microBatchSize": 4,
            "spec.training.globalBatchSize": 6,
        },
        "spec.training.globalBatchSize",
        rule=True,
    ),
    Bad(
        "a 4-bit base on ZeRO-3",
        {
            "spec.training.method": "lora",
            "spec.training.lora": {"quantization": "nf4"},
            "spec.deepspeed.zeroStage": 3,
        },
        "spec.training.lora.quantization",
        rule=True,
    ),
    Bad(
        "an unknown quantization",
        {"spec.training.method": "lora", "spec.training.lora": {"quantization": "int3"}},
        "spec.training.lora.quantization",
    ),
    Bad("parallel degree zero", {"spec.parallelism.sequence": 0}, "spec.parallelism.sequence"),
    Bad(
        "tensor parallel LoRA",
        {**GPU8, "spec.parallelism.tensor": 2, "spec.training.method": "lora"},
        "spec.parallelism.tensor",
        rule=True,
    ),
    Bad(
        "tensor parallel distillation",
        {
            **GPU8,
            "spec.parallelism.tensor": 2,
            "spec.training.objective": "distill",
            "spec.training.distillation": {"teacher": "s3://models/teacher"},
        },
        "spec.parallelism.tensor",
        rule=True,
    ),
    Bad(
        "tensor parallel with Liger kernels",
        {**GPU8, "spec.parallelism.tensor": 2, "spec.training.ligerKernels": True},
        "spec.parallelism.tensor",
        rule=True,
    ),
    Bad(
        "sequence parallel dpo",
        {**GPU8, **DPO, "spec.parallelism.sequence": 2},
        "spec.parallelism.sequence",
        rule=True,
    ),
    # enums
    Bad("fp8 precision", {"spec.training.precision": "fp8"}, "spec.training.precision"),
    Bad("ZeRO stage 4", {"spec.deepspeed.zeroStage": 4}, "spec.deepspeed.zeroStage"),
    Bad(
        "unknown clean pod policy",
        {"spec.runPolicy.cleanPodPolicy": "Sometimes"},
        "spec.runPolicy.cleanPodPolicy",
    ),
    Bad("unknown record shape", {"spec.dataset.sources.0.shape": "qa"}, "spec.dataset.sources[0].shape"),
    # volumes: Kubernetes' own schema (api/kubernetes.py), then the rules that tie them to the pod
    Bad(
        "volume source field misspelt",
        {"spec.resources.volumes": [{"name": "data", "persistentVolumeClaim": {"claim": "data"}}]},
        "spec.resources.volumes[0].persistentVolumeClaim",
    ),
    Bad(
        "nfs volume without a path",
        {"spec.resources.volumes": [{"name": "models", "nfs": {"server": "nfs.storage"}}]},
        "spec.resources.volumes[0].nfs.path",
    ),
    Bad(
        "unknown volume source",
        {"spec.resources.volumes": [{"name": "data", "lustre": {"fs": "x"}}]},
        "spec.resources.volumes[0].lustre",
    ),
    Bad(
        "volume readOnly as a string",
        {
            "spec.resources.volumes": [
                {"name": "d", "persistentVolumeClaim": {"claimName": "d", "readOnly": "yes"}}
            ]
        },
        "spec.resources.volumes[0].persistentVolumeClaim.readOnly",
    ),
    Bad(
        "volume name not a DNS label",
        {"spec.resources.volumes": [{"name": "Data_1", "emptyDir": {}}]},
        "spec.resources.volumes[0].name",
    ),
    Bad(
        "volume without a name",
        {"spec.resources.volumes": [{"emptyDir": {}}]},
        "spec.resources.volumes[0].name",
    ),
    Bad(
        "empty dir size not a quantity",
        {"spec.resources.volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "big"}}]},
        "spec.resources.volumes[0].emptyDir.sizeLimit",
    ),
    Bad(
        "volume with two sources",
        {"spec.resources.volumes": [{"name": "d", "emptyDir": {}, "nfs": {"server": "s", "path": "/p"}}]},
        "spec.resources.volumes",
        rule=True,
    ),
    Bad(
        "two volumes with one name",
        {"spec.resources.volumes": [PVC, PVC]},
        "spec.resources.volumes",
        rule=True,
    ),
    Bad(
        "volume taking the operator's name",
        {"spec.resources.volumes": [{"name": "finetune-scratch", "emptyDir": {}}]},
        "spec.resources.volumes",
        rule=True,
    ),
    Bad(
        "mount of an undeclared volume",
        _mounted({"name": "models", "mountPath": "/models"}),
        "spec.resources.volumeMounts",
        rule=True,
    ),
    Bad(
        "mount without a path",
        _mounted({"name": "data"}),
        "spec.resources.volumeMounts[0].mountPath",
    ),
    Bad("relative mount path", _mount_at("data"), "spec.resources.volumeMounts[0].mountPath"),
    Bad("mount over the config", _mount_at("/etc/finetune"), "spec.resources.volumeMounts", rule=True),
    Bad("mount under shared memory", _mount_at("/dev/shm/x"), "spec.resources.volumeMounts", rule=True),
    Bad("mount under scratch", _mount_at("/scratch/models"), "spec.resources.volumeMounts", rule=True),
    Bad("mount above the config", _mount_at("/etc"), "spec.resources.volumeMounts", rule=True),
    Bad("mount above with a slash", _mount_at("/dev/"), "spec.resources.volumeMounts", rule=True),
    Bad("mount at the root", _mount_at("/"), "spec.resources.volumeMounts", rule=True),
    Bad(
        "two mounts at one path",
        _mounted(
            {"name": "data", "mountPath": "/data"},
            {"name": "more", "mountPath": "/data"},
            volumes=(PVC, {"name": "more", "emptyDir": {}}),
        ),
        "spec.resources.volumeMounts",
        rule=True,
    ),
    Bad(
        "scratch size not a quantity", {"spec.resources.scratch.size": "huge"}, "spec.resources.scratch.size"
    ),
    Bad("negative scratch size", {"spec.resources.scratch.size": -1}, "spec.resources.scratch.size"),
    Bad("negative shared memory", {"spec.resources.shmSize": -1}, "spec.resources.shmSize"),
    Bad(
        "scratch storage class with capitals",
        {"spec.resources.scratch.storageClassName": "Fast_NVMe"},
        "spec.resources.scratch.storageClassName",
    ),
    Bad(
        "unknown scratch field", {"spec.resources.scratch.medium": "Memory"}, "spec.resources.scratch.medium"
    ),
    # pod metadata
    Bad(
        "label value too long",
        {"spec.resources.podMetadata.labels": {"team": "x" * 64}},
        "spec.resources.podMetadata.labels.team",
    ),
    Bad(
        "label value with a space",
        {"spec.resources.podMetadata.labels": {"team": "nlp research"}},
        "spec.resources.podMetadata.labels.team",
    ),
    Bad(
        "label value a number",
        {"spec.resources.podMetadata.labels": {"cost-center": 4711}},
        "spec.resources.podMetadata.labels.cost-center",
    ),
    Bad(
        "label key with a space",
        {"spec.resources.podMetadata.labels": {"my team": "nlp"}},
        "spec.resources.podMetadata.labels",
        rule=True,
    ),
    Bad(
        "annotation key with two slashes",
        {"spec.resources.podMetadata.annotations": {"a/b/c": "x"}},
        "spec.resources.podMetadata.annotations",
        rule=True,
    ),
    Bad(
        "label under the operator's group",
        {"spec.resources.podMetadata.labels": {"finetune.dev/job-name": "other"}},
        "spec.resources.podMetadata.labels",
        rule=True,
    ),
    Bad(
        "label the operator sets",
        {"spec.resources.podMetadata.labels": {"app.kubernetes.io/managed-by": "me"}},
        "spec.resources.podMetadata.labels",
        rule=True,
    ),
    Bad(
        "annotation under the operator's group",
        {"spec.resources.podMetadata.annotations": {"finetune.dev/attempt": "1"}},
        "spec.resources.podMetadata.annotations",
        rule=True,
    ),
    Bad(
        "annotations as a list",
        {"spec.resources.podMetadata.annotations": ["a=b"]},
        "spec.resources.podMetadata.annotations",
    ),
    # interconnect
    Bad(
        "extended resource without a domain",
        {"spec.resources.extendedResources": {"rdma": 1}},
        "spec.resources.extendedResources",
        rule=True,
    ),
    Bad(
        "extended resource in kubernetes.io",
        {"spec.resources.extendedResources": {"hugepages.kubernetes.io/x": 1}},
        "spec.resources.extendedResources",
        rule=True,
    ),
    Bad(
        "GPUs as an extended resource",
        {"spec.resources.extendedResources": {"nvidia.com/gpu": 8}},
        "spec.resources.extendedResources",
        rule=True,
    ),
    Bad(
        "zero RDMA devices",
        {"spec.resources.extendedResources": {"rdma/ib": 0}},
        "spec.resources.extendedResources.rdma/ib",
    ),
    Bad(
        "fractional RDMA devices",
        {"spec.resources.extendedResources": {"rdma/ib": "500m"}},
        "spec.resources.extendedResources.rdma/ib",
    ),
    Bad("host network as yes", {"spec.resources.hostNetwork": "yes"}, "spec.resources.hostNetwork"),
    Bad("IPC_LOCK as 1", {"spec.resources.ipcLock": 1}, "spec.resources.ipcLock"),
    # placement
    Bad(
        "topology key with a space",
        {"spec.placement.topologyKey": "my rack"},
        "spec.placement.topologyKey",
    ),
    Bad(
        "unknown topology policy",
        {"spec.placement.topologyKey": "rack", "spec.placement.topologyPolicy": "Always"},
        "spec.placement.topologyPolicy",
    ),
    # the hub token
    Bad("token secret as a bare name", {"spec.model.tokenSecret": "hf"}, "spec.model.tokenSecret"),
    Bad(
        "token secret without a name", {"spec.model.tokenSecret": {"key": "t"}}, "spec.model.tokenSecret.name"
    ),
    Bad(
        "token secret key with a slash",
        {"spec.model.tokenSecret": {"name": "hf", "key": "a/b"}},
        "spec.model.tokenSecret.key",
    ),
    Bad(
        "token as a literal value",
        {"spec.model.tokenSecret": {"name": "hf", "value": "hf_abc"}},
        "spec.model.tokenSecret.value",
    ),
    Bad(
        "hub token through env",
        {
            "spec.resources.env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}
            ]
        },
        "spec.resources.env",
        rule=True,
    ),
    # gang scheduling (spec.gang)
    Bad("gang scheduler unknown", {"spec.gang": {"scheduler": "Yunikorn"}}, "spec.gang.scheduler"),
    Bad("gang without a scheduler", {"spec.gang": {"queueName": "gpu"}}, "spec.gang.scheduler"),
    Bad("kueue without a queue", {"spec.gang": {"scheduler": "Kueue"}}, "spec.gang.queueName", rule=True),
    Bad(
        "queue name too long for a label",
        {"spec.gang": {"scheduler": "Kueue", "queueName": "q" * 64}},
        "spec.gang.queueName",
    ),
    Bad(
        "queue name with capitals",
        {"spec.gang": {"scheduler": "Volcano", "queueName": "GPU"}},
        "spec.gang.queueName",
    ),
    Bad(
        "coscheduling with a queue",
        {"spec.gang": {"scheduler": "Coscheduling", "queueName": "gpu"}},
        "spec.gang.queueName",
        rule=True,
    ),
    Bad(
        "schedule timeout for volcano",
        {"spec.gang": {"scheduler": "Volcano", "scheduleTimeoutSeconds": 60}},
        "spec.gang.scheduleTimeoutSeconds",
        rule=True,
    ),
    Bad(
        "schedule timeout zero",
        {"spec.gang": {"scheduler": "Coscheduling", "scheduleTimeoutSeconds": 0}},
        "spec.gang.scheduleTimeoutSeconds",
    ),
    Bad(
        "two schedulers named",
        {"spec.gang": {"scheduler": "Volcano"}, "spec.resources.schedulerName": "volcano"},
        "spec.resources.schedulerName",
        rule=True,
    ),
    Bad(
        "gang group label through pod metadata",
        {"spec.resources.podMetadata.labels": {"kueue.x-k8s.io/pod-group-name": "mine"}},
        "spec.resources.podMetadata.labels",
        rule=True,
    ),
    Bad(
        "queue label through pod metadata",
        {"spec.resources.podMetadata.labels": {"kueue.x-k8s.io/queue-name": "gpu"}},
        "spec.resources.podMetadata.labels",
        rule=True,
    ),
    Bad(
        "volcano group annotation through pod metadata",
        {"spec.resources.podMetadata.annotations": {"scheduling.k8s.io/group-name": "mine"}},
        "spec.resources.podMetadata.annotations",
        rule=True,
    ),
    # names
    Bad(
        "secret name with capitals",
        {"spec.checkpoint.credentialsSecret": "My_Secret"},
        "spec.checkpoint.credentialsSecret",
    ),
    Bad("job name too long for pod hostnames", {"metadata.name": "a" * 43}, "metadata.name"),
    Bad("job name starting with a digit", {"metadata.name": "8b-lora"}, "metadata.name"),
    Bad("namespace with capitals and an underscore", {"metadata.namespace": "Team_A"}, "metadata.namespace"),
    Bad("namespace longer than a label", {"metadata.namespace": "n" * 64}, "metadata.namespace"),
    # the object's header, as kubectl and the server read it
    Bad("no apiVersion", {}, "apiVersion", drop=("apiVersion",)),
    Bad("no kind", {}, "kind", drop=("kind",)),
    Bad("another API version", {"apiVersion": "finetune.dev/v1"}, "apiVersion"),
    Bad("kind in the wrong case", {"kind": "FinetuneJob"}, "kind"),
    # snake_case keys: the server drops (refuses) them, so the job would train at the default
    Bad("snake_case learning rate", {"spec.training.learning_rate": 0.0001}, "spec.training.learning_rate"),
    Bad("snake_case section", {"spec.run_policy": {"maxRestarts": 1}}, "spec.run_policy"),
    Bad("snake_case api version", {"api_version": "finetune.dev/v1alpha1"}, "api_version"),
    # quantities that are not a positive amount
    Bad("negative memory", {"spec.resources.memory": "-1Gi"}, "spec.resources.memory"),
    Bad("negative shared memory quantity", {"spec.resources.shmSize": "-16Gi"}, "spec.resources.shmSize"),
    Bad("zero memory", {"spec.resources.memory": 0}, "spec.resources.memory"),
    Bad("zero shared memory", {"spec.resources.shmSize": "0Gi"}, "spec.resources.shmSize"),
    Bad("zero scratch", {"spec.resources.scratch.size": "0"}, "spec.resources.scratch.size"),
    Bad("zero CPU", {"spec.resources.cpu": "0.0"}, "spec.resources.cpu"),
]


def _ids(case: Bad) -> str:
    return case.why.replace(" ", "-")


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_the_crd_refuses_it_naming_the_field(case: Bad, apiserver: FakeApiServer) -> None:
    admission = apiserver.admit(manifest(case.changes, drop=case.drop))
    assert not admission.allowed
    assert any(error.startswith(case.field) for error in admission.errors), admission.errors


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_the_models_refuse_it_naming_the_field(case: Bad) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_manifest(manifest(case.changes, drop=case.drop))
    lines = describe(caught.value)
    assert any(line.startswith(case.field) for line in lines), lines


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_ftjob_validate_refuses_it_naming_the_field_with_exit_2(
    case: Bad, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest(case.changes, drop=case.drop)))
    assert main(["validate", str(path)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert case.field in err and "Traceback" not in err, err


@pytest.mark.parametrize("case", [c for c in CASES if c.rule], ids=_ids)
def test_both_layers_give_the_same_message_for_a_rule(case: Bad, apiserver: FakeApiServer) -> None:
    data = manifest(case.changes, drop=case.drop)
    crd_messages = {
        e.split("Invalid value: ", 1)[1] for e in apiserver.admit(data).errors if e.startswith(case.field)
    }
    with pytest.raises(ValidationError) as caught:
        parse_manifest(data)
    model_messages = {
        line.split(": ", 1)[1] for line in describe(caught.value) if line.startswith(case.field + ":")
    }
    assert crd_messages & model_messages, (crd_messages, model_messages)


@pytest.mark.parametrize(
    ("key", "camel"),
    [("spec.training.learning_rate", "learningRate"), ("spec.run_policy", "runPolicy")],
)
def test_a_snake_case_key_is_refused_naming_its_camel_case_name(key: str, camel: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_manifest(manifest({key: {} if key.endswith("policy") else 0.0001}))
    assert any(
        line.startswith(f"{key}: ") and f"did you mean {camel}?" in line for line in describe(caught.value)
    )


def test_python_code_still_builds_models_by_field_name() -> None:
    resources = ResourcesSpec(gpus_per_node=8, shm_size="32Gi")
    assert resources.to_wire()["gpusPerNode"] == 8 and resources.to_wire()["shmSize"] == "32Gi"


@pytest.mark.parametrize(("key", "value"), [("apiVersion", "finetune.dev/v1alpha1"), ("kind", "FineTuneJob")])
def test_a_missing_header_field_names_the_value_it_must_have(key: str, value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_manifest(manifest(drop=(key,)))
    assert f"{key}: required field is missing; set {key}: {value}" in describe(caught.value)


@pytest.mark.parametrize("quantity", ["1", "500m", "16Gi", "0.5", ".5", "1e3", "+2Ki", 64])
def test_a_positive_quantity_passes_both_layers(quantity: object, apiserver: FakeApiServer) -> None:
    data = manifest({"spec.resources.memory": quantity})
    assert apiserver.admit(data).allowed
    assert validate_manifest(data).spec.resources.memory == quantity


def test_no_secret_value_is_echoed_in_an_error() -> None:
    data = manifest({"spec.resources.env": [{"name": "HF_TOKEN", "value": 12345}]})
    with pytest.raises(ValidationError) as caught:
        parse_manifest(data)
    assert "12345" not in "\n".join(describe(caught.value))


# What the new fields must still take: the rules above refuse collisions, not ordinary use.
GOOD = [
    {"spec.resources.podMetadata.labels": {"kueue.x-k8s.io/priority-class": "high", "team": ""}},
    {"spec.resources.podMetadata.annotations": {"sidecar.istio.io/inject": "false", "note": "a b/c"}},
    _mounted({"name": "data", "mountPath": "/data/train", "readOnly": True, "subPath": "v3"}),
    _mount_at("/etc/finetune-extra"),  # a sibling of the config directory, not under it
    _mount_at("/scratchpad"),
    {"spec.resources.volumes": [{"name": "tmp"}]},  # no source: the API server makes it an emptyDir
    {"spec.resources.volumes": [{"name": "hp", "hostPath": {"path": "/mnt/nvme", "type": "Directory"}}]},
    {
        "spec.resources.volumes": [
            {
                "name": "tok",
                "projected": {"sources": [{"serviceAccountToken": {"path": "t", "expirationSeconds": 3600}}]},
            }
        ]
    },
    {"spec.resources.extendedResources": {"rdma/rdma_shared_device_a": 1, "nvidia.com/hostdev": 8}},
    {
        "spec.placement.topologyKey": "cloud.provider.com/topology-block",
        "spec.placement.topologyPolicy": "Preferred",
    },
    {"spec.model.tokenSecret": {"name": "hf-token"}},
    {"spec.gang": {"scheduler": "Kueue", "queueName": "team-a-gpu"}},
    {"spec.gang": {"scheduler": "Volcano"}},
    {"spec.gang": {"scheduler": "Volcano", "queueName": "research", "schedulerName": "volcano-gpu"}},
    {"spec.gang": {"scheduler": "Coscheduling", "scheduleTimeoutSeconds": 300}},
    {"spec.gang": {"scheduler": "Kueue", "queueName": "gpu"}, "spec.resources.schedulerName": "my-sched"},
]


@pytest.mark.parametrize("changes", GOOD, ids=lambda c: "-".join(sorted(c)).replace("spec.", ""))
def test_ordinary_cluster_settings_pass_both_layers(
    changes: dict[str, Any], apiserver: FakeApiServer
) -> None:
    data = manifest(changes)
    admission = apiserver.admit(data)
    assert admission.allowed, admission.errors
    parse_manifest(data)
