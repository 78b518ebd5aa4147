"""`ftjob logs NAME [--rank N] [--attempt A] [-f]`: a rank's trainer log, from a local run's workdir
or from the cluster (`pods/log` through the user's kubeconfig), of the job's current attempt unless
another is named. Following ends when the rank's process (pod) ends or the reader goes away."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_operator import contract
from finetune_operator.backends.local import process_alive
from finetune_operator.builders import naming
from finetune_operator.pipes import QuietStdout

POLL_SECONDS = 0.5
CHUNK = 64 * 1024


class LogsError(Exception):
    """Why there is no log to show, in words for the user."""


def rank_pod(body: dict[str, Any], rank: int, attempt: int | None) -> str:
    """The pod of `rank` in `attempt` (the job's current one by default)."""
    name = body["metadata"]["name"]
    current = int((body.get("status") or {}).get("attempt") or 0)
    chosen = current if attempt is None else attempt
    if chosen < 1:
        raise LogsError(f"job {name} has not started a gang yet (status.attempt is {current})")
    nodes = int((body.get("spec") or {}).get("resources", {}).get("nodes", 1))
    if not 0 <= rank < nodes:
        raise LogsError(f"job {name} has node ranks 0..{nodes - 1}, not {rank}")
    return naming.pod_name(name, chosen, rank)


def _local_pod_running(record: dict[str, Any] | None) -> bool:
    """Running as the workdir recorded it and its process still there: a pod whose process ended
    while no `ftjob run` watched is still recorded Running, and following it would never end."""
    if record is None or (record.get("status") or {}).get("phase") != "Running":
        return False
    pid = (record.get("local") or {}).get("pid")
    return isinstance(pid, int) and process_alive(pid)


def local_logs(
    workdir: Path,
    rank: int,
    attempt: int | None,
    follow: bool,
    out: QuietStdout,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    from finetune_operator.backends.local import LocalBackend

    backend = LocalBackend(workdir)
    body = backend.read_job()
    if body is None:
        raise LogsError(f"no job in {workdir}")
    pod = rank_pod(body, rank, attempt)
    path = backend.log_path(pod)
    if not path.exists():
        raise LogsError(f"no log for pod {pod} in {workdir}: its rank has not started")

    def record() -> dict[str, Any] | None:
        found = [r for r in backend.pod_records() if r["metadata"]["name"] == pod]
        return found[0] if found else None

    with path.open("rb") as log:
        while not out.reader_gone:
            running = follow and _local_pod_running(record())  # asked before reading: no lost tail
            data = log.read(CHUNK)
            if data:
                out.write_bytes(data)
                continue
            if not running:
                return
            sleep(POLL_SECONDS)


def cluster_logs(
    name: str,
    namespace: str,
    rank: int,
    attempt: int | None,
    follow: bool,
    out: QuietStdout,
    kubeconfig: str | None = None,
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from finetune_operator.jobview import cluster_job

    body, api = cluster_job(name, namespace, kubeconfig)
    if body is None:
        raise LogsError(f"no FineTuneJob {name!r} in namespace {namespace}")
    core = client.CoreV1Api(api)
    pod = rank_pod(body, rank, attempt)
    try:
        # Unparsed: the client would decode the whole log into one str, and never stream a follow.
        response: Any = core.read_namespaced_pod_log(
            pod, namespace, container=contract.CONTAINER_NAME, follow=follow, _preload_content=False
        )
    except ApiException as exc:
        if exc.status == 404:
            raise LogsError(
                f"no pod {pod} in namespace {namespace}: not created yet, or deleted "
                "(runPolicy.cleanPodPolicy, a restart)"
            ) from None
        if exc.status == 400:  # the container has not started: the server says why
            raise LogsError(f"pod {pod}: {_server_message(exc)}") from None
        raise
    try:
        for chunk in response.stream(CHUNK, decode_content=True):
            out.write_bytes(chunk)
            if out.reader_gone:
                return
    finally:
        response.release_conn()


def _server_message(exc: Any) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message", exc.reason))
    except (TypeError, ValueError):
        return str(exc.reason)
