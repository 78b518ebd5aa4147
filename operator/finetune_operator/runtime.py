"""The running operator behind the kopf handlers: the work queue, its workers and timers, the
reconciler with its backend, the progress poller, the watch filter, and the metrics endpoint. It
remembers nothing the cluster does not: a fresh Runtime carries on where a killed one stopped."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kubernetes import client, config

from finetune_operator.backends.base import JobKey
from finetune_operator.backends.kube_api import KubeApi
from finetune_operator.backends.kubernetes import KubernetesBackend
from finetune_operator.clock import Clock, SystemClock
from finetune_operator.metrics import Metrics
from finetune_operator.progress_poll import ProgressLog, ProgressPoller
from finetune_operator.reconciler import Reconciler
from finetune_operator.settings import OperatorSettings
from finetune_operator.watch_filter import WatchFilter
from finetune_operator.workqueue import WorkQueue

log = logging.getLogger("finetune_operator")
EVENT_BATCH_SECONDS = 0.05  # a burst of pod events for one job becomes one pass


def load_api_client(settings: OperatorSettings) -> client.ApiClient:
    """In a pod: its service account; elsewhere: the kubeconfig, as kubectl would use it."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = settings.workers + settings.create_concurrency
    return client.ApiClient(configuration)


class Runtime:
    def __init__(
        self,
        settings: OperatorSettings,
        api: client.ApiClient,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.metrics = Metrics()
        self.queue: WorkQueue[JobKey] = WorkQueue(self.clock, batch_seconds=EVENT_BATCH_SECONDS)
        self.watch = WatchFilter()
        self.watch.on_change = self.queue.add
        kube = KubeApi(api, settings, self.metrics)
        progress = ProgressLog(kube, self.watch)
        self.backend = KubernetesBackend(kube, progress, self.watch)
        self.poller = ProgressPoller(
            progress,
            self.clock,
            settings.progress_poll_seconds,
            settings.workers + settings.create_concurrency,
        )
        self.poller.on_restart = self.queue.add
        self.reconciler = Reconciler(self.backend, self.clock, settings, self.metrics, self.poller)
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: Any = None

    def start(self) -> None:
        if self.settings.metrics_port:
            self._metrics_server = self.metrics.serve(self.settings.metrics_port)
        self._tasks.append(asyncio.create_task(self.queue.run_timers(), name="ftjob-timers"))
        self._tasks.append(asyncio.create_task(self.poller.run(), name="ftjob-progress"))
        self._tasks += [
            asyncio.create_task(self.queue.run_worker(self.reconciler.reconcile), name=f"ftjob-worker-{i}")
            for i in range(self.settings.workers)
        ]
        log.info(
            "reconciling with %d worker(s); metrics on port %s",
            self.settings.workers,
            self.settings.metrics_port or "(off)",
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        try:
            # gather, not a suppressed await per task: a cancellation of stop() itself must go on up
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._tasks.clear()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server = None
            self.backend.close()

    def forget(self, key: JobKey) -> None:
        """The job was deleted: nothing of it is kept, in the queue, the metrics, the poller or the
        watch filter."""
        self.queue.forget(key)
        self.metrics.forget(key)
        self.poller.track(key, None)
        self.watch.forget(key)

    def healthy(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)
