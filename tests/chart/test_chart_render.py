"""The chart as Helm renders it: valid objects for every supported Kubernetes version, a hardened
operator pod, and the pieces each value combination promises."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest

from tests.support.chart import CHART_DIR, VARIANTS, crds, notes, of_kind, render
from tests.support.versions import KUBERNETES_VERSIONS

# Custom resources kubernetes-validate has no schema for; each is checked against its own CRD below.
CUSTOM_KINDS = {"ServiceMonitor", "ClusterKopfPeering", "KopfPeering"}


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = of_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_passes_kubernetes_validate_strict(variant: str, version: str) -> None:
    for obj in render(VARIANTS[variant]):
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_charts_crds_are_valid_for_every_supported_version(version: str) -> None:
    for crd in crds():
        kubernetes_validate.validate(crd, version, strict=True)


@pytest.mark.parametrize("variant", ["two-replicas", "two-replicas-namespaced"])
def test_peering_objects_match_the_peering_crds_shipped_with_the_chart(variant: str) -> None:
    schemas = {
        c["spec"]["names"]["kind"]: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for c in crds()
    }
    peerings = [o for o in render(VARIANTS[variant]) if o["kind"] in ("ClusterKopfPeering", "KopfPeering")]
    assert peerings
    for obj in peerings:
        assert obj["apiVersion"] == "kopf.dev/v1"
        jsonschema.validate(obj, schemas[obj["kind"]])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_finds_no_warnings_or_errors(variant: str) -> None:
    report = helm.lint(CHART_DIR, VARIANTS[variant], strict=True, kube_version="v1.29.0")
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and serious == [], report


def test_the_operator_pod_is_non_root_read_only_without_capabilities_under_runtime_default_seccomp() -> None:
    objects = render()
    pod = of_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = _container(objects)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert _container(objects)["resources"]["requests"] and _container(objects)["resources"]["limits"]


def test_liveness_and_readiness_probe_the_endpoint_the_operator_is_told_to_serve() -> None:
    container = _container(render({"operator": {"healthPort": 8181}}))
    assert "--liveness=http://0.0.0.0:8181/healthz" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert ports["health"] == 8181


def test_operator_settings_reach_the_environment_the_operator_reads() -> None:
    container = _container(render({"operator": {"workers": 3}, "trainer": {"image": "r.example/t:2"}}))
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FTJOB_WORKERS"] == "3"
    assert env["FTJOB_DEFAULT_IMAGE"] == "r.example/t:2"
    assert env["FTJOB_METRICS_PORT"] == "9090"
    assert env["FTJOB_NETWORK_POLICY"] == "false"


def test_one_replica_runs_standalone_and_never_overlaps_itself_in_a_rollout() -> None:
    objects = render()
    assert "--standalone" in _container(objects)["args"]
    assert of_kind(objects, "Deployment")[0]["spec"]["strategy"] == {"type": "Recreate"}
    assert not of_kind(objects, "ClusterKopfPeering")


def test_two_replicas_share_one_peering_object_and_elect_through_it() -> None:
    objects = render(VARIANTS["two-replicas"])
    (peering,) = of_kind(objects, "ClusterKopfPeering")
    assert f"--peering={peering['metadata']['name']}" in _container(objects)["args"]
    assert of_kind(objects, "Deployment")[0]["spec"]["replicas"] == 2


def test_namespaced_install_watches_only_its_namespaces_with_a_peering_object_in_each() -> None:
    objects = render({"watchNamespaces": ["team-a", "team-b"], "replicaCount": 2})
    args = _container(objects)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    assert {p["metadata"]["namespace"] for p in of_kind(objects, "KopfPeering")} == {"team-a", "team-b"}


def test_cluster_wide_install_watches_all_namespaces() -> None:
    assert "--all-namespaces" in _container(render())["args"]


def test_metrics_service_selects_the_operator_pod_on_its_metrics_port() -> None:
    objects = render()
    (service,) = of_kind(objects, "Service")
    pod_labels = of_kind(objects, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert any(p["name"] == "metrics" for p in _container(objects)["ports"])


def test_metrics_off_means_no_service_and_no_metrics_endpoint() -> None:
    objects = render(VARIANTS["metrics-off"])
    assert not of_kind(objects, "Service")
    assert {"name": "FTJOB_METRICS_PORT", "value": "0"} in _container(objects)["env"]


def test_service_monitor_scrapes_the_metrics_service() -> None:
    objects = render(VARIANTS["service-monitor"])
    (monitor,) = of_kind(objects, "ServiceMonitor")
    (service,) = of_kind(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prom"


def test_network_policy_admits_only_health_and_the_named_scrapers_and_turns_on_per_job_policies() -> None:
    objects = render(VARIANTS["network-policy"])
    (policy,) = of_kind(objects, "NetworkPolicy")
    rules = policy["spec"]["ingress"]
    assert [r["ports"][0]["port"] for r in rules] == ["health", "metrics"]
    assert rules[1]["from"] == VARIANTS["network-policy"]["networkPolicy"]["metricsFrom"]
    assert {"name": "FTJOB_NETWORK_POLICY", "value": "true"} in _container(objects)["env"]


def test_an_existing_service_account_is_used_and_not_created() -> None:
    objects = render(VARIANTS["existing-service-account"])
    assert not of_kind(objects, "ServiceAccount")
    pod = of_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ftjob-operator"


def test_no_existing_service_account_named_is_refused_naming_the_value() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"serviceAccount\.name"):
        render({"serviceAccount": {"create": False}})


def test_notes_tell_the_user_the_next_commands() -> None:
    text = notes()
    assert "rollout status deployment/" in text
    assert "create secret generic" in text and "get ftj -w" in text
