"""A test kubelet: moves the emulator's rank pods through their lives as the test scripts them.

Each pod's behaviour is chosen by (attempt, rank) when it is created: run and exit with a code and a
termination message, be OOMKilled or evicted, hang in ImagePullBackOff or unschedulable, run until
deleted, fail in an init container, finish beside a sidecar that exits 143 after it, or lose its
node. Rank 0 of a running pod prints FTJOB_PROGRESS lines into its log as the trainer does. A deleted
pod is terminated (exit 143) and then removed, unless its node is lost: then this kubelet stops
writing anything, and the node lifecycle (tests/support/nodes.py) does what the control plane does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune_operator import contract
from finetune_operator.api.status import CheckpointRef, InPlaceRestart, Progress
from finetune_operator.clock import wait_event
from finetune_operator.progress import ProgressReport, format_line

from tests.support.clock import JumpingClock
from tests.support.cluster import PODS, ClusterEmulator, timestamp
from tests.support.nodes import NodeLifecycle
from tests.support.pods import NO_GPU_FREE
from tests.support.scheduler import Scheduler


@dataclass(frozen=True)
class Rank:
    exit_code: int | None = 0  # None: runs until deleted
    after: float = 0.3  # seconds of running before it exits (or is evicted, or loses its node)
    message: str = ""  # termination message
    reason: str | None = None  # container's terminated reason (OOMKilled); default Completed/Error
    waiting: str | None = None  # never starts: ImagePullBackOff, CreateContainerConfigError...
    # never scheduled: True for kube-scheduler's "no GPU free" message, or the message to show
    unschedulable: bool | str = False
    evicted: bool = False
    node_lost: bool = False
    progress: bool = True  # rank 0 reports progress while it runs
    init_failure: tuple[int, str] | None = None  # an init container exits (code, message) first
    sidecar_exit: int | None = None  # a classic sidecar container exits so after the trainer
    stop_after: float = 0.0  # seconds from SIGTERM to exit 143 (the emergency checkpoint)
    report_every: float = 0.05  # rank 0's seconds between progress reports
    # rank 0's report at this step says its processes restarted in place (as the trainer's rank 0
    # reports it after its launcher's agent restarted them), and training resumes 5 steps back
    restarted_in_place_at: int | None = None


Script = Callable[[int, int], Rank]


def script(default: Rank | None = None, **by_pod: Rank) -> Script:
    """Behaviours by "a<attempt>" or "a<attempt>n<rank>" keys, the default for the rest."""
    fallback = default or Rank()

    def choose(attempt: int, rank: int) -> Rank:
        return by_pod.get(f"a{attempt}n{rank}") or by_pod.get(f"a{attempt}") or fallback

    return choose


class Kubelet:
    def __init__(self, cluster: ClusterEmulator, clock: JumpingClock, behaviour: Script) -> None:
        self.cluster, self.clock, self.behaviour = cluster, clock, behaviour
        self._pods: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._deleting: dict[tuple[str, str], asyncio.Event] = {}
        self.started: list[str] = []  # pod names in the order they started running
        self.nodes = NodeLifecycle(cluster, clock)
        # What keeps a pod from being scheduled (a gate, a gang not yet admitted): a pod any of these
        # holds is left as created and looked at again on each change of it (tests/support/gangs.py).
        self.holds: list[Callable[[dict[str, Any]], bool]] = []
        self._held: set[tuple[str, str]] = set()
        # Places pods on emulated nodes by their spec (tests/support/scheduler.py); None binds rank r
        # to node-r at once, as if the cluster always had room.
        self.scheduler: Scheduler | None = None

    async def run(self) -> None:
        lifecycle = asyncio.create_task(self.nodes.run())
        try:
            async for event in self.cluster._buses[PODS]:
                self._on(event["type"], event["object"])
        finally:
            lifecycle.cancel()
            for task in self._pods.values():
                task.cancel()

    def _on(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if kind in ("ADDED", "MODIFIED") and key not in self._pods and not meta.get("deletionTimestamp"):
            if any(hold(pod) for hold in self.holds):
                self._held.add(key)
                return
            if kind == "MODIFIED" and key not in self._held:
                return
            self._held.discard(key)
            self._deleting[key] = asyncio.Event()
            self._pods[key] = asyncio.create_task(self._live(key, meta.get("labels") or {}))
        elif kind == "MODIFIED" and meta.get("deletionTimestamp") and key in self._deleting:
            self._deleting[key].set()
        elif kind == "DELETED":
            self._held.discard(key)
            if self.scheduler is not None:
                self.scheduler.unbind(key)
        if kind == "DELETED" and key in self._pods:
            self._pods.pop(key).cancel()
            self._deleting.pop(key, None)

    async def _write(self, key: tuple[str, str], patch: dict[str, Any]) -> None:
        await self.cluster.write(PODS, key[0], key[1], patch)

    async def _live(self, key: tuple[str, str], labels: dict[str, str]) -> None:
        attempt, rank = int(labels[contract.LABEL_ATTEMPT]), int(labels[contract.LABEL_RANK])
        b = self.behaviour(attempt, rank)
        deleting = self._deleting[key]
        if b.unschedulable:
            message = b.unschedulable if isinstance(b.unschedulable, str) else NO_GPU_FREE
            await self._write(key, {"status": {"conditions": [self._unschedulable(message)]}})
            await deleting.wait()
            return await self.cluster.remove(PODS, *key)
        node = await self._schedule(key) if self.scheduler is not None else f"node-{rank}"
        # The binding sets PodScheduled=True stamped with its time (pkg/registry/core/pod/storage/
        # storage.go setPodNodeAndMetadata -> podutil.UpdatePodCondition, which stamps a change).
        scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": timestamp(self.clock)}
        await self._write(key, {"spec": {"nodeName": node}, "status": {"conditions": [scheduled]}})
        if b.init_failure:
            # restartPolicy Never: a failed init container fails the pod; the trainer never starts
            # (pkg/kubelet/kubelet_pods.go: the trainer waits in PodInitializing).
            code, message = b.init_failure
            init = {"terminated": {"exitCode": code, "reason": "Error", "message": message,
                                   "finishedAt": timestamp(self.clock)}}  # fmt: skip
            status = {
                "phase": "Failed",
                "initContainerStatuses": [{**self._container(init), "name": "mesh-init"}],
                "containerStatuses": [self._container({"waiting": {"reason": "PodInitializing"}})],
            }
            await self._write(key, {"status": status})
            await deleting.wait()
            return await self.cluster.remove(PODS, *key)
        if b.waiting:
            state = {"waiting": {"reason": b.waiting, "message": f"{b.waiting} for the trainer image"}}
            await self._write(key, {"status": {"containerStatuses": [self._container(state)]}})
            await deleting.wait()
            return await self.cluster.remove(PODS, *key)
        running = {"running": {"startedAt": timestamp(self.clock)}}
        ready = {"type": "Ready", "status": "True", "lastTransitionTime": timestamp(self.clock)}
        await self._write(
            key,
            {
                "status": {
                    "phase": "Running",
                    "conditions": [scheduled, ready],
                    "containerStatuses": [self._container(running)],
                }
            },
        )
        self.started.append(key[1])
        reports = rank == 0 and b.progress
        report = self._report(key, b.report_every, attempt, b.restarted_in_place_at) if reports else None
        reporter = asyncio.create_task(report) if report else None
        try:
            ended = b.exit_code is not None or b.evicted or b.node_lost
            await wait_event(deleting, b.after if ended else None)
        finally:
            if reporter:
                reporter.cancel()
        if deleting.is_set():
            await asyncio.sleep(b.stop_after)
            await self._terminate(key, 143, "Error", "")
        elif b.node_lost:
            self.nodes.lose(node)
            return  # its kubelet is gone: it writes nothing more, and nothing finishes a deletion
        elif b.evicted:
            # pkg/kubelet/eviction/eviction_manager.go evictPod: Failed, reason Evicted, the eviction
            # message (the rank's `message`: node pressure or its own limit) in status and condition
            said = b.message or "The node was low on resource: memory. "
            disruption = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                          "message": said}  # fmt: skip
            evicted = {
                "phase": "Failed",
                "reason": "Evicted",
                "message": said,
                "conditions": [scheduled, disruption],
            }
            await self._write(key, {"status": evicted})
        else:
            assert b.exit_code is not None
            reason = b.reason or ("Completed" if b.exit_code == 0 else "Error")
            await self._terminate(key, b.exit_code, reason, b.message)
        await deleting.wait()
        await self.cluster.remove(PODS, *key)

    def _unschedulable(self, message: str) -> dict[str, Any]:
        return {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                "lastTransitionTime": timestamp(self.clock)}  # fmt: skip

    async def _schedule(self, key: tuple[str, str]) -> str:
        """Wait, as kube-scheduler's queue does, until the pod fits somewhere; each change of
        capacity retries it (a DELETED event cancels the wait with the pod's task)."""
        assert self.scheduler is not None
        said = None
        while True:
            changed = self.scheduler.changed
            pod = self.cluster.get(PODS, *key) or {}
            placed = self.scheduler.place(key, pod)
            if placed.node is not None:
                return placed.node
            if placed.message != said:
                said = placed.message
                await self._write(key, {"status": {"conditions": [self._unschedulable(said or "")]}})
            await changed.wait()

    async def _terminate(self, key: tuple[str, str], code: int, reason: str, message: str) -> None:
        terminated: dict[str, Any] = {"exitCode": code, "reason": reason, "finishedAt": timestamp(self.clock)}
        if message:
            terminated["message"] = message + "\n"
        phase = "Succeeded" if code == 0 else "Failed"
        containers = [self._container({"terminated": terminated})]
        sidecar = self.behaviour(*self._rank_of(key)).sidecar_exit if code == 0 else None
        if sidecar is not None:
            # A classic sidecar stopped after the trainer: its exit enters the phase (getPhase).
            stopped = {"exitCode": sidecar, "reason": "Error", "finishedAt": timestamp(self.clock)}
            containers.append({**self._container({"terminated": stopped}), "name": "mesh-proxy"})
            phase = "Succeeded" if sidecar == 0 else "Failed"
        await self._write(key, {"status": {"phase": phase, "containerStatuses": containers}})

    def _rank_of(self, key: tuple[str, str]) -> tuple[int, int]:
        labels = (self.cluster.get(PODS, *key) or {}).get("metadata", {}).get("labels") or {}
        return int(labels.get(contract.LABEL_ATTEMPT, 0)), int(labels.get(contract.LABEL_RANK, 0))

    @staticmethod
    def _container(state: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": contract.CONTAINER_NAME,
            "image": "registry.example/finetune-trainer:test",
            "imageID": "" if "waiting" in state else "registry.example/finetune-trainer@sha256:0123abcd",
            "restartCount": 0,
            "started": "running" in state,
            "ready": "running" in state,
            "state": state,
        }

    async def _report(
        self, key: tuple[str, str], every: float, attempt: int, restarted_at: int | None = None
    ) -> None:
        """Rank 0's progress lines, one every `every` seconds, a checkpoint every 10 steps."""
        step = 0
        restarts: list[InPlaceRestart] = []
        while True:
            step += 1
            if step == restarted_at and not restarts:
                reason = "node 1: collective failed at step 12: timed out"
                restarts.append(InPlaceRestart(attempt=attempt, number=1, at=self.clock.now(), exit_code=75,
                                               reason=reason))  # fmt: skip
                step -= 5
            checkpoint = None
            if step >= 10:
                done = step - step % 10
                checkpoint = CheckpointRef(step=done, uri=f"s3://ckpt/{key[0]}/{key[1]}/step-{done:08d}")
            report = ProgressReport(
                progress=Progress(
                    step=step,
                    total_steps=1000,
                    loss=2.0 - step / 1000,
                    updated_at=self.clock.now(),
                    in_place_restarts=restarts or None,
                ),
                latest_checkpoint=checkpoint,
            )
            self.cluster.append_log(key, "some trainer output\n" + format_line(report) + "\n")
            await asyncio.sleep(every)
