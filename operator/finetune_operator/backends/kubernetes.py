"""The cluster backend: what a reconcile pass observes, writes and applies, as API calls.

The calls themselves (threads, timeouts, refusals) are backends/kube_api.py's, and a Running job's
progress is the poller's (progress_poll.py). A status write carries the observed resourceVersion,
so the API server refuses it (409) when the job changed in between. Other failures raise: the work
queue retries the pass with backoff, and the metrics count them by operation.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from finetune_operator import contract
from finetune_operator.api import FineTuneJob, FineTuneJobStatus, Phase, parse_manifest
from finetune_operator.backends.base import JobKey
from finetune_operator.backends.kube_api import KubeApi
from finetune_operator.builders import (
    build_config_map,
    build_gang_group,
    build_network_policy,
    build_rank_pod,
    build_service,
    naming,
)
from finetune_operator.builders.events import build_event
from finetune_operator.builders.gang import pod_group_api
from finetune_operator.policy import actions as act
from finetune_operator.policy.decide import Observed
from finetune_operator.policy.observed import ObservedGroup, observe_group, observe_pod
from finetune_operator.progress_poll import ProgressLog
from finetune_operator.watch_filter import WatchFilter

log = logging.getLogger("finetune_operator.kubernetes")


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


class KubernetesBackend:
    def __init__(self, api: KubeApi, progress: ProgressLog, watch: WatchFilter) -> None:
        self.api, self.progress, self.watch = api, progress, watch
        self.settings = api.settings
        self._instance = socket.gethostname()
        # One method per action type: `apply` looks the action's type up here.
        self._actions: dict[type, Callable[[FineTuneJob, Any], Awaitable[None]]] = {
            act.CreateService: self._create_service,
            act.CreateAttempt: self._create_attempt,
            act.CreatePodGroup: self._create_pod_group,
            act.DeletePodGroup: self._delete_pod_group,
            act.DeletePods: self._delete_pods,
            act.DeleteAttemptConfig: self._delete_attempt_config,
            act.DeleteJob: self._delete_job,
        }

    def close(self) -> None:
        self.api.close()

    # -- observe ---------------------------------------------------------------------------------

    async def observe(self, key: JobKey, now: datetime) -> Observed | None:
        namespace, name = key
        try:
            body = await self.api.json(
                "get finetunejobs",
                self.api.custom.get_namespaced_custom_object,
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
        pods_list = await self.api.json(
            "list pods",
            self.api.core.list_namespaced_pod,
            namespace,
            label_selector=f"{contract.LABEL_JOB}={name}",
        )
        pods = tuple(observe_pod(p) for p in pods_list.get("items") or [])
        # While Running, the Service was created before the attempt: it is not read again.
        running = job.status is not None and job.status.phase == Phase.RUNNING
        return Observed(
            job=job,
            pods=pods,
            service_exists=running or await self._service_exists(namespace, name, job.metadata.uid),
            now=now,
            progress=await self.progress.for_pass(job, pods),
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
            listed = await self.api.json(
                f"list {api.plural}.{api.group}",
                self.api.custom.list_namespaced_custom_object,
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
            service = await self.api.json(
                "get services", self.api.core.read_namespaced_service, naming.service_name(job), namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return not _owned_by_another(service, uid)

    # -- write -----------------------------------------------------------------------------------

    async def write_status(self, job: FineTuneJob, status: FineTuneJobStatus) -> bool:
        key = (job.metadata.namespace, job.metadata.name)
        body = {
            "metadata": {"resourceVersion": (job.metadata.model_extra or {}).get("resourceVersion")},
            "status": merge_patch(job.status.to_wire() if job.status else {}, status.to_wire()),
        }
        try:
            await self.watch.own_write(key, self.api.patch_status(key, body))
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def apply(self, job: FineTuneJob, action: act.Action) -> None:
        await self._actions[type(action)](job, action)

    async def _create_service(self, job: FineTuneJob, action: act.CreateService) -> None:
        # The policy first: the Service's absence is what brings this action back, so a pass that
        # dies between the two creates is finished by the next, never leaving ranks open.
        if self.settings.network_policy:
            await self.api.create(
                "create networkpolicies",
                self.api.networking.create_namespaced_network_policy,
                build_network_policy(job),
            )
        await self.api.create("create services", self.api.core.create_namespaced_service, build_service(job))

    async def _create_attempt(self, job: FineTuneJob, action: act.CreateAttempt) -> None:
        config = build_config_map(job, action.attempt)
        if not await self.api.create("create configmaps", self.api.core.create_namespaced_config_map, config):
            await self._check_own_config(job, config["metadata"]["name"])
        await self._bounded(
            self.api.create(
                "create pods",
                self.api.core.create_namespaced_pod,
                build_rank_pod(job, action.attempt, rank, self.settings.build_context),
            )
            for rank in action.ranks
        )

    async def _create_pod_group(self, job: FineTuneJob, action: act.CreatePodGroup) -> None:
        api, group = pod_group_api(job), build_gang_group(job, action.attempt)
        if api is not None and group is not None:
            await self.api.create_pod_group(api, group)

    async def _delete_pod_group(self, job: FineTuneJob, action: act.DeletePodGroup) -> None:
        api = pod_group_api(job)
        if api is not None:
            await self.api.delete(
                f"delete {api.plural}.{api.group}",
                self.api.custom.delete_namespaced_custom_object,
                api.group,
                api.version,
                job.metadata.namespace,
                api.plural,
                naming.group_name(job.metadata.name, action.attempt),
            )

    async def _delete_pods(self, job: FineTuneJob, action: act.DeletePods) -> None:
        options = {"grace_period_seconds": 0} if action.force else {}
        ns = job.metadata.namespace
        await self._bounded(
            self.api.delete("delete pods", self.api.core.delete_namespaced_pod, pod, ns, **options)
            for pod in action.names
        )

    async def _delete_attempt_config(self, job: FineTuneJob, action: act.DeleteAttemptConfig) -> None:
        await self.api.delete(
            "delete configmaps",
            self.api.core.delete_namespaced_config_map,
            naming.config_map_name(job.metadata.name, action.attempt),
            job.metadata.namespace,
        )

    async def _delete_job(self, job: FineTuneJob, action: act.DeleteJob) -> None:
        await self.api.delete(
            "delete finetunejobs",
            self.api.custom.delete_namespaced_custom_object,
            contract.API_GROUP,
            contract.API_VERSION,
            job.metadata.namespace,
            contract.PLURAL,
            job.metadata.name,
            propagation_policy="Background",
        )

    async def _check_own_config(self, job: FineTuneJob, name: str) -> None:
        """An existing attempt ConfigMap may be an older incarnation's (same job name, deleted, its
        children not yet collected): its pods would read the old config. Wait for the collector."""
        config = await self.api.json(
            "get configmaps", self.api.core.read_namespaced_config_map, name, job.metadata.namespace
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
        body = build_event(
            job, event, now=datetime.now(UTC), suffix=uuid.uuid4().hex[:16], instance=self._instance
        )
        try:
            await self.api.call(
                "create events", self.api.core.create_namespaced_event, job.metadata.namespace, body
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning(
                "event %s for %s not recorded: %s", event.reason, job.metadata.name, type(exc).__name__
            )
