"""How fast and how cheaply the operator drives jobs, against the emulated API server.

1. apply -> every rank pod created, for 1, 8, 64 and 256 node ranks, against a baseline measured in
   the same run: a bare client creating the same children straight away, with the operator's
   concurrency. Also the operator's API requests for the job's creation, against the floor (its
   children, plus a constant: a read of the job, its pods and its Service, the status, the event).
2. A rank's failure written by the kubelet -> every pod of the next attempt created, minus the
   backoff the policy chose, against the apply -> pods time of the same size.
3. 500 FineTuneJobs of 4 ranks applied at once, until all are Running: the operator process's peak
   RSS over its idle RSS, and its CPU seconds per job.
4. Steady state of N Running jobs whose rank 0 reports progress: API requests, status writes and log
   reads per Running job per poll interval (30 s, the default, unless --poll) and per minute, and the
   operator's CPU per job, for this tree's operator and, in the same run, for a baseline tree
   (`--baseline-src DIR`: e.g. `git archive <commit> operator | tar -x -C DIR`).

    .venv/bin/python benchmarks/operator_scale.py [--jobs 500] [--sizes 1 8 64 256]
    .venv/bin/python benchmarks/operator_scale.py --only steady --jobs 500 --baseline-src /tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import REPO, print_table  # also puts the repo root on sys.path
from finetune_operator.api import parse_manifest
from finetune_operator.builders import build_config_map, build_rank_pod, build_service
from finetune_operator.policy.backoff import backoff_seconds
from finetune_operator.settings import OperatorSettings

from tests.support.clock import JumpingClock
from tests.support.cluster import JOBS, PODS
from tests.support.factories import manifest
from tests.support.kubelet import Kubelet, Rank, script
from tests.support.operator import emulated_cluster

NS = "bench"
WORKERS = OperatorSettings().workers
CONCURRENCY = OperatorSettings().create_concurrency


def job(name: str, nodes: int) -> dict[str, Any]:
    return manifest(
        {
            "spec.resources.nodes": nodes,
            "spec.runPolicy.backoffBaseSeconds": 1,
            "spec.runPolicy.backoffCapSeconds": 1,
        },
        name=name,
        namespace=NS,
    )


class Operator:
    def __init__(self, url: str, src: Path | None = None, poll: float = 5.0) -> None:
        """`src`: a tree holding another version's operator/ to run instead of this one."""
        path = f"{src / 'operator'}:{REPO}" if src else str(REPO)
        script = str(Path(__file__).with_name("_operator_process.py"))
        self.proc = subprocess.Popen(
            [sys.executable, script, url, str(WORKERS), str(poll)],
            env={**os.environ, "PYTHONPATH": path},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def rss(self) -> int:
        return self._status("VmRSS")

    def peak_rss(self) -> int:
        return self._status("VmHWM")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> None:
        """SIGTERM, waited for off the loop: the emulator must keep serving the operator's goodbye."""
        self.proc.terminate()
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def post(session: Any, url: str, path: str, body: dict[str, Any]) -> None:
    async with session.post(url + path, json=body) as response:
        assert response.status in (200, 201, 409), await response.text()


async def bare_create(session: Any, url: str, name: str, nodes: int) -> float:
    """The children of one attempt created by a plain client, CONCURRENCY at a time."""
    obj = parse_manifest(job(name, nodes))
    ctx = OperatorSettings().build_context
    started = time.perf_counter()
    await post(session, url, f"/api/v1/namespaces/{NS}/services", build_service(obj))
    await post(session, url, f"/api/v1/namespaces/{NS}/configmaps", build_config_map(obj, 1))
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(rank: int) -> None:
        async with gate:
            await post(session, url, f"/api/v1/namespaces/{NS}/pods", build_rank_pod(obj, 1, rank, ctx))

    await asyncio.gather(*(one(r) for r in range(nodes)))
    return time.perf_counter() - started


def pods_of(cluster: Any, name: str, attempt: int) -> int:
    return int(cluster.count(PODS, f"finetune.dev/job-name={name},finetune.dev/attempt={attempt}"))


async def creation_and_restart(sizes: list[int]) -> None:
    import aiohttp

    clock = JumpingClock()
    rows, restart_rows = [], []
    async with emulated_cluster(clock) as (cluster, url):
        behaviour = script(Rank(exit_code=None, progress=False))
        kubelet = Kubelet(cluster, clock, behaviour)
        kubelet_task = asyncio.create_task(kubelet.run())
        operator = Operator(url)
        async with aiohttp.ClientSession() as session:
            await wait_for(lambda: any(c.verb == "watch" for c in cluster.calls), 30, "operator watching")
            await asyncio.sleep(1.0)
            for nodes in sizes:
                bare = await bare_create(session, url, f"bare-{nodes}", nodes)
                name = f"job-{nodes}"
                first = len(cluster.calls)
                started = time.perf_counter()
                await post(
                    session,
                    url,
                    f"/apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs",
                    job(name, nodes),
                )
                await wait_for(lambda n=name, k=nodes: pods_of(cluster, n, 1) == k, 120, f"{name} pods")
                took = time.perf_counter() - started
                await wait_for(
                    lambda n=name: (
                        (cluster.get(JOBS, NS, n) or {}).get("status", {}).get("phase") == "Running"
                    ),
                    120,
                    f"{name} running",
                )
                await asyncio.sleep(0.5)
                requests = [c for c in cluster.calls[first:] if c.from_operator and c.verb != "watch"]
                floor = nodes + 2
                rows.append(
                    [
                        str(nodes),
                        f"{took:.3f}",
                        f"{bare:.3f}",
                        f"{took / bare:.2f}",
                        str(len(requests)),
                        str(floor),
                        f"{len(requests) / floor:.2f}",
                    ]
                )

                # a rank fails: the kubelet writes its exit, as a real one would
                failed_at = time.perf_counter()
                pod = f"{name}-a1-n{nodes - 1}"
                terminated = {"exitCode": 1, "reason": "Error", "message": "RuntimeError at step 5\n"}
                await cluster.write(
                    PODS,
                    NS,
                    pod,
                    {
                        "status": {
                            "phase": "Failed",
                            "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
                        }
                    },
                )
                await wait_for(
                    lambda n=name, k=nodes: pods_of(cluster, n, 2) == k, 180, f"{name} attempt 2 pods"
                )
                restart = time.perf_counter() - failed_at
                uid = cluster.get(JOBS, NS, name)["metadata"]["uid"]
                backoff = backoff_seconds(restarts=0, base=1, cap=1, uid=uid, attempt=1)
                restart_rows.append(
                    [
                        str(nodes),
                        f"{restart:.3f}",
                        f"{backoff:.3f}",
                        f"{restart - backoff:.3f}",
                        f"{(restart - backoff) / took:.2f}",
                    ]
                )
        await operator.stop()
        kubelet_task.cancel()
    print_table(
        "apply -> all rank pods created (operator) vs the same children created by a bare client",
        ["node ranks", "operator s", "bare client s", "ratio", "API requests", "floor (children)", "ratio"],
        rows,
    )
    print_table(
        "rank failure written -> every pod of attempt 2 created",
        ["node ranks", "total s", "backoff s", "minus backoff s", "ratio to apply -> pods"],
        restart_rows,
    )


async def many_jobs(count: int, nodes: int) -> None:
    import aiohttp

    clock = JumpingClock()
    async with emulated_cluster(clock) as (cluster, url):
        kubelet = Kubelet(cluster, clock, script(Rank(exit_code=None, progress=False)))
        kubelet_task = asyncio.create_task(kubelet.run())
        operator = Operator(url)
        await wait_for(lambda: any(c.verb == "watch" for c in cluster.calls), 30, "operator watching")
        await asyncio.sleep(2.0)
        idle_rss, idle_cpu = operator.rss(), operator.cpu_seconds()
        started = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                *(
                    post(
                        session,
                        url,
                        f"/apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs",
                        job(f"many-{i}", nodes),
                    )
                    for i in range(count)
                )
            )

        def all_running() -> bool:
            phases = [
                (obj.last.raw.get("status") or {}).get("phase")
                for (resource, _, _), obj in list(cluster.objects.items())
                if resource == JOBS and not obj.deleted
            ]
            return len(phases) == count and all(p == "Running" for p in phases)

        await wait_for(all_running, 900, f"{count} jobs Running")
        took = time.perf_counter() - started
        peak, cpu = operator.peak_rss(), operator.cpu_seconds() - idle_cpu
        requests = sum(1 for c in cluster.calls if c.from_operator and c.verb != "watch")
        await operator.stop()
        kubelet_task.cancel()
    mib = 1024 * 1024
    print_table(
        f"{count} FineTuneJobs x {nodes} ranks applied at once, until all Running",
        ["measure", "value"],
        [
            ["wall seconds", f"{took:.1f}"],
            ["operator idle RSS MiB (baseline)", f"{idle_rss / mib:.1f}"],
            ["operator peak RSS MiB", f"{peak / mib:.1f}"],
            ["peak / idle", f"{peak / idle_rss:.2f}"],
            ["RSS KiB per job over idle", f"{(peak - idle_rss) / count / 1024:.1f}"],
            ["operator CPU seconds per job", f"{cpu / count:.4f}"],
            ["operator API requests per job", f"{requests / count:.1f}"],
        ],
    )


async def steady_state(count: int, src: Path | None, window: float, poll: float) -> dict[str, float]:
    """N one-rank jobs Running, rank 0 reporting every 2 s; the operator's requests over `window`."""
    import aiohttp

    clock = JumpingClock()
    async with emulated_cluster(clock) as (cluster, url):
        kubelet = Kubelet(cluster, clock, script(Rank(exit_code=None, report_every=2.0)))
        kubelet_task = asyncio.create_task(kubelet.run())
        operator = Operator(url, src, poll)
        await wait_for(lambda: any(c.verb == "watch" for c in cluster.calls), 30, "operator watching")
        async with aiohttp.ClientSession() as session:
            for first in range(0, count, 50):
                await asyncio.gather(
                    *(
                        post(session, url, f"/apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs",
                             job(f"steady-{i}", 1))
                        for i in range(first, min(count, first + 50))
                    )
                )  # fmt: skip

        def running() -> int:
            return sum(
                1
                for (resource, _, _), obj in list(cluster.objects.items())
                if resource == JOBS
                and not obj.deleted
                and (obj.last.raw.get("status") or {}).get("phase") == "Running"
            )

        await wait_for(lambda: running() == count, 900, f"{count} jobs Running")
        await asyncio.sleep(2 * poll)  # past the transition passes
        first, cpu = len(cluster.calls), operator.cpu_seconds()
        started = time.perf_counter()
        await asyncio.sleep(window)
        took = time.perf_counter() - started
        calls = [c for c in cluster.calls[first:] if c.from_operator and c.verb != "watch"]
        cpu = operator.cpu_seconds() - cpu
        still = running()
        await operator.stop()
        kubelet_task.cancel()
    polls = took / poll
    per_poll = {
        "requests": len(calls) / count / polls,
        "status writes": sum(c.resource == "finetunejobs/status" for c in calls) / count / polls,
        "log reads": sum(c.resource == "pods/log" for c in calls) / count / polls,
        "job reads": sum(c.resource == "finetunejobs" and c.verb == "get" for c in calls) / count / polls,
        "pod lists": sum(c.resource == "pods" and c.verb == "list" for c in calls) / count / polls,
    }
    return {**per_poll, "cpu ms per job per poll": 1000 * cpu / count / polls, "running at end": still}


async def steady(count: int, baseline: Path | None, window: float, poll: float) -> None:
    runs = [("this tree", None)] + ([("baseline", baseline)] if baseline else [])
    results = {label: await steady_state(count, src, window, poll) for label, src in runs}
    keys = list(results["this tree"])
    rows = []
    for key in keys:
        now = results["this tree"][key]
        row = [key, f"{now:.2f}"]
        if baseline:
            before = results["baseline"][key]
            row += [f"{before:.2f}", f"{now / before:.2f}" if before else "-"]
        rows.append(row)
    per_minute = 60 / poll
    minute = ["requests per job per minute", f"{results['this tree']['requests'] * per_minute:.2f}"]
    if baseline:
        minute += [f"{results['baseline']['requests'] * per_minute:.2f}", ""]
    rows.append(minute)
    header = ["per Running job per poll interval", "this tree"] + (["baseline", "ratio"] if baseline else [])
    print_table(f"{count} Running jobs, {window:.0f} s window, poll every {poll:.0f} s", header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--only", choices=["create", "many", "steady"])
    parser.add_argument("--baseline-src", type=Path, help="a tree whose operator/ is the baseline")
    parser.add_argument("--window", type=float, default=90.0, help="steady-state measuring window, s")
    parser.add_argument("--poll", type=float, default=30.0, help="the operator's progress poll, s")
    args = parser.parse_args()
    if args.only in (None, "create"):
        asyncio.run(creation_and_restart(args.sizes))
    if args.only in (None, "many"):
        asyncio.run(many_jobs(args.jobs, args.ranks))
    if args.only in (None, "steady"):
        asyncio.run(steady(args.jobs, args.baseline_src, args.window, args.poll))


if __name__ == "__main__":
    main()
