"""End to end on a real cluster (kind works; no GPU needed): the chart installed by the Helm engine,
examples/tiny-cpu.yaml run to Succeeded against S3-compatible storage, with a rank pod deleted once
mid-run. Skipped unless FTJOB_E2E_KUBECONFIG is set. Everything it needs, by environment:

  FTJOB_E2E_KUBECONFIG       kubeconfig of the cluster (its current context is used)
  FTJOB_E2E_OPERATOR_IMAGE   operator image the cluster can pull (kind: `kind load docker-image`)
  FTJOB_E2E_TRAINER_IMAGE    trainer image the cluster can pull
  FTJOB_E2E_S3_ENDPOINT      S3 endpoint as the pods reach it (e.g. http://minio.minio:9000)
  FTJOB_E2E_S3_LOCAL_ENDPOINT  the same storage as this machine reaches it (default: the above)
  FTJOB_E2E_S3_BUCKET        an existing bucket (default: ftjob-e2e)
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY   credentials for it
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import CHART_DIR

pytestmark = pytest.mark.skipif(
    not os.environ.get("FTJOB_E2E_KUBECONFIG"),
    reason="no real cluster: set FTJOB_E2E_KUBECONFIG (see docstring)",
)
REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"


def _need(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is required for the e2e run (see tests/e2e/test_real_cluster.py)")
    return value


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    import helm_python as helm
    from kubernetes import client, config

    kubeconfig = _need("FTJOB_E2E_KUBECONFIG")
    api = config.new_client_from_config(config_file=kubeconfig)
    suffix = uuid.uuid4().hex[:6]
    system_ns, jobs_ns = f"ftjob-e2e-system-{suffix}", f"ftjob-e2e-{suffix}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": jobs_ns}})
    repository, _, tag = _need("FTJOB_E2E_OPERATOR_IMAGE").rpartition(":")
    helm_config = helm.Config(kubeconfig_path=kubeconfig, namespace=system_ns)
    helm_config.install(
        CHART_DIR,
        "ftjob",
        {
            "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
            "trainer": {"image": _need("FTJOB_E2E_TRAINER_IMAGE")},
            "watchNamespaces": [jobs_ns],
            "operator": {"progressPollSeconds": 5},
        },
        namespace=system_ns,
        create_namespace=True,
        wait="watcher",
        timeout=300,
    )
    try:
        yield {"api": api, "namespace": jobs_ns}
    finally:
        helm_config.uninstall("ftjob", wait="watcher", timeout=300)
        core.delete_namespace(jobs_ns)
        core.delete_namespace(system_ns)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny model and dataset of the example, uploaded where the pods can read them."""
    import boto3
    from finetune_trainer.tiny import counting_records, write_jsonl, write_tiny_model

    endpoint = _need("FTJOB_E2E_S3_ENDPOINT")
    bucket = os.environ.get("FTJOB_E2E_S3_BUCKET", "ftjob-e2e")
    prefix = f"e2e-{uuid.uuid4().hex[:6]}"
    s3 = boto3.client("s3", endpoint_url=os.environ.get("FTJOB_E2E_S3_LOCAL_ENDPOINT", endpoint))
    root = tmp_path_factory.mktemp("e2e")
    model = write_tiny_model(root / "model")
    data = write_jsonl(root / "train.jsonl", counting_records(512))
    for path in model.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/model/{path.relative_to(model)}")
    s3.upload_file(str(data), bucket, f"{prefix}/data/train.jsonl")
    return {"endpoint": endpoint, "base": f"s3://{bucket}/{prefix}", "bucket": bucket, "prefix": prefix}


def _tiny_cpu_job(storage: dict[str, str], namespace: str) -> dict[str, Any]:
    job: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    job["metadata"]["namespace"] = namespace
    spec = job["spec"]
    spec["model"]["source"] = f"{storage['base']}/model"
    spec["dataset"]["sources"][0]["uri"] = f"{storage['base']}/data/train.jsonl"
    spec["training"]["maxSteps"] = 120  # long enough to delete a rank pod mid-run
    spec["checkpoint"].update(
        uri=f"{storage['base']}/store", endpointUrl=storage["endpoint"], credentialsSecret="ftjob-s3"
    )
    return job


def test_tiny_cpu_example_survives_a_deleted_rank_pod_and_succeeds(
    cluster: dict[str, Any], storage: dict[str, str]
) -> None:
    from kubernetes import client

    ns = cluster["namespace"]
    core, custom = client.CoreV1Api(cluster["api"]), client.CustomObjectsApi(cluster["api"])
    core.create_namespaced_secret(
        ns,
        {
            "metadata": {"name": "ftjob-s3"},
            "stringData": {k: _need(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
        },
    )
    job = _tiny_cpu_job(storage, ns)
    name = job["metadata"]["name"]
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)

    def status() -> dict[str, Any]:
        return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}

    _until(lambda: (status().get("progress") or {}).get("step", 0) >= 5, 900, "training past step 5")
    core.delete_namespaced_pod(f"{name}-a1-n1", ns)  # as a drained or lost node would
    final = _until(
        lambda: status().get("phase") in ("Succeeded", "Failed") and status(), 1800, "job finished"
    )
    assert final["phase"] == "Succeeded", final
    assert final["attempt"] >= 2
    assert final.get("restarts", 0) + final.get("infraRestarts", 0) >= 1, final
    assert final["progress"]["step"] == 120
    assert final.get("latestCheckpoint"), final
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ.get("FTJOB_E2E_S3_LOCAL_ENDPOINT", storage["endpoint"]))
    exported = f"{storage['prefix']}/store/{ns}/{name}/final/MANIFEST.json"
    s3.head_object(Bucket=storage["bucket"], Key=exported)  # the exported model is committed
