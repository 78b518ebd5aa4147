"""The cluster backend: the official kubernetes client, called from worker threads.

Every call has a timeout. "Already exists" on create and "not found" on delete are success (names are
deterministic, so a repeated action finds its own earlier work). A status write carries the observed
resourceVersion, so the API server refuses it (409) when the job changed in between. Other failures
raise: the work queue retries the pass with backoff, and the metrics count them by operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_operator import contract
from finetune_operator.api import API_VERSION, FineTuneJob, FineTuneJobStatus, Phase, parse_manifest
from finetune_operator.backends.base import REFUSAL_CODES, CreateRefused, JobKey
from finetune_operator.builders import (
    build_config_map,
    build_gang_group,
    build_network_policy,
    build_rank_pod,
    build_service,
    naming,
)
from finetune_operator.builders.gang import pod_group_api
from finetune_operator.metrics import Metrics
from finetune_operator.policy import actions as act
from finetune_operator.policy.decide import Observed
from finetune_operator.policy.observed import (
    ObservedGroup,
    format_time,
    observe_group,
    observe_pod,
    rank0_of_current_attempt,
)
from finetune_operator.progress import TAIL_BYTES, ProgressReport, parse_last
from finetune_operator.settings import OperatorSettings

log = logging.getLogger("finetune_operator.kubernetes")
MERGE_PATCH = "application/merge-patch+json"
LOG_TAIL_LINES = 200  # progress lines are written every few steps; warnings in between are few
EVENT_MESSAGE_LIMIT = 1024


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: removed keys become null."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch = {k: None for k in old if k not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    return patch


class StaleChild(RuntimeError):
    """A child's name is held by an older incarnation's object; the pass is retried later."""


def _owned_by_another(obj: dict[str, Any], uid: str | None) -> bool:
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    controller = next((o for o in owners if o.get("controller")), None)
    return bool(uid and controller and controller.get("uid") != uid)


def refusal(exc: ApiException) -> CreateRefused:
    """The API's Status (code, reason, message) of a refused create; the request body is left out,
    so nothing the pod carried (env, image, a secret's name) travels into status or events."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = int(body.get("code") or exc.status)
    reason = str(body.get("reason") or exc.reason or "Refused")
    message = str(body.get("message") or "")[:EVENT_MESSAGE_LIMIT]
    return CreateRefused(code, reason, message)


class KubernetesBackend:
    def __init__(self, api: client.ApiClient, settings: OperatorSettings, metrics: Metrics) -> None:
        self.core = client.CoreV1Api(api)
        self.networking = client.NetworkingV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.settings, self.metrics = settings, metrics
        self._threads = ThreadPoolExecutor(
            max_workers=max(4, settings.workers + settings.create_concurrency),
            thread_name_prefix="k8s-api",
        )
        self._instance = socket.gethostname()
        # The resourceVersion of our own latest status write per job: its watch event is an echo
        # of what we already know, and the handlers drop it instead of running a pass for it. The
        # event can arrive before the write's response: events arriving while a write is in flight
        # are held and judged once its version is known (`on_change` gets those that were not ours).
        self.own_versions: dict[JobKey, str] = {}
        self.on_change: Callable[[JobKey], None] = lambda key: None
        self._writing: dict[JobKey, int] = {}
        self._arrived: dict[JobKey, set[str]] = {}

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _call(self, operation: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One API call; the response is left raw: the client's model classes would validate (and
        reject) objects other controllers wrote, and cost more CPU than the whole pass."""
        kwargs["_request_timeout"] = self.settings.request_timeout_seconds
        kwargs["_preload_content"] = False
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, partial(fn, *args, **kwargs))
        except ApiException as exc:
            self.metrics.api_errors.labels(operation, str(exc.status)).inc()
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # after the client's own retries a timeout arrives wrapped in MaxRetryError
            cause = getattr(exc, "reason", exc)
            timed_out = isinstance(cause, (urllib3.exceptions.TimeoutError, TimeoutError))
            self.metrics.api_errors.labels(operation, "timeout" if timed_out else "connection").inc()
            raise

    async def _json(self, operation: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A read returned as plain JSON: the client's model classes cost more CPU than the pass."""
        response = await self._call(operation, fn, *args, **kwargs)
        return json.loads(response.data)

    async def _tolerate(self, status: int, call: Awaitable[Any]) -> None:
        try:
            await call
        except ApiException as exc:
            if exc.status != status:
                raise

    # -- observe ---------------------------------------------------------------------------------

    async def observe(self, key: JobKey, now: datetime) -> Observed | None:
        namespace, name = key
        try:
            body = await self._json(
                "get finetunejobs",
                self.custom.get_namespaced_custom_object,
                contract.API_GROUP,
                contract.API_VERSION,
                namespace,
                contract.PLURAL,
                name,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        job = parse_manifest(body)
        pods_list = await self._json(
            "list pods",
            self.core.list_namespaced_pod,
            namespace,
            label_selector=f"{contract.LABEL_JOB}={name}",
        )
        pods = tuple(observe_pod(p) for p in pods_list.get("items") or [])
        # While Running, the Service was created before the attempt and progress is the poller's
        # (progress_poll.py): a pass then costs a job read and a pod list, nothing more.
        running = job.status is not None and job.status.phase == Phase.RUNNING
        return Observed(
            job=job,
            pods=pods,
            service_exists=running or await self._service_exists(namespace, name, job.metadata.uid),
            now=now,
            progress=await self._progress(job, pods, poller_reads_running=running),
            groups=await self._groups(job),
        )

    async def _groups(self, job: FineTuneJob) -> tuple[ObservedGroup, ...]:
        """The job's PodGroups, when its gang scheduler uses them (the only case the chart grants
        the operator rights to them). None readable (no rights: 403; no such API: 404) reads as
        none: the decide step then creates the group, and that create's refusal is recorded and
        shown like any other (status.createRefusal), instead of a pass that fails before deciding."""
        api = pod_group_api(job)
        if api is None:
            return ()
        try:
            listed = await self._json(
                f"list {api.plural}.{api.group}",
                self.custom.list_namespaced_custom_object,
                api.group,
                api.version,
                job.metadata.namespace,
                api.plural,
                label_selector=f"{contract.LABEL_JOB}={job.metadata.name}",
            )
        except ApiException as exc:
            if exc.status in (403, 404):
                return ()
            raise
        return tuple(observe_group(g) for g in listed.get("items") or [])

    async def _service_exists(self, namespace: str, job: str, uid: str | None) -> bool:
        """An older incarnation's Service (the garbage collector has not removed it yet) is not
        this job's: it is reported missing, so its creation is tried until the name is free."""
        try:
            service = await self._json(
                "get services", self.core.read_namespaced_service, naming.service_name(job), namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return not _owned_by_another(service, uid)

    async def _progress(
        self, job: FineTuneJob, pods: tuple[Any, ...], *, poller_reads_running: bool
    ) -> ProgressReport | None:
        """The newest report in the rank-0 pod's log tail; a log that cannot be read is no report.
        A rank 0 that finished is read here (its last report); a running one is the poller's."""
        rank0 = rank0_of_current_attempt(job, pods)
        if rank0 is None or rank0.phase not in ("Running", "Succeeded", "Failed"):
            return None
        if poller_reads_running and rank0.phase == "Running":
            return None
        return await self.read_progress(job.metadata.namespace, rank0.name)

    async def read_progress(
        self, namespace: str, pod: str, since_seconds: int | None = None
    ) -> ProgressReport | None:
        """The newest report in a bounded read of the pod's log: the last LOG_TAIL_LINES lines, or
        with `since_seconds` what the trainer wrote since then, at most TAIL_BYTES either way (the
        kubelet streams a whole log otherwise). None when unreadable or without a report."""
        bounds: dict[str, Any] = {"limit_bytes": TAIL_BYTES}
        if since_seconds is None:
            bounds["tail_lines"] = LOG_TAIL_LINES
        else:
            bounds["since_seconds"] = since_seconds
        try:
            response = await self._call(
                "get pods/log",
                self.core.read_namespaced_pod_log,
                pod,
                namespace,
                container=contract.CONTAINER_NAME,
                **bounds,
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.debug("log of %s unreadable: %s", pod, type(exc).__name__)
            return None
        return parse_last(response.data.decode("utf-8", errors="replace"))

    async def patch_progress(self, key: JobKey, report: ProgressReport) -> bool:
        """Copy a report into status.progress/latestCheckpoint: a merge patch of those fields only,
        unconditional (they are the trainer's word, which no decision rests on but the stall check,
        which the next pass reads back). False when the job is gone."""
        status: dict[str, Any] = {"progress": report.progress.to_wire()}
        if report.latest_checkpoint is not None:
            status["latestCheckpoint"] = report.latest_checkpoint.to_wire()
        try:
            await self._write_status(key, {"status": status})
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def needs_pass(self, key: JobKey, version: str | None) -> bool:
        """Whether a watch event of this job is news: not the echo of our own status write."""
        if version is not None and version == self.own_versions.get(key):
            return False
        if self._writing.get(key) and version is not None:
            self._arrived.setdefault(key, set()).add(version)
            return False
        return True

    def forget_versions(self, key: JobKey) -> None:
        self.own_versions.pop(key, None)
        self._arrived.pop(key, None)

    async def _write_status(self, key: JobKey, *args: Any) -> None:
        """A status patch whose version is remembered, its early-arriving echo included."""
        self._writing[key] = self._writing.get(key, 0) + 1
        try:
            response = await self._call(
                "patch finetunejobs/status",
                self.custom.patch_namespaced_custom_object_status,
                contract.API_GROUP,
                contract.API_VERSION,
                key[0],
                contract.PLURAL,
                key[1],
                *args,
                _content_type=MERGE_PATCH,
            )
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self.own_versions[key] = str(json.loads(response.data)["metadata"]["resourceVersion"])
        finally:
            self._writing[key] -= 1
            if not self._writing[key]:
                del self._writing[key]
                if self._arrived.pop(key, set()) - {self.own_versions.get(key)}:
                    self.on_change(key)

    # -- write -----------------------------------------------------------------------------------

    async def write_status(self, job: FineTuneJob, status: FineTuneJobStatus) -> bool:
        body = {
            "metadata": {"resourceVersion": (job.metadata.model_extra or {}).get("resourceVersion")},
            "status": merge_patch(job.status.to_wire() if job.status else {}, status.to_wire()),
        }
        try:
            await self._write_status((job.metadata.namespace, job.metadata.name), body)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def apply(self, job: FineTuneJob, action: act.Action) -> None:
        ns, name = job.metadata.namespace, job.metadata.name
        match action:
            case act.CreateService():
                # The policy first: the Service's absence is what brings this action back, so a pass
                # that dies between the two creates is finished by the next, never leaving ranks open.
                if self.settings.network_policy:
                    await self._create(
                        "create networkpolicies",
                        self.networking.create_namespaced_network_policy,
                        build_network_policy(job),
                    )
                await self._create("create services", self.core.create_namespaced_service, build_service(job))
            case act.CreateAttempt(attempt=attempt, ranks=ranks):
                config = build_config_map(job, attempt)
                if not await self._create(
                    "create configmaps", self.core.create_namespaced_config_map, config
                ):
                    await self._check_own_config(job, config["metadata"]["name"])
                await self._bounded(
                    self._create(
                        "create pods",
                        self.core.create_namespaced_pod,
                        build_rank_pod(job, attempt, rank, self.settings.build_context),
                    )
                    for rank in ranks
                )
            case act.CreatePodGroup(attempt=attempt):
                api, group = pod_group_api(job), build_gang_group(job, attempt)
                if api is not None and group is not None:
                    try:
                        await self._create(
                            f"create {api.plural}.{api.group}",
                            partial(self.custom.create_namespaced_custom_object, api.group, api.version),
                            group,
                            plural=api.plural,
                        )
                    except ApiException as exc:
                        if exc.status != 404:
                            raise
                        # The API server does not serve the resource: the scheduler's CRDs are missing.
                        message = (
                            f"{api.plural}.{api.group}/{api.version} is not served by this cluster: install "
                            "the gang scheduler's CRDs or choose another spec.gang.scheduler"
                        )
                        raise CreateRefused(404, "NotFound", message) from None
            case act.DeletePodGroup(attempt=attempt):
                api = pod_group_api(job)
                if api is not None:
                    await self._tolerate(
                        404,
                        self._call(
                            f"delete {api.plural}.{api.group}",
                            self.custom.delete_namespaced_custom_object,
                            api.group,
                            api.version,
                            ns,
                            api.plural,
                            naming.group_name(name, attempt),
                        ),
                    )
            case act.DeletePods(names=names, force=force):
                options = {"grace_period_seconds": 0} if force else {}
                await self._bounded(
                    self._tolerate(
                        404, self._call("delete pods", self.core.delete_namespaced_pod, pod, ns, **options)
                    )
                    for pod in names
                )
            case act.DeleteAttemptConfig(attempt=attempt):
                await self._tolerate(
                    404,
                    self._call(
                        "delete configmaps",
                        self.core.delete_namespaced_config_map,
                        naming.config_map_name(name, attempt),
                        ns,
                    ),
                )
            case act.DeleteJob():
                await self._tolerate(
                    404,
                    self._call(
                        "delete finetunejobs",
                        self.custom.delete_namespaced_custom_object,
                        contract.API_GROUP,
                        contract.API_VERSION,
                        ns,
                        contract.PLURAL,
                        name,
                        propagation_policy="Background",
                    ),
                )

    async def _create(
        self, operation: str, fn: Callable[..., Any], body: dict[str, Any], plural: str | None = None
    ) -> bool:
        """Create; False when it already existed (names are deterministic: usually our own). A custom
        object's create takes its plural between the namespace and the body."""
        args = (body["metadata"]["namespace"], *((plural,) if plural else ()), body)
        try:
            await self._call(operation, fn, *args)
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status in REFUSAL_CODES:
                raise refusal(exc) from None
            raise
        return True

    async def _check_own_config(self, job: FineTuneJob, name: str) -> None:
        """An existing attempt ConfigMap may be an older incarnation's (same job name, deleted, its
        children not yet collected): its pods would read the old config. Wait for the collector."""
        config = await self._json(
            "get configmaps", self.core.read_namespaced_config_map, name, job.metadata.namespace
        )
        if _owned_by_another(config, job.metadata.uid):
            raise StaleChild(
                f"configmap {name} belongs to an earlier job of the same name; waiting for it to go"
            )

    async def _bounded(self, calls: Iterable[Awaitable[object]]) -> None:
        gate = asyncio.Semaphore(self.settings.create_concurrency)

        async def one(call: Awaitable[object]) -> None:
            async with gate:
                await call

        pending = [one(c) for c in calls]
        results = await asyncio.gather(*pending, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def emit(self, job: FineTuneJob, event: act.Event) -> None:
        now = format_time(datetime.now(UTC))
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{job.metadata.name}.{uuid.uuid4().hex[:16]}",
                "namespace": job.metadata.namespace,
            },
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": contract.KIND,
                "name": job.metadata.name,
                "namespace": job.metadata.namespace,
                "uid": job.metadata.uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:EVENT_MESSAGE_LIMIT],
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": "finetune-operator"},
            "reportingComponent": "finetune.dev/operator",
            "reportingInstance": self._instance,
        }
        try:
            await self._call("create events", self.core.create_namespaced_event, job.metadata.namespace, body)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning(
                "event %s for %s not recorded: %s", event.reason, job.metadata.name, type(exc).__name__
            )
