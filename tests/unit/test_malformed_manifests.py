"""Every malformed manifest is refused twice, by the CRD (schema + CEL, as `kubectl apply` would) and
by the pydantic models (as `ftjob validate`, the local run and the trainer would), each naming the
offending field; where a CEL rule and a pydantic rule overlap, they say the same thing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from finetune_operator.api import describe, parse_manifest
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
    # enums
    Bad("fp8 precision", {"spec.training.precision": "fp8"}, "spec.training.precision"),
    Bad("ZeRO stage 4", {"spec.deepspeed.zeroStage": 4}, "spec.deepspeed.zeroStage"),
    Bad(
        "unknown clean pod policy",
        {"spec.runPolicy.cleanPodPolicy": "Sometimes"},
        "spec.runPolicy.cleanPodPolicy",
    ),
    Bad("unknown record shape", {"spec.dataset.sources.0.shape": "qa"}, "spec.dataset.sources[0].shape"),
    # names
    Bad(
        "secret name with capitals",
        {"spec.checkpoint.credentialsSecret": "My_Secret"},
        "spec.checkpoint.credentialsSecret",
    ),
    Bad("job name too long for pod hostnames", {"metadata.name": "a" * 43}, "metadata.name"),
    Bad("job name starting with a digit", {"metadata.name": "8b-lora"}, "metadata.name"),
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
        parse_manifest(manifest(case.changes, drop=case.drop))
    lines = describe(caught.value)
    assert any(line.startswith(case.field) for line in lines), lines


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


def test_no_secret_value_is_echoed_in_an_error() -> None:
    data = manifest({"spec.resources.env": [{"name": "HF_TOKEN", "value": 12345}]})
    with pytest.raises(ValidationError) as caught:
        parse_manifest(data)
    assert "12345" not in "\n".join(describe(caught.value))
