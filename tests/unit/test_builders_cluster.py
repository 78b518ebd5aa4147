"""The rank pod on a real GPU cluster: user volumes and a sized scratch disk, pod labels and
annotations, RDMA devices, the host network, IPC_LOCK, rack-local placement and the hub token."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from finetune_operator import contract
from finetune_operator.builders import BuildContext, build_attempt, build_config_map, build_rank_pod

from tests.support.factories import job
from tests.support.versions import KUBERNETES_VERSIONS

CTX = BuildContext(default_image="registry.example/finetune-trainer:test")
PVC = {"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}
MOUNT = {"name": "datasets", "mountPath": "/data", "readOnly": True}


def _pod(changes: dict[str, Any] | None = None, attempt: int = 1, rank: int = 0) -> dict[str, Any]:
    return build_rank_pod(job(changes), attempt, rank, CTX)


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["spec"]["volumes"] if v["name"] == name)


def _env_entry(pod: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((e for e in _container(pod)["env"] if e["name"] == name), None)


class TestVolumes:
    def test_user_volumes_and_mounts_reach_the_pod_as_written(self) -> None:
        pod = _pod({"spec.resources.volumes": [PVC], "spec.resources.volumeMounts": [MOUNT]})
        assert _volume(pod, "datasets") == PVC
        assert _container(pod)["volumeMounts"][-1] == MOUNT

    def test_the_operators_own_mounts_stay_first_and_unchanged(self) -> None:
        pod = _pod({"spec.resources.volumes": [PVC], "spec.resources.volumeMounts": [MOUNT]})
        assert [m["mountPath"] for m in _container(pod)["volumeMounts"]] == [
            contract.CONFIG_DIR,
            contract.SHM_DIR,
            contract.SCRATCH_DIR,
            "/data",
        ]

    def test_nested_kubernetes_fields_keep_their_kubernetes_names(self) -> None:
        volume = {
            "name": "ca",
            "secret": {"secretName": "corp-ca", "items": [{"key": "ca.crt", "path": "ca.pem"}]},
        }
        pod = _pod({"spec.resources.volumes": [volume]})
        assert _volume(pod, "ca") == volume

    def test_volume_ownership_is_changed_only_when_the_root_does_not_match(self) -> None:
        # fsGroup's recursive chown runs at every pod start otherwise: minutes on a big dataset PVC.
        security = _pod({"spec.resources.volumes": [PVC]})["spec"]["securityContext"]
        assert security["fsGroup"] == contract.TRAINER_UID
        assert security["fsGroupChangePolicy"] == "OnRootMismatch"

    def test_scratch_is_a_size_limited_empty_dir_by_default(self) -> None:
        scratch = _volume(_pod(), contract.SCRATCH_VOLUME)
        assert scratch == {"name": contract.SCRATCH_VOLUME, "emptyDir": {"sizeLimit": "500Gi"}}

    def test_scratch_size_is_configurable(self) -> None:
        scratch = _volume(_pod({"spec.resources.scratch": {"size": "64Gi"}}), contract.SCRATCH_VOLUME)
        assert scratch["emptyDir"] == {"sizeLimit": "64Gi"}

    def test_scratch_with_a_storage_class_is_an_ephemeral_claim_of_that_size(self) -> None:
        changes = {"spec.resources.scratch": {"size": "2Ti", "storageClassName": "local-nvme"}}
        scratch = _volume(_pod(changes), contract.SCRATCH_VOLUME)
        claim = scratch["ephemeral"]["volumeClaimTemplate"]
        assert claim["spec"] == {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "local-nvme",
            "resources": {"requests": {"storage": "2Ti"}},
        }
        assert claim["metadata"]["labels"][contract.LABEL_JOB] == "demo"


class TestPodMetadata:
    def test_user_labels_and_annotations_reach_every_rank_pod(self) -> None:
        extra = {"labels": {"team": "nlp"}, "annotations": {"sidecar.istio.io/inject": "false"}}
        built = job({"spec.resources.nodes": 2, "spec.resources.podMetadata": extra})
        for obj in build_attempt(built, 1, CTX):
            if obj["kind"] == "Pod":
                assert obj["metadata"]["labels"]["team"] == "nlp"
                assert obj["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}

    def test_pod_metadata_stays_on_pods(self) -> None:
        extra = {"labels": {"team": "nlp"}, "annotations": {"a": "b"}}
        for obj in build_attempt(job({"spec.resources.podMetadata": extra}), 1, CTX):
            if obj["kind"] != "Pod":
                assert "team" not in obj["metadata"]["labels"] and "annotations" not in obj["metadata"]

    def test_the_operators_labels_win_over_the_users(self) -> None:
        # The API refuses such keys; the builder still never lets one move a pod out of its job.
        built = job({"spec.resources.podMetadata": {"labels": {"team": "nlp"}}})
        built.spec.resources.pod_metadata.labels[contract.LABEL_JOB] = "someone-else"
        built.spec.resources.pod_metadata.labels[contract.LABEL_ATTEMPT] = "99"
        labels = build_rank_pod(built, 2, 1, CTX)["metadata"]["labels"]
        assert labels[contract.LABEL_JOB] == "demo" and labels[contract.LABEL_ATTEMPT] == "2"
        assert labels["team"] == "nlp"

    def test_no_annotations_key_without_annotations(self) -> None:
        assert "annotations" not in _pod()["metadata"]


class TestInterconnect:
    def test_extended_resources_are_requested_and_limited(self) -> None:
        changes = {"spec.resources.extendedResources": {"rdma/ib": 1, "nvidia.com/hostdev": 8}}
        resources = _container(_pod(changes))["resources"]
        for name, count in (("rdma/ib", "1"), ("nvidia.com/hostdev", "8")):
            assert resources["requests"][name] == resources["limits"][name] == count
        assert resources["limits"]["nvidia.com/gpu"] == "8"

    def test_the_host_network_keeps_cluster_dns_for_the_rendezvous_name(self) -> None:
        pod = _pod({"spec.resources.hostNetwork": True, "spec.resources.nodes": 2}, attempt=3, rank=1)
        assert pod["spec"]["hostNetwork"] is True
        assert pod["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
        # The Service's DNS record for the pod still needs hostname and subdomain.
        assert pod["spec"]["hostname"] == "demo-a3-n1" and pod["spec"]["subdomain"] == "demo-ranks"
        assert _env_entry(pod, "MASTER_ADDR") == {
            "name": "MASTER_ADDR",
            "value": "demo-a3-n0.demo-ranks.team-a.svc",
        }

    def test_the_host_network_declares_the_rendezvous_port_as_a_host_port(self) -> None:
        (port,) = _container(_pod({"spec.resources.hostNetwork": True}))["ports"]
        assert port["hostPort"] == port["containerPort"] == contract.MASTER_PORT

    def test_pod_network_is_the_default(self) -> None:
        pod = _pod()
        assert "hostNetwork" not in pod["spec"] and "dnsPolicy" not in pod["spec"]
        assert "hostPort" not in _container(pod)["ports"][0]

    def test_ipc_lock_is_the_only_capability_added(self) -> None:
        security = _container(_pod({"spec.resources.ipcLock": True}))["securityContext"]
        assert security["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False

    def test_no_capability_without_ipc_lock(self) -> None:
        assert _container(_pod())["securityContext"]["capabilities"] == {"drop": ["ALL"]}


class TestPlacement:
    def test_a_required_topology_keeps_the_attempt_in_one_domain(self) -> None:
        pod = _pod({"spec.placement": {"topologyKey": "network.example.com/rack"}}, attempt=4)
        (term,) = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term == {
            "labelSelector": {"matchLabels": {contract.LABEL_JOB: "demo", contract.LABEL_ATTEMPT: "4"}},
            "topologyKey": "network.example.com/rack",
        }

    def test_the_term_selects_pods_the_rank_itself_matches(self) -> None:
        # Otherwise kube-scheduler's first-pod exception (the pod matches its own terms) would not
        # apply and the first rank of a required gang would never schedule.
        pod = _pod({"spec.placement": {"topologyKey": "rack"}}, attempt=2, rank=3)
        (term,) = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    def test_a_preferred_topology_is_a_weighted_preference(self) -> None:
        placement = {"topologyKey": "rack", "topologyPolicy": "Preferred"}
        affinity = _pod({"spec.placement": placement})["spec"]["affinity"]["podAffinity"]
        (preferred,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
        assert preferred["weight"] == 100 and preferred["podAffinityTerm"]["topologyKey"] == "rack"
        assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity

    def test_the_users_affinity_is_kept_and_extended(self) -> None:
        theirs = {"topologyKey": "zone", "labelSelector": {"matchLabels": {"app": "cache"}}}
        user = {
            "nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
            "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [theirs]},
        }
        built = job({"spec.resources.affinity": user, "spec.placement": {"topologyKey": "rack"}})
        affinity = build_rank_pod(built, 1, 0, CTX)["spec"]["affinity"]
        terms = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms[0] == theirs and terms[1]["topologyKey"] == "rack" and "nodeAffinity" in affinity
        assert built.spec.resources.affinity == user  # the job itself is not changed by building

    def test_no_topology_no_pod_affinity(self) -> None:
        assert "affinity" not in _pod()["spec"]


class TestHubToken:
    def test_the_token_is_a_secret_key_ref_under_the_name_the_hub_client_reads(self) -> None:
        pod = _pod({"spec.model.source": "meta-llama/Llama-3.1-8B", "spec.model.tokenSecret": {"name": "hf"}})
        assert _env_entry(pod, "HF_TOKEN") == {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN", "optional": False}},
        }

    def test_another_key_of_the_secret_can_be_named(self) -> None:
        pod = _pod({"spec.model.tokenSecret": {"name": "hub", "key": "token"}})
        entry = _env_entry(pod, contract.ENV_HF_TOKEN)
        assert entry is not None and entry["valueFrom"]["secretKeyRef"]["key"] == "token"

    def test_no_token_env_without_a_token_secret(self) -> None:
        assert _env_entry(_pod(), contract.ENV_HF_TOKEN) is None

    def test_the_config_map_does_not_even_name_the_token_secret(self) -> None:
        data = json.dumps(build_config_map(job({"spec.model.tokenSecret": {"name": "hf-gated"}}), 1))
        assert "hf-gated" not in data and "tokenSecret" not in data


def _cluster_fit() -> dict[str, Any]:
    """Every new knob at once, with both scratch kinds covered by the two variants below."""
    return {
        "spec.resources.nodes": 2,
        "spec.resources.volumes": [
            PVC,
            {"name": "models", "nfs": {"server": "nfs.storage", "path": "/export/models"}},
            {"name": "node-cache", "hostPath": {"path": "/mnt/nvme", "type": "Directory"}},
            {"name": "conf", "configMap": {"name": "extra", "defaultMode": 0o444}},
        ],
        "spec.resources.volumeMounts": [MOUNT, {"name": "models", "mountPath": "/models", "readOnly": True}],
        "spec.resources.podMetadata": {"labels": {"team": "nlp"}, "annotations": {"x/y": "z"}},
        "spec.resources.extendedResources": {"rdma/ib": 1},
        "spec.resources.hostNetwork": True,
        "spec.resources.ipcLock": True,
        "spec.placement": {"topologyKey": "rack", "topologyPolicy": "Preferred"},
        "spec.model.tokenSecret": {"name": "hf"},
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scratch", [{}, {"storageClassName": "local-nvme", "size": "1Ti"}])
def test_cluster_fit_objects_pass_kubernetes_validate_strict(version: str, scratch: dict[str, Any]) -> None:
    for obj in build_attempt(job({**_cluster_fit(), "spec.resources.scratch": scratch}), 1, CTX):
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_local_run_takes_the_hub_token_from_the_callers_environment(tmp_path: Any) -> None:
    """`ftjob run` has no Secret to read: the rank process gets HF_TOKEN from the environment it was
    started in, and the secretKeyRef (which only a kubelet can resolve) is left out."""
    from finetune_operator.backends.local import LocalBackend

    backend = LocalBackend(tmp_path, base_env={"HF_TOKEN": "hf_from_my_shell", "PATH": "/usr/bin"})
    _, env = backend.rank_process(job({"spec.model.tokenSecret": {"name": "hf"}}), 1, 0, port=29511)
    assert env["HF_TOKEN"] == "hf_from_my_shell"
    assert not any(isinstance(v, dict) for v in env.values())
