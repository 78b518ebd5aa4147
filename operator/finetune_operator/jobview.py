"""What a person reads about a job, the same for a local workdir and a cluster: the `kubectl get ftj
-o wide` row (from the CRD's own printer columns), `describe` text, and the loss curve."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from finetune_operator.api.crd import PRINTER_COLUMNS
from finetune_operator.policy.observed import parse_time
from finetune_operator.progress import ProgressReport


@dataclass
class JobView:
    """A job as stored (manifest with status), its rank pods and its recent events."""

    body: dict[str, Any]
    pods: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, str]] = field(default_factory=list)  # time, type, reason, message


def _json_path(body: Any, path: str) -> Any:
    """The subset of kubectl's JSONPath the printer columns use: dotted fields and one
    [?(@.field=="value")] filter."""
    for part in re.findall(r"\[\?\(@\.\w+==\"[^\"]*\"\)\]|[^.\[]+", path):
        if body is None:
            return None
        if part.startswith("[?"):
            key, value = re.findall(r"@\.(\w+)==\"([^\"]*)\"", part)[0]
            body = next((item for item in body or [] if item.get(key) == value), None)
        else:
            body = body.get(part) if isinstance(body, dict) else None
    return body


def age(created: str | None, now: datetime | None = None) -> str:
    if not created:
        return ""
    moment = parse_time(created)
    assert moment is not None
    seconds = max(0, int(((now or datetime.now(UTC)) - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def wide_row(body: dict[str, Any], now: datetime | None = None) -> dict[str, str]:
    """NAME plus every printer column, formatted as kubectl prints them."""
    row = {"NAME": body["metadata"]["name"]}
    for column in PRINTER_COLUMNS:
        value = _json_path(body, column["jsonPath"])
        if column["type"] == "date":
            text = age(value, now)
        elif value is None:
            text = "<none>" if column["name"] in ("Reason",) else ""
        elif column["type"] == "number":
            text = f"{value:.4g}"
        else:
            text = str(value)
        row[column["name"].upper()] = text
    return row


def list_row(body: dict[str, Any], wide: bool = False, now: datetime | None = None) -> dict[str, str]:
    """The row `kubectl get ftj` prints: the printer columns without a priority, all with -o wide."""
    row = wide_row(body, now)
    if wide:
        return row
    hidden = {c["name"].upper() for c in PRINTER_COLUMNS if c.get("priority")}
    return {k: v for k, v in row.items() if k not in hidden}


def list_local(root: Path) -> list[dict[str, Any]]:
    """The jobs of the local runs under `root` (each run's workdir is a folder of it), by name."""
    from finetune_operator.backends.local import LocalBackend

    if not root.is_dir():
        return []
    bodies = [LocalBackend(d).read_job() for d in sorted(root.iterdir()) if d.is_dir()]
    return [b for b in bodies if b is not None]


def list_cluster(namespace: str | None, kubeconfig: str | None = None) -> list[dict[str, Any]]:
    """The jobs of one namespace, or of every namespace the user may list (namespace None)."""
    from kubernetes import client, config

    from finetune_operator import contract

    api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    custom = client.CustomObjectsApi(api)
    group, version, plural = contract.API_GROUP, contract.API_VERSION, contract.PLURAL
    if namespace is None:
        listed = custom.list_cluster_custom_object(group, version, plural)
    else:
        listed = custom.list_namespaced_custom_object(group, version, namespace, plural)
    items = cast(list[dict[str, Any]], cast(dict[str, Any], listed).get("items") or [])
    return sorted(items, key=lambda b: (b["metadata"].get("namespace", ""), b["metadata"]["name"]))


def _duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s: a span a person reads at a glance."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    lines = ["   ".join(k.ljust(widths[k]) for k in rows[0])]
    lines += ["   ".join(r[k].ljust(widths[k]) for k in rows[0]) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _pod_state(pod: dict[str, Any]) -> str:
    status = pod.get("status") or {}
    terminated: dict[str, Any] = {}
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or terminated
    if "exitCode" in terminated:
        message = f": {terminated['message']}" if terminated.get("message") else ""
        return f"{status.get('phase')} (exit {terminated['exitCode']}{message})"
    deleting = " (terminating)" if (pod.get("metadata") or {}).get("deletionTimestamp") else ""
    return f"{status.get('phase', 'Pending')}{deleting}"


def _defaulted(policy: dict[str, Any]) -> dict[str, Any]:
    """The run policy with the API's defaults filled in, as the API server fills them: a local run's
    job.json keeps the manifest as written."""
    from pydantic import ValidationError

    from finetune_operator.api.spec import RunPolicy

    try:
        return {**RunPolicy.model_validate(policy).model_dump(by_alias=True, mode="json"), **policy}
    except ValidationError:
        return policy


def describe(view: JobView, now: datetime | None = None) -> str:
    body = view.body
    meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    progress, checkpoint = status.get("progress") or {}, status.get("latestCheckpoint") or {}
    resources, policy = spec.get("resources") or {}, _defaulted(spec.get("runPolicy") or {})
    lines = [
        f"Name:         {meta['name']}",
        f"Namespace:    {meta.get('namespace', 'default')}",
        f"Created:      {meta.get('creationTimestamp', '')} ({age(meta.get('creationTimestamp'), now)} ago)",
        f"Phase:        {status.get('phase', 'Pending')}",
        f"Attempt:      {status.get('attempt', 0)}   restarts {status.get('restarts', 0)}"
        f" (max {policy.get('maxRestarts', '?')}),"
        f" infrastructure restarts {status.get('infraRestarts', 0)}"
        f" (max {policy.get('maxInfrastructureRestarts', '?')})",
        f"Ranks:        {resources.get('nodes', '?')} node(s) x {resources.get('gpusPerNode', '?')} GPU(s); "
        + ", ".join(f"{k} {v}" for k, v in (status.get("ranks") or {}).items()),
    ]
    if progress:
        lines.append(
            f"Progress:     step {progress.get('step', 0)}/{progress.get('totalSteps', '?')}"
            f" ({progress.get('percent', 0):.1f}%), loss {progress.get('loss', '-')},"
            f" eval loss {progress.get('evalLoss', '-')}, {progress.get('tokensPerSecond', 0):.0f} tokens/s,"
            f" ETA {progress.get('etaSeconds', '-')} s"
        )
    metrics = progress.get("metrics") or {}
    if metrics:
        lines.append("Objective:    " + ", ".join(f"{_metric_label(k)} {v:.4f}" for k, v in metrics.items()))
    for source in progress.get("data") or []:
        reasons = ", ".join(f"{n} {reason}" for reason, n in (source.get("reasons") or {}).items())
        lines.append(
            f"Data:         {source['name']}: {source.get('kept', 0)} of {source.get('read', 0)} kept,"
            f" {source.get('duplicates', 0)} duplicates, {source.get('empty', 0)} empty,"
            f" {source.get('dropped', 0)} dropped" + (f" ({reasons})" if reasons else "")
        )
    micro = status.get("microBatch") or {}
    if micro:
        reason = micro.get("reason")
        why = "as written" if reason == "Spec" else f"{reason}: {micro.get('message', '')}"
        size, steps = micro.get("size"), micro.get("gradientAccumulationSteps")
        lines.append(f"Micro batch:  {size} x {steps} accumulation ({why})")
    goodput = status.get("goodput") or {}
    if goodput.get("percent") is not None:
        lines.append(
            f"Goodput:      {goodput['percent']:.1f}% training;"
            f" queued {_duration(goodput.get('queuedSeconds', 0))},"
            f" restarts {_duration(goodput.get('applicationRestartSeconds', 0))} application"
            f" + {_duration(goodput.get('infrastructureRestartSeconds', 0))} infrastructure,"
            f" checkpoint stalls {_duration(goodput.get('checkpointStallSeconds', 0))}"
            f" of {_duration(goodput.get('productiveSeconds', 0))} training"
        )
    lines.append(
        f"Checkpoint:   step {checkpoint['step']} at {checkpoint.get('uri', '')}"
        if checkpoint
        else "Checkpoint:   none yet"
    )
    lines.append("Conditions:")
    for c in status.get("conditions") or []:
        lines.append(f"  {c['type']:<12} {c['status']:<6} {c.get('reason', ''):<22} {c.get('message', '')}")
    lines.append("Pods:")
    for pod in view.pods:
        lines.append(f"  {pod['metadata']['name']:<24} {_pod_state(pod)}")
    lines.append("Events:")
    for e in view.events[-15:]:
        when, kind, reason = e.get("time", ""), e.get("type", ""), e.get("reason", "")
        lines.append(f"  {when:<20} {kind:<8} {reason:<18} {e.get('message', '')}")
    return "\n".join(lines)


def load_local(workdir: Path) -> JobView | None:
    from finetune_operator.backends.local import LocalBackend

    backend = LocalBackend(workdir)
    body = backend.read_job()
    return None if body is None else JobView(body, backend.pod_records(), backend.events())


def _metric_label(name: str) -> str:
    """A status metric as its users know it: rewardsAccuracy -> rewards accuracy."""
    return "".join(f" {c.lower()}" if c.isupper() else c for c in name)


def _metric_series(reports: list[ProgressReport]) -> dict[str, list[tuple[int, float]]]:
    """Each objective metric's points: a training metric at every report of a new step, a held-out
    one where its value changed (every report repeats the latest evaluation)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in reports:
        step, metrics = r.progress.step, r.progress.metrics
        for name, value in (metrics.model_dump(by_alias=True, exclude_none=True) if metrics else {}).items():
            points = series.setdefault(name, [])
            changed = not points or (
                points[-1][1] != value if name.startswith("eval") else points[-1][0] != step
            )
            if step is not None and changed:
                points.append((step, value))
    return series


def plot_loss(attempts: list[tuple[int, list[ProgressReport]]], path: Path, title: str) -> Path | None:
    """Training (and evaluation) loss over steps, one colour per attempt, so a restart shows as
    where the next attempt picks the curve up again; below it, the objective's parts (DPO's reward
    accuracy and margin, distillation's divergence and cross-entropy) when it reports them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(a, r) for a, reports in attempts for r in reports if r.progress.loss is not None]
    if not points:
        return None
    parts = [(a, _metric_series(reports)) for a, reports in attempts]
    if any(series for _, series in parts):
        fig, (ax, below) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
        for attempt, series in parts:
            for name, values in series.items():
                below.plot(
                    *zip(*values, strict=True), marker=".", label=f"attempt {attempt} {_metric_label(name)}"
                )
        below.set_xlabel("optimizer step")
        below.set_ylabel("objective parts")
        below.grid(alpha=0.3)
        below.legend(fontsize="small")
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5))
    for attempt, reports in attempts:
        train = [(r.progress.step, r.progress.loss) for r in reports if r.progress.loss is not None]
        # Every report repeats the latest eval loss; a point is where a new evaluation appeared.
        evals, previous = [], None
        for r in reports:
            if r.progress.eval_loss is not None and r.progress.eval_loss != previous:
                evals.append((r.progress.step, r.progress.eval_loss))
                previous = r.progress.eval_loss
        if train:
            ax.plot(*zip(*train, strict=True), marker=".", label=f"attempt {attempt} train")
        if evals:
            ax.plot(*zip(*evals, strict=True), "s--", label=f"attempt {attempt} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cluster_job(
    name: str, namespace: str, kubeconfig: str | None = None
) -> tuple[dict[str, Any] | None, Any]:
    """The job's body (None when there is none) and the api client it was read with, through the
    user's kubeconfig."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    from finetune_operator import contract

    api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    try:
        body = client.CustomObjectsApi(api).get_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None, api
        raise
    return cast(dict[str, Any], body), api


def load_cluster(name: str, namespace: str, kubeconfig: str | None = None) -> JobView | None:
    """The same view read from a cluster through the kubernetes client (the user's kubeconfig)."""
    from kubernetes import client

    from finetune_operator import contract

    body, api = cluster_job(name, namespace, kubeconfig)
    if body is None:
        return None
    core = client.CoreV1Api(api)
    pods = core.list_namespaced_pod(namespace, label_selector=f"{contract.LABEL_JOB}={name}")
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return JobView(
        body,
        [api.sanitize_for_serialization(p) for p in pods.items],
        [
            {
                "time": str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp or "")[:19],
                "type": e.type or "",
                "reason": e.reason or "",
                "message": e.message or "",
            }
            for e in sorted(events.items, key=lambda e: str(e.metadata.resource_version))
        ],
    )
