"""KMock's KubernetesEmulator with the API-server behaviours the operator relies on added.

KMock 0.8 keeps objects as plain dicts and merges patches; a real API server also does what is added
here (each gap is listed in docs/architecture.md, "Testing against the emulator"):
- labelSelector on list and watch (equality and existence terms);
- metadata it owns: uid, creationTimestamp, resourceVersion (bumped on every write) and generation
  (bumped when spec changes); a patch naming a stale resourceVersion is refused with 409 Conflict;
- the status subresource of FineTuneJobs: a patch of the object ignores status, a patch of /status
  changes nothing else;
- graceful pod deletion: a running pod gets deletionTimestamp = now + grace period and stays until the
  kubelet is done with it; gracePeriodSeconds=0 removes it at once;
- garbage collection: deleting an object deletes the objects its uid owns (pods on a node
  gracefully, so they stay Terminating until their kubelet is done), at once or after `gc_delay`;
- pods/log, from `pod_logs`, with tailLines, sinceSeconds and limitBytes (applied in that order,
  limitBytes keeping the first bytes, as the kubelet's log reader does);
- admission: plugins that refuse a create as the API server would (tests/support/admission.py).
It also records every request (for request counts and the RBAC check) and injects faults, and keeps
KMock's own request history to the requests in flight (it is scanned on every request).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp.web
import attrs
import kmock
from finetune_operator import contract
from finetune_operator.clock import Clock
from kmock._internal import rendering

JOBS = kmock.resource(contract.API_GROUP, contract.API_VERSION, contract.PLURAL)
PODS = kmock.resource("", "v1", "pods")
SERVICES = kmock.resource("", "v1", "services")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")
EVENTS = kmock.resource("", "v1", "events")
NETWORK_POLICIES = kmock.resource("networking.k8s.io", "v1", "networkpolicies")
VOLCANO_PODGROUPS = kmock.resource("scheduling.volcano.sh", "v1beta1", "podgroups")
COSCHEDULING_PODGROUPS = kmock.resource("scheduling.x-k8s.io", "v1alpha1", "podgroups")
WITH_STATUS_SUBRESOURCE = {JOBS}
VERBS = {
    kmock.action.LIST: "list",
    kmock.action.WATCH: "watch",
    kmock.action.FETCH: "get",
    kmock.action.CREATE: "create",
    kmock.action.UPDATE: "patch",
    kmock.action.DELETE: "delete",
}


@dataclass(frozen=True)
class Call:
    verb: str
    resource: str  # "pods", "finetunejobs/status", ...
    namespace: str | None
    name: str | None
    agent: str

    @property
    def from_operator(self) -> bool:
        return "kopf" not in self.agent and "kmock" not in self.agent


@dataclass
class Fault:
    match: Callable[[Call], bool]
    status: int | None = None  # answer with this error
    delay: float = 0.0  # or hold the request this long first (past the client's timeout)
    times: int = 1
    hits: int = 0


def timestamp(clock: Clock, plus: float = 0.0) -> str:
    return (clock.now() + timedelta(seconds=plus)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term.strip() not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    clock: Clock
    pod_logs: dict[tuple[str, str], str] = attrs.field(factory=dict)
    # when each appended chunk of a pod's log begins: (time, offset), for sinceSeconds
    _log_marks: dict[tuple[str, str], list[tuple[Any, int]]] = attrs.field(factory=dict)
    calls: list[Call] = attrs.field(factory=list)
    faults: list[Fault] = attrs.field(factory=list)
    _versions: Any = attrs.field(factory=lambda: itertools.count(1000))
    _writes: asyncio.Lock = attrs.field(factory=asyncio.Lock)
    _dropped: asyncio.Event = attrs.field(factory=asyncio.Event)
    on_call: Callable[[Call], None] | None = None
    gc_delay: float = 0.0  # seconds before the garbage collector acts (a real one runs in the background)
    _collections: set[asyncio.Task[None]] = attrs.field(factory=set)
    # admission plugins (tests/support/admission.py): each may refuse a create with an API error
    admission: list[Callable[..., kmock.KubernetesError | None]] = attrs.field(factory=list)
    # mutating admission (a webhook such as Kueue's pod webhook, tests/support/gangs.py): each may
    # change an object being created, given (resource, namespace, object)
    mutators: list[Callable[[kmock.resource, str, dict[str, Any]], None]] = attrs.field(factory=list)

    def declare(self) -> None:
        info = kmock.ResourceInfo
        self.resources[JOBS] = info(
            kind=contract.KIND, namespaced=True, verbs={"list", "watch", "get", "patch"}
        )
        self.resources["v1/pods"] = info(kind="Pod", namespaced=True, verbs={"list", "watch", "get", "patch"})
        self.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs={"list", "watch"})
        self.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
            kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch"}
        )
        for podgroups in (VOLCANO_PODGROUPS, COSCHEDULING_PODGROUPS):
            self.resources[podgroups] = info(
                kind="PodGroup", namespaced=True, verbs={"list", "watch", "get", "create", "delete"}
            )
        self.resources["kopf.dev/v1/clusterkopfpeerings"] = info(
            kind="ClusterKopfPeering", namespaced=False, verbs={"list", "watch", "get", "patch"}
        )

    # -- what tests and the kubelet use directly --------------------------------------------------

    def get(self, resource: kmock.resource, namespace: str, name: str) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _live(self, resource: kmock.resource, selector: str | None) -> list[dict[str, Any]]:
        return [
            obj.last.raw
            for (res, _, _), obj in list(self.objects.items())
            if res == resource and not obj.deleted
            if _matches(obj.last.raw.get("metadata", {}).get("labels") or {}, selector)
        ]

    def list(self, resource: kmock.resource, selector: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(raw) for raw in self._live(resource, selector)]

    def count(self, resource: kmock.resource, selector: str | None = None) -> int:
        """How many objects match, without copying them (cheap enough to poll)."""
        return len(self._live(resource, selector))

    async def write(self, resource: kmock.resource, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Patch as a controller with full rights would (status included); False if it is gone."""
        async with self._lock:
            key = (resource, namespace, name)
            if key not in self.objects or self.objects[key].deleted:
                return False
            obj = self.objects[key]
            patch = copy.deepcopy(patch)
            patch.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
            obj.patch(patch)
            await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})
        return True

    async def remove(self, resource: kmock.resource, namespace: str, name: str) -> None:
        async with self._lock:
            key = (resource, namespace, name)
            if key in self.objects and not self.objects[key].deleted:
                raw = self.objects[key].raw
                self.objects[key].delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})

    def append_log(self, key: tuple[str, str], text: str) -> None:
        """What a container prints, stamped with the clock (the kubelet keeps a timestamp per line)."""
        before = self.pod_logs.get(key, "")
        self._log_marks.setdefault(key, []).append((self.clock.now(), len(before)))
        self.pod_logs[key] = before + text

    def drop_watches(self) -> None:
        """End every open watch stream, as an API server restart or a load balancer would."""
        self._dropped.set()
        self._dropped = asyncio.Event()

    def inject(
        self, match: Callable[[Call], bool], *, status: int | None = None, delay: float = 0.0, times: int = 1
    ) -> Fault:
        fault = Fault(match, status=status, delay=delay, times=times)
        self.faults.append(fault)
        return fault

    # -- the request path ---------------------------------------------------------------------------

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # KMock matches each request against its reactions by scanning every request it ever
        # received, so a long run grows quadratically (a second per request after a few thousand).
        # `calls` is this emulator's record; KMock's own history keeps only requests in flight.
        try:
            return await self._serve(request)
        finally:
            with contextlib.suppress(ValueError):
                self._requests.remove(request)

    async def _serve(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.action not in VERBS:
            return await super()._handle(request)
        plural = request.resource.plural or ""
        call = Call(
            verb=VERBS[request.action],
            resource=f"{plural}/{request.subresource}" if request.subresource else plural,
            namespace=request.namespace,
            name=request.name,
            agent=request.headers.get("User-Agent", ""),
        )
        self.calls.append(call)
        if self.on_call is not None:
            self.on_call(call)
        for fault in self.faults:
            if fault.hits < fault.times and fault.match(call):
                fault.hits += 1
                await asyncio.sleep(fault.delay)
                if fault.status is not None:
                    raise kmock.KubernetesError(
                        status=fault.status, reason="InjectedFault", message="injected by the test"
                    )
        if request.action in (kmock.action.LIST, kmock.action.WATCH, kmock.action.FETCH):
            return await super()._handle(request)
        async with self._writes:
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                for admit in self.admission:
                    refusal = admit(self, request.resource, request.namespace or "", request.data)
                    if refusal is not None:
                        raise refusal
            request = await self._prepare(request)
            if request.action == kmock.action.DELETE and request.resource == PODS:
                held = await self._delete_gracefully(request)
                if held is not None:
                    return aiohttp.web.json_response(held)
            owner_uid = None
            if request.action == kmock.action.DELETE:
                obj = self.get(request.resource, request.namespace or "", request.name or "")
                owner_uid = (obj or {}).get("metadata", {}).get("uid")
            response = await super()._handle(request)
            if owner_uid:
                await self._collect_owned(owner_uid)
            return response

    async def _prepare(self, request: rendering.Request) -> rendering.Request:
        resource, data = request.resource, copy.deepcopy(request.data)
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            meta.setdefault("namespace", request.namespace)
            meta.update(
                uid=str(uuid.uuid4()),
                creationTimestamp=timestamp(self.clock),
                resourceVersion=str(next(self._versions)),
            )
            if resource in WITH_STATUS_SUBRESOURCE:
                meta["generation"] = 1
                data.pop("status", None)
            if resource == PODS:
                data["status"] = {"phase": "Pending"}
            for mutate in self.mutators:
                mutate(resource, request.namespace or "", data)
        elif request.action == kmock.action.UPDATE and isinstance(data, dict):
            current = self.get(resource, request.namespace or "", request.name or "")
            if current is None:
                return request  # the emulator answers 404
            meta = current.get("metadata", {})
            wanted = (data.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != meta.get("resourceVersion"):
                raise kmock.KubernetesError(
                    status=409,
                    reason="Conflict",
                    message="the object has been modified; please apply your changes to the latest version",
                )
            if resource in WITH_STATUS_SUBRESOURCE:
                if request.subresource == "status":
                    data = {"status": data.get("status")}
                else:
                    data.pop("status", None)
                    if "spec" in data and current.get("spec") != _merged(current, data).get("spec"):
                        data.setdefault("metadata", {})["generation"] = int(meta.get("generation", 1)) + 1
            data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
        object.__setattr__(request, "data", data)  # the emulator stores request.data as it is
        return request

    async def _delete_gracefully(self, request: rendering.Request) -> dict[str, Any] | None:
        """A running pod is marked and kept for the kubelet to stop; returns it, or None to remove."""
        pod = self.get(PODS, request.namespace or "", request.name or "")
        if pod is None or not pod.get("spec", {}).get("nodeName"):
            return None  # unknown (404 follows) or never scheduled: gone at once
        grace = request.params.get("gracePeriodSeconds")
        if grace is None and isinstance(request.data, dict):
            grace = request.data.get("gracePeriodSeconds")
        if grace is not None and int(grace) == 0:
            return None
        if pod["metadata"].get("deletionTimestamp"):
            return pod
        seconds = (
            int(grace) if grace is not None else int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        )
        await self.write(
            PODS,
            request.namespace or "",
            request.name or "",
            {
                "metadata": {
                    "deletionTimestamp": timestamp(self.clock, seconds),
                    "deletionGracePeriodSeconds": seconds,
                }
            },
        )
        return self.get(PODS, request.namespace or "", request.name or "")

    async def _collect_owned(self, uid: str) -> None:
        if self.gc_delay:
            self._collections.add(task := asyncio.create_task(self._collect_later(uid)))
            task.add_done_callback(self._collections.discard)
        else:
            await self._collect(uid)

    async def _collect_later(self, uid: str) -> None:
        await asyncio.sleep(self.gc_delay)
        async with self._writes:
            await self._collect(uid)

    async def _collect(self, uid: str) -> None:
        """The garbage collector deletes an owner's dependents as any client would: a pod on a
        node is deleted gracefully (its kubelet finishes it), everything else at once."""
        for (resource, namespace, name), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            meta = obj.raw.get("metadata", {})
            if not any(o.get("uid") == uid for o in meta.get("ownerReferences") or []):
                continue
            if resource == PODS and (obj.raw.get("spec") or {}).get("nodeName"):
                if not meta.get("deletionTimestamp"):
                    grace = int(obj.raw["spec"].get("terminationGracePeriodSeconds", 30))
                    marks = {
                        "deletionTimestamp": timestamp(self.clock, grace),
                        "deletionGracePeriodSeconds": grace,
                    }
                    await self.write(PODS, namespace or "", name, {"metadata": marks})
            else:
                await self.remove(resource, namespace or "", name)

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        if request.resource == PODS and request.subresource == "log":
            if self.get(PODS, request.namespace or "", request.name or "") is None:
                raise kmock.KubernetesObjectNotFoundError()
            key = (request.namespace or "", request.name or "")
            text = self.pod_logs.get(key, "")
            since = request.params.get("sinceSeconds")
            if since:
                start = self.clock.now() - timedelta(seconds=int(since))
                text = text[next((at for t, at in self._log_marks.get(key, []) if t >= start), len(text)) :]
            tail = request.params.get("tailLines")
            if tail:
                text = "".join(text.splitlines(keepends=True)[-int(tail) :])
            data = text.encode()
            limit = request.params.get("limitBytes")
            return data[: int(limit)] if limit else data
        return await super()._serve_fetch(request)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        assert isinstance(result, dict)
        result["items"] = [
            i for i in result["items"] if _matches(i.get("metadata", {}).get("labels") or {}, selector)
        ]
        return result

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        selector = request.params.get("labelSelector")
        dropped = self._dropped
        stream = super()._serve_watch(request).__aiter__()
        while not dropped.is_set():
            item = asyncio.ensure_future(stream.__anext__())
            stop = asyncio.ensure_future(dropped.wait())
            done, _ = await asyncio.wait({item, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if item not in done:
                item.cancel()
                return
            event = item.result()
            obj = event.get("object", {}) if isinstance(event, dict) else {}
            if not isinstance(event, dict) or _matches(obj.get("metadata", {}).get("labels") or {}, selector):
                yield event


def _merged(current: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    obj = kmock.Object(copy.deepcopy(current))
    obj.patch(patch)
    return dict(obj.raw)
