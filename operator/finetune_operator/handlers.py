"""kopf wiring, and nothing else: every trigger adds the job's key to the work queue.

    kopf run -m finetune_operator.handlers --all-namespaces     # or: -n team-a -n team-b
             [--standalone | --peering=finetune-operator] [--liveness=http://0.0.0.0:8080/healthz]
             [--log-format=json]

Jobs and pods are followed with event handlers, not kopf's create/update/resume handlers: the
reconcile is level-based and needs no change detection, so kopf never writes its bookkeeping
annotations or a finalizer onto a job. A job's creation and its edits arrive as watch events, and
after a (re)start the initial listing delivers every existing job: that is the resume.
"""

from __future__ import annotations

from typing import Any

import kopf

from finetune_operator import contract
from finetune_operator.runtime import Runtime, load_api_client
from finetune_operator.settings import OperatorSettings


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our Events are the reconcile's, with reasons; kopf's own would repeat handler log lines.
    settings.posting.enabled = False
    settings.watching.reconnect_backoff = 1.0
    if "runtime" not in memo:
        operator_settings = memo.get("settings") or OperatorSettings.from_env()
        api = memo.get("api_client") or load_api_client(operator_settings)
        memo["runtime"] = Runtime(operator_settings, api, clock=memo.get("clock"))
    settings.peering.priority = memo["runtime"].settings.peering_priority
    memo["runtime"].start()


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    await memo["runtime"].stop()


@kopf.on.event(contract.API_GROUP, contract.API_VERSION, contract.PLURAL)
async def job_changed(
    type: str, namespace: str | None, name: str, body: kopf.Body, memo: Any, **_: Any
) -> None:
    runtime: Runtime = memo["runtime"]
    key = (namespace or "", name)
    if type == "DELETED":
        runtime.forget(key)
    elif runtime.watch.job_changed(key, body.get("metadata", {}).get("resourceVersion")):
        # The echo of our own latest status write is the state we just decided on or copied: no pass.
        runtime.queue.add(key)


@kopf.on.event("v1", "pods", labels={contract.LABEL_JOB: kopf.PRESENT})
async def pod_changed(
    type: str | None,
    labels: kopf.Labels,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: Any,
    **_: Any,
) -> None:
    runtime: Runtime = memo["runtime"]
    if runtime.watch.pod_changed(
        (namespace or "", name), type, body.get("metadata", {}).get("resourceVersion")
    ):
        runtime.queue.add((namespace or "", labels[contract.LABEL_JOB]))


@kopf.on.probe(id="reconcile")
async def reconcile_probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """Served on kopf's liveness endpoint; a dead worker or timer task fails the probe."""
    runtime: Runtime = memo["runtime"]
    if not runtime.healthy():
        raise kopf.PermanentError("reconcile workers stopped")
    return {"queued": len(runtime.queue)}
