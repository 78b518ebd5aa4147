"""The committed CRD is the generated one, is a valid structural CRD, and says what users rely on."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from finetune_operator.api.crd import CRD_FILE_NAME, build_crd, render_crd_yaml

from tests.support.apiserver import CelRules, FakeApiServer
from tests.support.factories import manifest, started
from tests.support.versions import KUBERNETES_VERSIONS


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its path, for structural checks."""
    if not isinstance(node, dict):
        return []
    out = [(path, node)]
    for name, child in node.get("properties", {}).items():
        out += _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _nodes(node["additionalProperties"], f"{path}{{}}")
    return out


def test_committed_crd_is_the_generated_one(repo: Any) -> None:
    committed = (repo / "crds" / CRD_FILE_NAME).read_text()
    assert committed == render_crd_yaml(), "crds/ is stale: run `make crds` and commit the result"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_crd_passes_kubernetes_validate_strict(committed_crd: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(committed_crd, version, strict=True)


def test_every_schema_node_is_typed_and_ref_free(committed_crd: dict[str, Any]) -> None:
    for path, node in _nodes(_schema(committed_crd)):
        assert "$ref" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert node.get("additionalProperties") is not False, (
            f"{path}: additionalProperties false is not structural"
        )


def test_int_or_string_nodes_use_the_only_allowed_anyof(committed_crd: dict[str, Any]) -> None:
    for path, node in _nodes(_schema(committed_crd)):
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path


def test_defaults_pass_their_own_schema(committed_crd: dict[str, Any], apiserver: FakeApiServer) -> None:
    admission = apiserver.admit(manifest())
    assert admission.allowed, admission.errors
    assert admission.object is not None
    spec = admission.object["spec"]
    assert spec["resources"]["gpusPerNode"] == 8 and spec["resources"]["nodes"] == 1
    assert spec["training"]["precision"] == "bf16"


def test_names_short_name_category_and_status_subresource(committed_crd: dict[str, Any]) -> None:
    spec = committed_crd["spec"]
    assert committed_crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert spec["names"]["shortNames"] == ["ftj"]
    assert spec["names"]["categories"] == ["finetune"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns_tell_the_story(committed_crd: dict[str, Any]) -> None:
    columns = [
        c["name"]
        for c in committed_crd["spec"]["versions"][0]["additionalPrinterColumns"]
        if not c.get("priority")
    ]
    assert columns == [
        "Phase",
        "Nodes",
        "Step",
        "Progress",
        "Loss",
        "Restarts",
        "Infra-Restarts",
        "Checkpoint",
        "Age",
    ]


def test_every_cel_rule_compiles(committed_crd: dict[str, Any]) -> None:
    rules = CelRules()
    found = [
        r["rule"]
        for _, node in _nodes(_schema(committed_crd))
        for r in node.get("x-kubernetes-validations", [])
    ]
    assert len(found) >= 15
    for rule in found:
        rules.program(rule)


def test_status_schema_refuses_unknown_fields(apiserver: FakeApiServer) -> None:
    obj = manifest()
    obj["status"] = {"phase": "Running", "kopf": {"progress": {}}}
    assert "status.kopf: unknown field" in apiserver.admit(obj).errors


def test_a_yaml_round_trip_keeps_the_crd(committed_crd: dict[str, Any]) -> None:
    assert yaml.safe_load(render_crd_yaml()) == build_crd() == committed_crd


class TestTransitionRules:
    """Fields whose change would make the job's checkpoints meaningless are frozen once it started."""

    def _update(self, apiserver: FakeApiServer, changes: dict[str, Any], *, attempt: int) -> list[str]:
        old = started(manifest(), attempt=attempt)
        new = started(manifest(changes), attempt=attempt)
        # The server compares against the stored, defaulted object.
        stored = apiserver.admit(old).object
        return apiserver.admit(new, old=stored).errors

    @pytest.mark.parametrize(
        "changes,field",
        [
            ({"spec.model.source": "s3://models/other"}, "spec.model.source"),
            ({"spec.model.revision": "v2"}, "spec.model.revision"),
            ({"spec.model.tokenizer": "s3://models/tok"}, "spec.model.tokenizer"),
            ({"spec.model.trustRemoteCode": True}, "spec.model.trustRemoteCode"),
            ({"spec.dataset.maxSeqLength": 4096}, "spec.dataset"),
            ({"spec.training.learningRate": 0.1}, "spec.training"),
            ({"spec.deepspeed.zeroStage": 3}, "spec.deepspeed"),
            ({"spec.checkpoint.uri": "s3://elsewhere/ckpt"}, "spec.checkpoint.uri"),
            ({"spec.resources.nodes": 2}, "spec.resources.nodes"),
            ({"spec.resources.gpusPerNode": 4}, "spec.resources.nodes"),
        ],
    )
    def test_a_started_job_refuses_changes_to_training_semantics(
        self, apiserver: FakeApiServer, changes: dict[str, Any], field: str
    ) -> None:
        errors = self._update(apiserver, changes, attempt=1)
        assert any(e.startswith(field + ": Invalid value") and "cannot change" in e for e in errors), errors

    @pytest.mark.parametrize(
        "changes",
        [
            {"spec.runPolicy.maxRestarts": 10},
            {"spec.runPolicy.suspend": True},
            {"spec.runPolicy.activeDeadlineSeconds": 3600},
            {"spec.runPolicy.ttlSecondsAfterFinished": 60},
            {"spec.resources.nodeSelector": {"pool": "spot"}},
            {"spec.resources.image": "trainer:0.2"},
            {"spec.checkpoint.keepLast": 5},
            {"spec.model.tokenSecret": {"name": "rotated-token"}},
            {"spec.resources.podMetadata": {"labels": {"team": "nlp"}}},
            {"spec.placement": {"topologyKey": "rack"}},
        ],
    )
    def test_a_started_job_takes_operational_changes(
        self, apiserver: FakeApiServer, changes: dict[str, Any]
    ) -> None:
        assert self._update(apiserver, changes, attempt=2) == []

    def test_a_job_that_has_not_started_can_change_anything(self, apiserver: FakeApiServer) -> None:
        assert (
            self._update(
                apiserver, {"spec.model.source": "s3://models/other", "spec.resources.nodes": 2}, attempt=0
            )
            == []
        )


BATCH = {"spec.training.microBatchSize": 1, "spec.training.globalBatchSize": 32}  # world 8 before


class TestWorldSizeChanges:
    """The world size changes only where the job has no gang (Suspended, or Restarting between
    attempts), and only with a fixed global batch: the next attempt resumes at the new size from a
    checkpoint converted to DeepSpeed's universal format (the trainer's universal.py)."""

    def _change(
        self, apiserver: FakeApiServer, changes: dict[str, Any], *, phase: str, before: dict[str, Any] = BATCH
    ) -> list[str]:
        stored = apiserver.admit(started(manifest(before), attempt=3, phase=phase)).object
        new = started(manifest({**before, **changes}), attempt=3, phase=phase)
        return apiserver.admit(new, old=stored).errors

    @pytest.mark.parametrize("phase", ["Running", "Starting", "Queued"])
    def test_refused_while_the_job_has_pods(self, apiserver: FakeApiServer, phase: str) -> None:
        errors = self._change(apiserver, {"spec.resources.nodes": 2}, phase=phase)
        assert any(e.startswith("spec.resources.nodes: Invalid value") and "set runPolicy.suspend" in e
                   for e in errors), errors  # fmt: skip

    @pytest.mark.parametrize(
        "changes",
        [{"spec.resources.nodes": 2}, {"spec.resources.gpusPerNode": 4}, {"spec.resources.nodes": 4}],
    )
    def test_accepted_while_suspended(self, apiserver: FakeApiServer, changes: dict[str, Any]) -> None:
        assert self._change(apiserver, changes, phase="Suspended") == []

    def test_accepted_while_restarting_between_attempts(self, apiserver: FakeApiServer) -> None:
        assert self._change(apiserver, {"spec.resources.gpusPerNode": 2}, phase="Restarting") == []

    def test_refused_without_a_global_batch_size(self, apiserver: FakeApiServer) -> None:
        errors = self._change(apiserver, {"spec.resources.nodes": 2}, phase="Suspended", before={})
        assert any("training.globalBatchSize is set" in e for e in errors), errors

    def test_refused_when_the_new_world_size_cannot_divide_the_global_batch(
        self, apiserver: FakeApiServer
    ) -> None:
        errors = self._change(apiserver, {"spec.resources.gpusPerNode": 3}, phase="Suspended")
        assert any(e.startswith("spec.training.globalBatchSize") and "multiple of microBatchSize" in e
                   for e in errors), errors  # fmt: skip


def test_the_embedded_kubernetes_schemas_are_the_ones_kubernetes_validate_ships(repo: Any) -> None:
    from tools.k8s_schema import TARGET, render

    assert TARGET.read_text() == render(), "api/kubernetes_schema.json is stale: run `make crds`"


def test_volumes_in_the_crd_have_kubernetes_structure(committed_crd: dict[str, Any]) -> None:
    resources = _schema(committed_crd)["properties"]["spec"]["properties"]["resources"]["properties"]
    volume = resources["volumes"]["items"]
    assert volume["required"] == ["name"]
    assert sorted(volume["properties"]["nfs"]["required"]) == ["path", "server"]
    claim = volume["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    storage = claim["properties"]["resources"]["properties"]["requests"]["additionalProperties"]
    assert storage.get("x-kubernetes-int-or-string") is True
    assert sorted(resources["volumeMounts"]["items"]["required"]) == ["mountPath", "name"]
