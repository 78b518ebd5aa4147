"""The real kopf operator (finetune_operator.handlers) run in-process against the emulator, as a
test would run it: started, stopped gracefully, or killed at any moment and started again."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import kmock
import kopf
from finetune_operator import (
    contract,
    handlers,  # noqa: F401  (registers the operator's handlers)
)
from finetune_operator.runtime import Runtime
from finetune_operator.settings import OperatorSettings
from kubernetes import client

from tests.support.clock import JumpingClock
from tests.support.cluster import EVENTS, JOBS, PODS, ClusterEmulator
from tests.support.kubelet import Kubelet, Script

TEST_SETTINGS = OperatorSettings(
    default_image="registry.example/finetune-trainer:test",
    workers=4,
    metrics_port=None,
    request_timeout_seconds=2.0,
    progress_poll_seconds=1.0,
)


@kopf.on.login()
def _login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=memo["server_url"], insecure=True)


class OperatorProcess:
    """One operator "process": kopf in its own thread and event loop (as in its own pod), with its
    own memo and runtime. kopf treats every task of its loop as its own when it exits, so it must
    not share a loop with the emulator and the kubelet."""

    def __init__(
        self,
        url: str,
        clock: JumpingClock,
        settings: OperatorSettings = TEST_SETTINGS,
        liveness: str | None = None,
        peering: str | None = None,
    ) -> None:
        self.url, self.clock, self.settings, self.liveness = url, clock, settings, liveness
        self.peering = peering  # a ClusterKopfPeering's name; None runs standalone
        self.memo = kopf.Memo(server_url=url, settings=settings, clock=clock)
        self.memo["api_client"] = client.ApiClient(client.Configuration(host=url))
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._main, name="operator", daemon=True)

    @property
    def runtime(self) -> Runtime:
        return self.memo["runtime"]  # type: ignore[no-any-return]

    def _main(self) -> None:
        async def operate() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()  # type: ignore[assignment]
            await kopf.operator(
                liveness_endpoint=self.liveness,
                clusterwide=True,
                standalone=self.peering is None,
                peering_name=self.peering,
                memo=self.memo,
                stop_flag=self._stop,
                ready_flag=self._ready,
            )

        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(operate())

    async def start(self) -> None:
        self._thread.start()
        if not await asyncio.to_thread(self._ready.wait, 20):
            raise AssertionError("the operator did not become ready within 20s")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def kill(self) -> None:
        """As SIGKILL would: every task of the operator cancelled wherever it is; what it sent is sent."""
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        await asyncio.sleep(0.1)
        self._stop.set()  # releases the executor thread kopf parks on the flag, or asyncio.run waits for it
        await asyncio.to_thread(self._thread.join, 20)
        assert not self._thread.is_alive(), f"the operator thread did not end; still running: {self._tasks()}"

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)
        assert not self._thread.is_alive(), f"the operator did not stop; still running: {self._tasks()}"

    def _tasks(self) -> list[str]:
        """What keeps a stuck operator's loop alive: each task's name and innermost frame."""
        if self._loop is None:
            return []
        out = []
        for task in list(asyncio.all_tasks(self._loop)):
            frames = task.get_stack(limit=1)
            where = f"{frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else "?"
            out.append(f"{task.get_name()} at {where}")
        return sorted(out)


@contextlib.asynccontextmanager
async def emulated_cluster(clock: JumpingClock) -> AsyncIterator[tuple[ClusterEmulator, str]]:
    async with ClusterEmulator(clock=clock) as cluster, kmock.Server(cluster) as server:
        cluster.declare()
        yield cluster, str(server.url).rstrip("/")


def with_settings(**changes: Any) -> OperatorSettings:
    return dataclasses.replace(TEST_SETTINGS, **changes)


class OperatorEnv:
    """A cluster (emulator + test kubelet) and the operator; what a test does to and reads from it."""

    def __init__(self, cluster: ClusterEmulator, url: str, clock: JumpingClock, behaviour: Script) -> None:
        self.cluster, self.url, self.clock = cluster, url, clock
        self.kubelet = Kubelet(cluster, clock, behaviour)
        self._kubelet_task = asyncio.create_task(self.kubelet.run())
        self.operators: list[OperatorProcess] = []  # every one started, so none outlives the test
        self.session = aiohttp.ClientSession(headers={"User-Agent": "kubectl-in-tests"})

    async def start_operator(
        self,
        settings: OperatorSettings = TEST_SETTINGS,
        liveness: str | None = None,
        peering: str | None = None,
    ) -> OperatorProcess:
        if peering is None:
            # The chart runs one standalone replica (strategy Recreate): two at once is a test's bug.
            assert not any(o.alive and o.peering is None for o in self.operators), "one is running"
        operator = OperatorProcess(self.url, self.clock, settings, liveness, peering)
        self.operators.append(operator)
        await operator.start()
        return operator

    @property
    def operator(self) -> OperatorProcess | None:
        """The operator started last."""
        return self.operators[-1] if self.operators else None

    async def close(self) -> None:
        # A live operator left behind would retry a closed emulator and hold the interpreter's exit.
        for operator in self.operators:
            if operator.alive:
                await operator.kill()
        self._kubelet_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._kubelet_task
        await self.session.close()

    # -- kubectl ---------------------------------------------------------------------------------

    def _path(self, namespace: str, name: str | None = None) -> str:
        group = f"{self.url}/apis/{contract.API_GROUP}/{contract.API_VERSION}"
        base = f"{group}/namespaces/{namespace}/{contract.PLURAL}"
        return f"{base}/{name}" if name else base

    async def apply(self, manifest: dict[str, Any]) -> None:
        async with self.session.post(self._path(manifest["metadata"]["namespace"]), json=manifest) as r:
            assert r.status in (200, 201), await r.text()

    async def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(self._path(namespace, name), json=patch, headers=headers) as r:
            assert r.status == 200, await r.text()

    async def delete(self, namespace: str, name: str) -> None:
        async with self.session.delete(self._path(namespace, name)) as r:
            assert r.status == 200, await r.text()

    # -- reading ---------------------------------------------------------------------------------

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.cluster.get(JOBS, namespace, name)

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return (self.job(namespace, name) or {}).get("status") or {}

    def pods(self, name: str) -> list[dict[str, Any]]:
        return self.cluster.list(PODS, f"{contract.LABEL_JOB}={name}")

    def _events(self, name: str) -> list[dict[str, Any]]:
        mine = [e for e in self.cluster.list(EVENTS) if e["involvedObject"]["name"] == name]
        return sorted(mine, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def events(self, name: str) -> list[str]:
        """Reasons of the job's events, oldest first."""
        return [e["reason"] for e in self._events(name)]

    def event_messages(self, name: str, reason: str) -> list[str]:
        return [e["message"] for e in self._events(name) if e["reason"] == reason]

    async def eventually(self, check: Callable[[], Any], *, timeout: float = 20.0, what: str = "") -> Any:
        """Wait, at most `timeout` seconds, until `check()` is truthy; return its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = check()
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not within {timeout}s: {what or check}")
            await asyncio.sleep(0.02)

    async def timed_only(self, namespace: str, name: str) -> None:
        """Wait until the job's last pass is over and its wake-up is set: a clock jump before that
        would land under a pass whose delay is then counted from the jumped clock."""
        operator = self.operator
        assert operator is not None
        key = (namespace, name)
        await self.eventually(lambda: operator.runtime.queue.only_timed(key), what=f"{key} on its timer")

    async def phase(self, namespace: str, name: str, phase: str, *, timeout: float = 20.0) -> dict[str, Any]:
        return await self.eventually(  # type: ignore[no-any-return]
            lambda: (s := self.status(namespace, name)).get("phase") == phase and s,
            timeout=timeout,
            what=f"{namespace}/{name} {phase} (it is {self.status(namespace, name).get('phase')})",
        )


@contextlib.asynccontextmanager
async def operator_env(behaviour: Script) -> AsyncIterator[OperatorEnv]:
    clock = JumpingClock()
    async with emulated_cluster(clock) as (cluster, url):
        env = OperatorEnv(cluster, url, clock, behaviour)
        try:
            yield env
        finally:
            await env.close()


@contextlib.asynccontextmanager
async def running(behaviour: Script, job: dict[str, Any]) -> AsyncIterator[OperatorEnv]:
    """The usual opening of a test: the operator started and the job applied."""
    async with operator_env(behaviour) as env:
        await env.start_operator()
        await env.apply(job)
        yield env
