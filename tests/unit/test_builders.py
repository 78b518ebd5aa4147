"""Pure builders: what one attempt of a job becomes in the cluster, following the pod contract."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from finetune_operator import contract
from finetune_operator.api import TrainerConfig
from finetune_operator.builders import (
    BuildContext,
    build_attempt,
    build_config_map,
    build_network_policy,
    build_rank_pod,
    build_service,
)

from tests.support.factories import job
from tests.support.versions import KUBERNETES_VERSIONS

CTX = BuildContext(default_image="registry.example/finetune-trainer:test")
SECRET_VALUE = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def _everything() -> dict[str, Any]:
    """A job using every optional knob, so validation covers every branch of the builders."""
    return {
        "spec.resources.nodes": 2,
        "spec.resources.cpu": "32",
        "spec.resources.memory": "256Gi",
        "spec.resources.image": "trainer:custom",
        "spec.resources.imagePullSecrets": ["regcred"],
        "spec.resources.nodeSelector": {"gpu": "h100"},
        "spec.resources.tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ],
        "spec.resources.affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        "spec.resources.priorityClassName": "training",
        "spec.resources.schedulerName": "volcano",
        "spec.resources.serviceAccountName": "trainer",
        "spec.resources.env": [
            {"name": "NCCL_IB_HCA", "value": "mlx5"},
            {"name": "TEAM_TOKEN", "valueFrom": {"secretKeyRef": {"name": "team", "key": "token"}}},
        ],
        "spec.resources.volumes": [
            {"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
            {"name": "models", "nfs": {"server": "nfs.storage", "path": "/export/models", "readOnly": True}},
            {"name": "weights", "csi": {"driver": "s3.csi.aws.com", "volumeAttributes": {"bucket": "w"}}},
            {"name": "ca", "secret": {"secretName": "corp-ca", "defaultMode": 0o444}},
            {"name": "local-cache", "hostPath": {"path": "/mnt/nvme/cache", "type": "DirectoryOrCreate"}},
            {
                "name": "staging",
                "ephemeral": {
                    "volumeClaimTemplate": {
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": "100Gi"}},
                        }
                    }
                },
            },
        ],
        "spec.resources.volumeMounts": [
            {"name": "datasets", "mountPath": "/data", "readOnly": True},
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "ca", "mountPath": "/etc/ssl/corp", "readOnly": True},
        ],
        "spec.resources.scratch": {"size": "2Ti", "storageClassName": "local-nvme"},
        "spec.resources.podMetadata": {
            "labels": {"team": "nlp", "kueue.x-k8s.io/priority-class": "gpu"},
            "annotations": {"sidecar.istio.io/inject": "false", "cost-center": "4711"},
        },
        "spec.resources.extendedResources": {"rdma/ib": 1, "nvidia.com/hostdev": 8},
        "spec.resources.hostNetwork": True,
        "spec.resources.ipcLock": True,
        "spec.placement": {"topologyKey": "network.example.com/block", "topologyPolicy": "Required"},
        "spec.model.tokenSecret": {"name": "hf-token", "key": "token"},
        "spec.checkpoint.credentialsSecret": "s3-creds",
        "spec.checkpoint.endpointUrl": "https://minio.storage:9000",
        "spec.checkpoint.region": "eu-west-1",
    }


class TestRankPods:
    def test_one_pod_per_node_rank_with_deterministic_names(self) -> None:
        objects = build_attempt(job({"spec.resources.nodes": 3}), attempt=2, ctx=CTX)
        pods = [o for o in objects if o["kind"] == "Pod"]
        assert [p["metadata"]["name"] for p in pods] == ["demo-a2-n0", "demo-a2-n1", "demo-a2-n2"]

    def test_building_twice_gives_identical_objects(self) -> None:
        assert build_attempt(job(_everything()), 3, CTX) == build_attempt(job(_everything()), 3, CTX)

    @pytest.mark.parametrize("attempt", [1, 2, 7])
    def test_master_addr_is_rank_zero_of_this_attempt(self, attempt: int) -> None:
        pod = build_rank_pod(job({"spec.resources.nodes": 4}), attempt, 3, CTX)
        assert _env(pod)["MASTER_ADDR"] == f"demo-a{attempt}-n0.demo-ranks.team-a.svc"
        assert pod["spec"]["hostname"] == f"demo-a{attempt}-n3"
        assert pod["spec"]["subdomain"] == "demo-ranks"

    def test_rendezvous_env_follows_the_contract(self) -> None:
        env = _env(build_rank_pod(job({"spec.resources.nodes": 4}), 1, 2, CTX))
        assert env["NNODES"] == "4" and env["NPROC_PER_NODE"] == "8" and env["NODE_RANK"] == "2"
        assert env["MASTER_PORT"] == str(contract.MASTER_PORT)
        assert (
            env["FTJOB_NAME"] == "demo" and env["FTJOB_NAMESPACE"] == "team-a" and env["FTJOB_ATTEMPT"] == "1"
        )
        assert "FTJOB_CHECKPOINT_URI" not in env  # the trainer reads its store from its config
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) < 600

    def test_ranks_are_killed_only_after_the_grace_period_less_a_margin(self) -> None:
        pod = build_rank_pod(job({"spec.runPolicy.terminationGracePeriodSeconds": 60}), 1, 0, CTX)
        env = {e["name"]: e.get("value") for e in _container(pod)["env"]}
        assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) == 60 - contract.SHUTDOWN_MARGIN_SECONDS
        assert pod["spec"]["terminationGracePeriodSeconds"] == 60

    def test_command_is_torchrun_through_the_launcher_over_the_contract_env(self) -> None:
        command = _container(build_rank_pod(job(), 1, 0, CTX))["command"]
        assert command[:3] == ["python", "-m", "finetune_trainer.launch"]
        assert "--rdzv-backend=c10d" in command and "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)" in command
        assert "--rdzv-id=$(FTJOB_NAME)-$(FTJOB_ATTEMPT)" in command  # no rank meets a stale gang
        assert "--max-restarts=$(FTJOB_IN_PLACE_RESTARTS)" in command
        assert command[-4:] == ["-m", "finetune_trainer", "--config", contract.CONFIG_PATH]

    def test_in_place_restarts_are_what_is_left_of_the_application_budget(self) -> None:
        fresh = _env(build_rank_pod(job({"spec.runPolicy.maxRestarts": 5}), 1, 0, CTX))
        assert fresh[contract.ENV_IN_PLACE_RESTARTS] == "3"  # runPolicy.inPlaceRestarts' default
        assert len(fresh[contract.ENV_IN_PLACE_BACKOFF].split(",")) == 3
        spent = job({"spec.runPolicy.maxRestarts": 5, "status": {"restarts": 4}})
        assert _env(build_rank_pod(spent, 2, 0, CTX))[contract.ENV_IN_PLACE_RESTARTS] == "1"
        off = job({"spec.runPolicy.inPlaceRestarts": 0})
        assert _env(build_rank_pod(off, 1, 0, CTX))[contract.ENV_IN_PLACE_RESTARTS] == "0"

    def test_in_place_backoff_continues_the_application_count(self) -> None:
        env = _env(
            build_rank_pod(
                job({"spec.runPolicy.backoffBaseSeconds": 10, "spec.runPolicy.backoffCapSeconds": 3600}),
                1,
                0,
                CTX,
            )
        )
        delays = [float(s) for s in env[contract.ENV_IN_PLACE_BACKOFF].split(",")]
        assert delays[0] < delays[1] < delays[2] <= 3600  # doubling, jittered (policy/backoff.py)

    @pytest.mark.parametrize("gpus", [1, 8])
    def test_gpu_count_is_requested_and_limited(self, gpus: int) -> None:
        resources = _container(build_rank_pod(job({"spec.resources.gpusPerNode": gpus}), 1, 0, CTX))[
            "resources"
        ]
        assert resources["requests"]["nvidia.com/gpu"] == str(gpus) == resources["limits"]["nvidia.com/gpu"]

    def test_cpu_jobs_request_no_gpu_and_run_one_process_per_node(self) -> None:
        pod = build_rank_pod(job({"spec.resources.gpusPerNode": 0}), 1, 0, CTX)
        assert "nvidia.com/gpu" not in str(_container(pod).get("resources"))
        assert _env(pod)["NPROC_PER_NODE"] == "1"

    def test_cpu_jobs_tell_deepspeed_to_use_the_cpu_unless_the_user_chose(self) -> None:
        assert (
            _env(build_rank_pod(job({"spec.resources.gpusPerNode": 0}), 1, 0, CTX))["DS_ACCELERATOR"] == "cpu"
        )
        assert "DS_ACCELERATOR" not in _env(build_rank_pod(job(), 1, 0, CTX))
        chosen = job(
            {
                "spec.resources.gpusPerNode": 0,
                "spec.resources.env": [{"name": "DS_ACCELERATOR", "value": "xpu"}],
            }
        )
        assert [
            e for e in _container(build_rank_pod(chosen, 1, 0, CTX))["env"] if e["name"] == "DS_ACCELERATOR"
        ] == [{"name": "DS_ACCELERATOR", "value": "xpu"}]

    def test_another_gpu_resource_name_is_honoured(self) -> None:
        pod = build_rank_pod(job({"spec.resources.gpuResourceName": "amd.com/gpu"}), 1, 0, CTX)
        assert _container(pod)["resources"]["limits"] == {"amd.com/gpu": "8"}

    def test_memory_is_limited_but_cpu_is_not(self) -> None:
        resources = _container(build_rank_pod(job(_everything()), 1, 0, CTX))["resources"]
        assert resources["requests"]["cpu"] == "32" and "cpu" not in resources["limits"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"] == "256Gi"

    def test_shm_is_a_memory_volume_of_the_requested_size(self) -> None:
        pod = build_rank_pod(job({"spec.resources.shmSize": "32Gi"}), 1, 0, CTX)
        shm = next(v for v in pod["spec"]["volumes"] if v["name"] == contract.SHM_VOLUME)
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
        assert {"name": contract.SHM_VOLUME, "mountPath": "/dev/shm"} in _container(pod)["volumeMounts"]

    def test_config_comes_from_this_attempts_config_map(self) -> None:
        pod = build_rank_pod(job(), 4, 0, CTX)
        config = next(v for v in pod["spec"]["volumes"] if v["name"] == contract.CONFIG_VOLUME)
        assert config["configMap"]["name"] == "demo-a4-config"

    def test_security_context_is_non_root_without_escalation(self) -> None:
        pod = build_rank_pod(job(), 1, 0, CTX)
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        container = _container(pod)["securityContext"]
        assert container["allowPrivilegeEscalation"] is False and container["privileged"] is False
        assert container["capabilities"] == {"drop": ["ALL"]}

    def test_trainer_pods_hold_no_cluster_credentials(self) -> None:
        pod = build_rank_pod(job(_everything()), 1, 0, CTX)
        assert pod["spec"]["automountServiceAccountToken"] is False

    def test_labels_name_job_attempt_and_rank(self) -> None:
        labels = build_rank_pod(job(), 3, 1, CTX)["metadata"]["labels"]
        assert labels[contract.LABEL_JOB] == "demo"
        assert labels[contract.LABEL_ATTEMPT] == "3" and labels[contract.LABEL_RANK] == "1"

    def test_the_job_owns_every_child(self) -> None:
        for obj in build_attempt(job(uid="1234-uid"), 1, CTX):
            (owner,) = obj["metadata"]["ownerReferences"]
            assert (
                owner["kind"] == "FineTuneJob" and owner["uid"] == "1234-uid" and owner["controller"] is True
            )

    def test_a_job_never_stored_in_a_cluster_owns_nothing(self) -> None:
        for obj in build_attempt(job(uid=None), 1, CTX):
            assert "ownerReferences" not in obj["metadata"]

    def test_image_falls_back_to_the_installation_default(self) -> None:
        assert _container(build_rank_pod(job(), 1, 0, CTX))["image"] == CTX.default_image
        assert _container(build_rank_pod(job(_everything()), 1, 0, CTX))["image"] == "trainer:custom"

    def test_placement_knobs_reach_the_pod(self) -> None:
        spec = build_rank_pod(job(_everything()), 1, 0, CTX)["spec"]
        assert spec["nodeSelector"] == {"gpu": "h100"}
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert "nodeAffinity" in spec["affinity"]
        assert spec["priorityClassName"] == "training" and spec["schedulerName"] == "volcano"
        assert spec["serviceAccountName"] == "trainer" and spec["imagePullSecrets"] == [{"name": "regcred"}]

    def test_storage_credentials_come_only_from_the_named_secret(self) -> None:
        env = _env(build_rank_pod(job(_everything()), 1, 0, CTX))
        for key in contract.REQUIRED_SECRET_KEYS:
            assert env[key] == {"secretKeyRef": {"name": "s3-creds", "key": key, "optional": False}}
        assert env["AWS_SESSION_TOKEN"]["secretKeyRef"]["optional"] is True
        assert env["AWS_ENDPOINT_URL_S3"] == "https://minio.storage:9000"

    def test_user_env_comes_after_the_contract(self) -> None:
        names = [e["name"] for e in _container(build_rank_pod(job(_everything()), 1, 0, CTX))["env"]]
        assert names[-2:] == ["NCCL_IB_HCA", "TEAM_TOKEN"]

    def test_a_credential_value_never_appears_in_any_built_object(self) -> None:
        # The spec holds only the Secret's name; whatever the Secret holds never passes through here.
        built = json.dumps(build_attempt(job(_everything()), 1, CTX))
        assert SECRET_VALUE not in built
        assert "s3-creds" in built and "secretKeyRef" in built


class TestServiceAndConfigMap:
    def test_service_is_headless_and_publishes_unready_ranks(self) -> None:
        svc = build_service(job())
        assert svc["metadata"]["name"] == "demo-ranks"
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        assert svc["spec"]["selector"] == {contract.LABEL_JOB: "demo"}

    def test_config_map_is_immutable_and_per_attempt(self) -> None:
        cm = build_config_map(job(), 5)
        assert cm["metadata"]["name"] == "demo-a5-config" and cm["immutable"] is True
        assert cm["metadata"]["labels"][contract.LABEL_ATTEMPT] == "5"

    def test_config_map_holds_what_the_trainer_reads(self) -> None:
        data = build_config_map(job({"spec.resources.nodes": 2, "spec.training.globalBatchSize": 64}), 1)[
            "data"
        ]
        config = TrainerConfig.model_validate_json(data[contract.CONFIG_FILE_NAME])
        assert config.world.world_size == 16
        assert config.schedule.gradient_accumulation_steps == 4
        assert config.checkpoint.job_uri == "s3://checkpoints/runs/team-a/demo"

    def test_config_map_never_names_credentials(self) -> None:
        data = json.dumps(build_config_map(job(_everything()), 1))
        assert "s3-creds" not in data and "credentials" not in data.lower()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", ["minimal", "everything", "cpu"])
def test_every_built_object_passes_kubernetes_validate_strict(version: str, variant: str) -> None:
    changes = {"minimal": {}, "everything": _everything(), "cpu": {"spec.resources.gpusPerNode": 0}}[variant]
    for obj in build_attempt(job(changes), 1, CTX):
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_network_policy_admits_only_the_jobs_own_pods_on_every_port(version: str) -> None:
    policy = build_network_policy(job(name="demo"))
    kubernetes_validate.validate(policy, version, strict=True)
    own = {"matchLabels": {contract.LABEL_JOB: "demo"}}
    assert policy["spec"]["podSelector"] == own
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open: DNS, storage, model source
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": own}]}]  # no ports: NCCL's are ephemeral


def test_kubernetes_validate_refuses_an_unknown_pod_field() -> None:
    """The negative control: strict validation is really strict, so the checks above mean something."""
    pod = build_rank_pod(job(), 1, 0, CTX)
    pod["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[0], strict=True)


def test_an_event_names_the_job_it_is_about_and_is_cut_to_the_api_servers_limit() -> None:
    from datetime import UTC, datetime

    from finetune_operator.builders.events import EVENT_MESSAGE_LIMIT, build_event
    from finetune_operator.policy.actions import Event

    j = job()
    body = build_event(
        j,
        Event("Warning", "RankFailed", "x" * 5000),
        now=datetime(2026, 1, 1, 12, 0, tzinfo=UTC),
        suffix="0123456789abcdef",
        instance="operator-0",
    )
    assert body["metadata"] == {
        "name": f"{j.metadata.name}.0123456789abcdef",
        "namespace": j.metadata.namespace,
    }
    assert body["involvedObject"]["uid"] == j.metadata.uid and body["involvedObject"]["kind"] == contract.KIND
    assert len(body["message"]) == EVENT_MESSAGE_LIMIT
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-01-01T12:00:00Z"
