"""The local backend: a FineTuneJob run on this machine, each "pod" a local process group running the
command and env the rank pod would get. The same Reconciler and decide step drive it as drive the
cluster, so restarts, backoff, deadlines and failure classes behave as they would there.

Everything lives in the workdir, so `ftjob status` can read it and a second `ftjob run` continues:

    job.json                 the job as the API server would hold it (spec, status, resourceVersion)
    events.jsonl             the job's events, one JSON object per line
    pods/<pod>.json          each rank "pod": metadata, status (phase, exit code, message), pid
    logs/<pod>.log           each rank's stdout and stderr
    attempt-<n>/config.json  the attempt's trainer config (what the ConfigMap holds on a cluster)
    scratch/<pod>/           the rank's scratch volume
    store/                   the checkpoint store, unless the manifest names another
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from finetune_operator import contract, rank_supervisor
from finetune_operator.api import FineTuneJob, FineTuneJobStatus, parse_manifest
from finetune_operator.backends.base import JobKey
from finetune_operator.builders import BuildContext, build_config_map, build_rank_pod, naming
from finetune_operator.policy import actions as act
from finetune_operator.policy.decide import Observed
from finetune_operator.policy.observed import format_time, observe_pod, rank0_of_current_attempt
from finetune_operator.progress import TAIL_BYTES, ProgressReport, parse_last

LOCAL_CONTEXT = BuildContext(default_image="local")  # the image is this machine's Python environment
# How a rank "pod" is started: the pod's command (config path and python already made local) and
# env in, a process out. Tests substitute a scripted program; nothing else differs.
Spawner = Callable[[list[str], dict[str, str], Path], subprocess.Popen[bytes]]


def spawn_process_group(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """The rank's command under `rank_supervisor`, which ends the rank's whole process tree when
    this process goes (even by SIGKILL) or the command ends; in a session of its own, so the rank is
    signalled as one group, like a pod."""
    # Past the launcher's own shutdown timeout (the ranks' emergency checkpoint), the rest is killed.
    grace = float(env.get(contract.ENV_SHUTDOWN_TIMEOUT, "30")) + contract.SHUTDOWN_MARGIN_SECONDS
    supervisor = [sys.executable, "-I", rank_supervisor.__file__, "--parent", str(os.getpid())]
    supervised = [*supervisor, "--grace", str(grace)]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [*supervised, "--", *command], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def signal_rank(pid: int, sig: int) -> None:
    """Signal a rank "pod": its process group (supervisor and launcher; the launcher forwards a
    SIGTERM to its workers). A SIGKILL also goes to every process below the supervisor, since it
    ends the supervisor too and torchrun's workers, in sessions of their own, would be left."""
    below = rank_supervisor.descendants(pid) if sig == signal.SIGKILL else []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for child in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, sig)


def _write_json(path: Path, body: dict[str, Any]) -> None:
    """Atomic: a reader (or a killed run) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(body, indent=2))
    os.replace(tmp, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalBackend:
    def __init__(
        self,
        workdir: Path,
        *,
        gpus_per_node: int = 0,
        base_env: dict[str, str] | None = None,
        spawn: Spawner = spawn_process_group,
    ) -> None:
        self.workdir = workdir.resolve()
        self.gpus_per_node = gpus_per_node
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.spawn = spawn
        self.children: dict[str, subprocess.Popen[bytes]] = {}  # rank pods started by this process

    # -- the "API objects" -----------------------------------------------------------------------

    @property
    def job_path(self) -> Path:
        return self.workdir / "job.json"

    def pod_path(self, name: str) -> Path:
        return self.workdir / "pods" / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def read_job(self) -> dict[str, Any] | None:
        return json.loads(self.job_path.read_text()) if self.job_path.exists() else None

    def submit(self, manifest: dict[str, Any], now: datetime) -> FineTuneJob:
        """`kubectl apply` for the workdir: a new job, or the spec of an existing one replaced with
        its status kept (which is how a second `ftjob run` resumes)."""
        job = parse_manifest(manifest)  # refuses a bad manifest before anything is written
        body = dict(manifest)
        stored = self.read_job()
        meta = dict(body.get("metadata") or {})
        meta.setdefault("namespace", job.metadata.namespace)
        if stored is not None:
            old = stored["metadata"]
            if old["name"] != meta["name"]:
                raise ValueError(
                    f"{self.workdir} holds job {old['name']!r}, not {meta['name']!r}: use another --workdir"
                )
            changed = stored.get("spec") != body.get("spec")
            meta.update(
                creationTimestamp=old["creationTimestamp"],
                generation=old.get("generation", 1) + (1 if changed else 0),
                resourceVersion=str(int(old["resourceVersion"]) + 1),
            )
            if stored.get("status"):
                body["status"] = stored["status"]
        else:
            meta.update(creationTimestamp=format_time(now), generation=1, resourceVersion="1")
        body["metadata"] = meta
        _write_json(self.job_path, body)
        return parse_manifest(body)

    # -- Backend ---------------------------------------------------------------------------------

    async def observe(self, key: JobKey, now: datetime) -> Observed | None:
        body = self.read_job()
        if body is None or body["metadata"]["name"] != key[1]:
            return None
        job = parse_manifest(body)
        if job.spec.gang is not None:
            # One machine, no gang scheduler: the job is decided as if it had none (never Queued, no
            # PodGroup actions); the manifest keeps it for the cluster.
            job = job.model_copy(update={"spec": job.spec.model_copy(update={"gang": None})})
        pods = [self._refresh(path, now) for path in sorted((self.workdir / "pods").glob("*.json"))]
        observed = tuple(observe_pod(p) for p in pods if p is not None)
        return Observed(
            job=job,
            pods=observed,
            service_exists=(self.workdir / "service").exists(),
            now=now,
            progress=self._progress(job, observed),
        )

    async def write_status(self, job: FineTuneJob, status: FineTuneJobStatus) -> bool:
        body = self.read_job()
        seen = (job.metadata.model_extra or {}).get("resourceVersion")
        if body is None or body["metadata"].get("resourceVersion") != seen:
            return False
        body["status"] = status.to_wire()
        body["metadata"]["resourceVersion"] = str(int(body["metadata"]["resourceVersion"]) + 1)
        _write_json(self.job_path, body)
        return True

    async def emit(self, job: FineTuneJob, event: act.Event) -> None:
        line = {"time": format_time(datetime.now(UTC)), "type": event.type, "reason": event.reason}
        line["message"] = event.message
        with (self.workdir / "events.jsonl").open("a") as events:
            events.write(json.dumps(line) + "\n")

    async def apply(self, job: FineTuneJob, action: act.Action) -> None:
        match action:
            case act.CreateService():
                (self.workdir / "service").touch()  # no DNS to publish: ranks meet on 127.0.0.1
            case act.CreateAttempt(attempt=attempt, ranks=ranks):
                self._write_config(job, attempt)
                port = _free_port()
                for rank in ranks:
                    if not self.pod_path(naming.pod_name(job.metadata.name, attempt, rank)).exists():
                        self._start(job, attempt, rank, port)
            case act.CreatePodGroup() | act.DeletePodGroup():
                pass  # never decided here (observe drops spec.gang); a gang on one machine starts whole
            case act.DeletePods(names=names, force=force):
                for name in names:
                    self.delete_pod(name, force, job.spec.run_policy.termination_grace_period_seconds)
            case act.DeleteAttemptConfig(attempt=attempt):
                (self.workdir / f"attempt-{attempt}" / "config.json").unlink(missing_ok=True)
            case act.DeleteJob():
                for path in (self.workdir / "pods").glob("*.json"):
                    self.delete_pod(path.stem, True, 0)
                self.job_path.unlink(missing_ok=True)

    # -- rank "pods" -----------------------------------------------------------------------------

    def _write_config(self, job: FineTuneJob, attempt: int) -> Path:
        path = self.workdir / f"attempt-{attempt}" / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(build_config_map(job, attempt)["data"][contract.CONFIG_FILE_NAME])
        return path

    def rank_process(
        self, job: FineTuneJob, attempt: int, rank: int, port: int
    ) -> tuple[list[str], dict[str, str]]:
        """The rank pod's command and env, made local: this Python, the attempt's config file, the
        rendezvous on 127.0.0.1, the scratch volume and termination log as workdir paths, and the
        node rank's share of this machine's GPUs. Credentials come from this environment (there is
        no Secret to reference), so secretKeyRef entries are left out."""
        pod = build_rank_pod(job, attempt, rank, LOCAL_CONTEXT)
        container = pod["spec"]["containers"][0]
        name = pod["metadata"]["name"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        scratch = self.workdir / "scratch" / name
        scratch.mkdir(parents=True, exist_ok=True)
        env.update(
            {
                contract.ENV_MASTER_ADDR: "127.0.0.1",
                contract.ENV_MASTER_PORT: str(port),
                contract.ENV_SCRATCH_DIR: str(scratch),
                contract.ENV_TERMINATION_LOG: str(self.workdir / "pods" / f"{name}.termination"),
                "HF_HOME": str(scratch / "hf"),
            }
        )
        if self.gpus_per_node:
            first = rank * self.gpus_per_node
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(self.gpus_per_node))
        config = str(self.workdir / f"attempt-{attempt}" / "config.json")
        command = [sys.executable if part == "python" else part for part in container["command"]]
        command = [config if part == contract.CONFIG_PATH else part for part in command]
        command = [_expand(part, env) for part in command]
        return command, {**self.base_env, **env}

    def _start(self, job: FineTuneJob, attempt: int, rank: int, port: int) -> None:
        name = naming.pod_name(job.metadata.name, attempt, rank)
        command, env = self.rank_process(job, attempt, rank, port)
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        (self.workdir / "pods").mkdir(parents=True, exist_ok=True)
        Path(env[contract.ENV_TERMINATION_LOG]).unlink(missing_ok=True)
        process = self.spawn(command, env, log)
        self.children[name] = process
        started = format_time(datetime.now(UTC))
        record = {
            "metadata": {
                "name": name,
                "namespace": job.metadata.namespace,
                "labels": naming.rank_labels(job.metadata.name, attempt, rank),
                "creationTimestamp": started,
            },
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": contract.CONTAINER_NAME, "state": {"running": {"startedAt": started}}}
                ],
            },
            "local": {"pid": process.pid, "port": port},
        }
        _write_json(self.pod_path(name), record)

    def delete_pod(self, name: str, force: bool, grace: int) -> None:
        """SIGTERM the rank's process group (SIGKILL when forced), as the kubelet would."""
        path = self.pod_path(name)
        if not path.exists():
            return
        record = json.loads(path.read_text())
        pid = record["local"]["pid"]
        if record["status"]["phase"] == "Running":
            signal_rank(pid, signal.SIGKILL if force else signal.SIGTERM)
        if force:
            path.unlink(missing_ok=True)
            self.children.pop(name, None)
            return
        if not record["metadata"].get("deletionTimestamp"):
            deadline = datetime.now(UTC) + timedelta(seconds=grace)
            record["metadata"]["deletionTimestamp"] = format_time(deadline)
            _write_json(path, record)

    def _refresh(self, path: Path, now: datetime) -> dict[str, Any] | None:
        """The pod as it is now: its process's exit recorded once seen; a deleted pod whose process
        ended is gone, as on a cluster."""
        record: dict[str, Any] = json.loads(path.read_text())
        name, pid = record["metadata"]["name"], record["local"]["pid"]
        if record["status"]["phase"] == "Running":
            code = self._exit_code(name, pid)
            if code is not None:
                record["status"] = self._terminated(name, code)
                _write_json(path, record)
        if record["metadata"].get("deletionTimestamp") and record["status"]["phase"] != "Running":
            path.unlink(missing_ok=True)
            self.children.pop(name, None)
            return None
        return record

    def _exit_code(self, name: str, pid: int) -> int | None:
        """None while it runs. A process started by an earlier `ftjob run` is not our child: we see
        that it ended but not how, which is what a lost node looks like (exit unknown)."""
        child = self.children.get(name)
        if child is not None:
            code = child.poll()
            if code is None:
                return None
            return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a container
        return None if process_alive(pid) else -1

    def _terminated(self, name: str, code: int) -> dict[str, Any]:
        if code == -1:
            return {"phase": "Failed", "reason": "NodeLost", "message": "its process ended unobserved"}
        termination = self.workdir / "pods" / f"{name}.termination"
        message = termination.read_text(errors="replace").strip() if termination.exists() else ""
        state = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "finishedAt": format_time(datetime.now(UTC)),
        }
        if message:
            state["message"] = message
        return {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{"name": contract.CONTAINER_NAME, "state": {"terminated": state}}],
        }

    def _progress(self, job: FineTuneJob, pods: tuple[Any, ...]) -> ProgressReport | None:
        rank0 = rank0_of_current_attempt(job, pods)
        if rank0 is None:
            return None
        return parse_last(tail(self.log_path(rank0.name)))

    def pod_records(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.workdir / "pods").glob("*.json"))]

    def events(self) -> list[dict[str, str]]:
        """The job's events, oldest first (time, type, reason, message)."""
        path = self.workdir / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def running_pods(self) -> list[str]:
        return [r["metadata"]["name"] for r in self.pod_records() if r["status"]["phase"] == "Running"]


def tail(path: Path, size: int = TAIL_BYTES) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode("utf-8", errors="replace")


def _expand(part: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container command, from the container env."""
    for name, value in env.items():
        part = part.replace(f"$({name})", value)
    return part
