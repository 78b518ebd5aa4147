"""The chart grants the operator exactly what it calls. The calls are recorded from the real operator
(kopf and the reconcile, peering on, per-job NetworkPolicies on) running a job through its whole
life against the emulator: start, a rank failure, a gang restart, progress reads, success, cleanup
and TTL deletion. A grant nobody uses, or a call nobody granted, fails the test."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator import contract

from tests.support.chart import VARIANTS, of_kind, render
from tests.support.cluster import CONFIGMAPS
from tests.support.factories import manifest
from tests.support.gangs import KueueStandIn, PodGroupStandIn
from tests.support.kubelet import Rank, script
from tests.support.operator import operator_env, with_settings

Grant = tuple[str, str, str]  # (apiGroup, resource, verb)
GROUPS = {
    contract.PLURAL: contract.API_GROUP,
    f"{contract.PLURAL}/status": contract.API_GROUP,
    "customresourcedefinitions": "apiextensions.k8s.io",
    "clusterkopfpeerings": "kopf.dev",
    "kopfpeerings": "kopf.dev",
    "networkpolicies": "networking.k8s.io",
    "pods": "",
    "pods/log": "",
    "services": "",
    "configmaps": "",
    "events": "",
    "namespaces": "",
}
PEERING = "ftjob-finetune-operator"
# Namespaced mode only: kopf lists and watches the namespaces it is told to serve (its
# namespace_observer). Not recordable here: KMock answers GET /api/v1/namespaces with a 500.
NAMESPACED_MODE_EXTRA = {("", "namespaces", "list"), ("", "namespaces", "watch")}


# spec.gang options: the API group of the PodGroups each one makes the operator manage (Kueue: none),
# and the chart values that grant them.
GANG_GROUPS = {"Kueue": None, "Volcano": "scheduling.volcano.sh", "Coscheduling": "scheduling.x-k8s.io"}
GANG_VALUES: dict[str, dict[str, Any]] = {
    "Kueue": {},
    "Volcano": {"gangScheduling": {"volcano": {"enabled": True}}},
    "Coscheduling": {"gangScheduling": {"coscheduling": {"enabled": True}}},
}


async def _record_a_whole_job_life(gang: str | None = None) -> set[Grant]:
    behaviour = script(
        a1n1=Rank(exit_code=1, after=2.0, message="RuntimeError at step 3"),
        a1n0=Rank(exit_code=75, after=2.5),  # its peer died: its collective times out
        default=Rank(exit_code=0, after=2.0),
    )
    job = manifest(
        {
            "spec.resources.nodes": 2,
            "spec.runPolicy.backoffBaseSeconds": 1,
            "spec.runPolicy.backoffCapSeconds": 1,
            "spec.runPolicy.ttlSecondsAfterFinished": 0,
            **(
                {
                    "spec.gang": {"scheduler": gang, "queueName": "gpu"}
                    if gang == "Kueue"
                    else {"scheduler": gang}
                }
                if gang
                else {}
            ),
        },
        name="rbac",
        namespace="team-a",
    )
    async with operator_env(behaviour) as k8s:
        if gang == "Kueue":
            KueueStandIn(k8s.cluster, k8s.kubelet, admit_whole_groups=True)
        elif gang is not None:
            PodGroupStandIn(k8s.cluster, k8s.kubelet, gang, admit_at_once=True)
        peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}
        async with k8s.session.post(f"{k8s.url}/apis/kopf.dev/v1/clusterkopfpeerings", json=peering) as r:
            assert r.status in (200, 201), await r.text()
        # An earlier job of the same name left its attempt ConfigMap for the garbage collector:
        # the operator reads its owner (configmaps get) and waits until it is gone.
        stale = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "rbac-a1-config",
                "namespace": "team-a",
                "ownerReferences": [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                     "name": "rbac", "uid": "an-earlier-incarnation", "controller": True}],
            },
        }  # fmt: skip
        async with k8s.session.post(f"{k8s.url}/api/v1/namespaces/team-a/configmaps", json=stale) as r:
            assert r.status in (200, 201), await r.text()
        await k8s.start_operator(with_settings(network_policy=True), peering=PEERING)
        await k8s.apply(job)
        await k8s.eventually(
            lambda: any(c.resource == "configmaps" and c.verb == "get" for c in k8s.cluster.calls),
            what="the stale ConfigMap's owner read",
        )
        await k8s.cluster.remove(CONFIGMAPS, "team-a", "rbac-a1-config")  # the collector catches up
        await k8s.eventually(lambda: len(k8s.pods("rbac")) == 2, what="attempt 1 running")
        await k8s.eventually(
            lambda: k8s.job("team-a", "rbac") is None, timeout=40, what="job succeeded and deleted by its TTL"
        )
        # Requests without a resource are API discovery (/api, /apis/...), which every authenticated
        # identity may read (the built-in system:discovery role): nothing to grant.
        calls = [c for c in k8s.cluster.calls if "kubectl" not in c.agent and c.resource]
    groups = {**GROUPS, **({"podgroups": GANG_GROUPS[gang]} if gang and GANG_GROUPS[gang] else {})}
    unknown = {c.resource for c in calls} - groups.keys()
    assert not unknown, f"the operator called resources this test cannot place in an API group: {unknown}"
    return {(groups[c.resource], c.resource, c.verb) for c in calls}


def granted(objects: list[dict[str, Any]], kinds: tuple[str, ...]) -> set[Grant]:
    rules = [rule for obj in objects if obj["kind"] in kinds for rule in obj["rules"]]
    for rule in rules:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], f"wildcard in {rule}"
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


@pytest.fixture(scope="module")
def recorded() -> set[Grant]:
    import asyncio

    return asyncio.run(_record_a_whole_job_life())


def test_the_recording_saw_the_whole_life_of_a_job(recorded: set[Grant]) -> None:
    """The negative control: the scenario really exercised restarts, progress reads and the TTL."""
    for grant in [
        ("", "pods", "delete"),
        ("", "pods/log", "get"),
        ("", "configmaps", "delete"),
        ("", "configmaps", "get"),
        (contract.API_GROUP, contract.PLURAL, "delete"),
        ("networking.k8s.io", "networkpolicies", "create"),
        ("kopf.dev", "clusterkopfpeerings", "patch"),
    ]:
        assert grant in recorded, grant


def test_cluster_wide_rbac_grants_exactly_the_recorded_calls(recorded: set[Grant]) -> None:
    objects = render({**VARIANTS["two-replicas"], "networkPolicy": {"enabled": True}})
    assert granted(objects, ("ClusterRole",)) == recorded


def test_without_network_policies_or_peering_those_rights_are_not_granted(recorded: set[Grant]) -> None:
    optional = {g for g in recorded if g[1] in ("networkpolicies", "clusterkopfpeerings")}
    assert granted(render(), ("ClusterRole",)) == recorded - optional


def test_namespaced_rbac_grants_the_same_calls_only_in_the_watched_namespaces(recorded: set[Grant]) -> None:
    objects = render(
        {"watchNamespaces": ["team-a", "team-b"], "replicaCount": 2, "networkPolicy": {"enabled": True}}
    )
    roles = of_kind(objects, "Role")
    assert {r["metadata"]["namespace"] for r in roles} == {"team-a", "team-b"}
    cluster_scoped = {"customresourcedefinitions", "clusterkopfpeerings"}
    expected_in_namespace = {
        ("kopf.dev", "kopfpeerings", v) if r == "clusterkopfpeerings" else (g, r, v)
        for g, r, v in recorded
        if r != "customresourcedefinitions"
    }
    for role in roles:
        assert granted([role], ("Role",)) == expected_in_namespace
    expected_cluster = {g for g in recorded if g[1] in cluster_scoped - {"clusterkopfpeerings"}}
    assert granted(objects, ("ClusterRole",)) == expected_cluster | NAMESPACED_MODE_EXTRA


def test_the_operator_holds_no_secret_rights() -> None:
    for variant in VARIANTS.values():
        objects = render(variant)
        assert not any(r == "secrets" for _, r, _ in granted(objects, ("ClusterRole", "Role")))


@pytest.fixture(scope="module", params=list(GANG_GROUPS))
def recorded_with_gang(request: pytest.FixtureRequest) -> tuple[str, set[Grant]]:
    import asyncio

    return request.param, asyncio.run(_record_a_whole_job_life(request.param))


def test_each_gang_option_is_granted_exactly_the_calls_it_adds(
    recorded: set[Grant], recorded_with_gang: tuple[str, set[Grant]]
) -> None:
    gang, calls = recorded_with_gang
    added = calls - recorded
    group = GANG_GROUPS[gang]
    if group is None:
        assert added == set()  # Kueue: labels and annotations on the pods only
    else:
        assert added == {(group, "podgroups", v) for v in ("list", "create", "delete")}
    values = {**VARIANTS["two-replicas"], "networkPolicy": {"enabled": True}, **GANG_VALUES[gang]}
    assert granted(render(values), ("ClusterRole",)) == recorded | added


def test_no_pod_group_rights_unless_a_gang_option_is_enabled() -> None:
    for variant in VARIANTS.values():
        assert not any(r == "podgroups" for _, r, _ in granted(render(variant), ("ClusterRole", "Role")))


def test_namespaced_installs_grant_pod_groups_in_each_watched_namespace() -> None:
    values = {"watchNamespaces": ["team-a"], **GANG_VALUES["Volcano"]}
    roles = of_kind(render(values), "Role")
    assert all(("scheduling.volcano.sh", "podgroups", "create") in granted([r], ("Role",)) for r in roles)
