"""The cluster's API as the backend and the progress poller call it: the official kubernetes client,
run on worker threads, every call with a timeout, its failures counted by operation.

Names are deterministic, so "already exists" on create and "not found" on delete mean a repeated
action found its own earlier work. A create the API server refuses as policy (quota, LimitRange,
Pod Security, a webhook, invalid fields) becomes a CreateRefused, recorded in status instead of
retried blindly; so does a PodGroup create the cluster cannot serve (the scheduler's CRDs missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_operator import contract
from finetune_operator.backends.base import REFUSAL_CODES, CreateRefused, JobKey
from finetune_operator.builders.events import EVENT_MESSAGE_LIMIT
from finetune_operator.builders.gang import PodGroupApi
from finetune_operator.builders.objects import Manifest
from finetune_operator.metrics import Metrics
from finetune_operator.settings import OperatorSettings

MERGE_PATCH = "application/merge-patch+json"


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


def unserved(api: PodGroupApi) -> CreateRefused:
    """A PodGroup create answered 404: the API server does not serve the resource at all."""
    message = (
        f"{api.plural}.{api.group}/{api.version} is not served by this cluster: install "
        "the gang scheduler's CRDs or choose another spec.gang.scheduler"
    )
    return CreateRefused(404, "NotFound", message)


class KubeApi:
    def __init__(self, api: client.ApiClient, settings: OperatorSettings, metrics: Metrics) -> None:
        self.core = client.CoreV1Api(api)
        self.networking = client.NetworkingV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.settings, self.metrics = settings, metrics
        self._threads = ThreadPoolExecutor(
            max_workers=max(4, settings.workers + settings.create_concurrency),
            thread_name_prefix="k8s-api",
        )

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def call(self, operation: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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

    async def json(self, operation: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A read returned as plain JSON: the client's model classes cost more CPU than the pass."""
        response = await self.call(operation, fn, *args, **kwargs)
        return json.loads(response.data)

    async def delete(self, operation: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Delete; "not found" is done (names are deterministic: usually our own earlier delete)."""
        try:
            await self.call(operation, fn, *args, **kwargs)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def create(
        self, operation: str, fn: Callable[..., Any], body: Manifest, plural: str | None = None
    ) -> bool:
        """Create; False when it already existed (names are deterministic: usually our own). A custom
        object's create takes its plural between the namespace and the body."""
        args = (body["metadata"]["namespace"], *((plural,) if plural else ()), body)
        try:
            await self.call(operation, fn, *args)
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status in REFUSAL_CODES:
                raise refusal(exc) from None
            raise
        return True

    async def create_pod_group(self, api: PodGroupApi, group: Manifest) -> None:
        try:
            await self.create(
                f"create {api.plural}.{api.group}",
                partial(self.custom.create_namespaced_custom_object, api.group, api.version),
                group,
                plural=api.plural,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            raise unserved(api) from None

    async def patch_status(self, key: JobKey, body: dict[str, Any]) -> str | None:
        """A merge patch of the job's status; returns the job's new resourceVersion (None when the
        response does not say), which the watch filter needs to know the write's echo."""
        response = await self.call(
            "patch finetunejobs/status",
            self.custom.patch_namespaced_custom_object_status,
            contract.API_GROUP,
            contract.API_VERSION,
            key[0],
            contract.PLURAL,
            key[1],
            body,
            _content_type=MERGE_PATCH,
        )
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return str(json.loads(response.data)["metadata"]["resourceVersion"])
        return None
