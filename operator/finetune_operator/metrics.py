"""Prometheus metrics of the operator, each instance in its own registry (tests run several
operators in one process)."""

from __future__ import annotations

import contextlib
from collections import Counter as Tally
from collections.abc import Hashable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from finetune_operator.api import FineTuneJobStatus, Phase
from finetune_operator.api.status import Goodput

TIME_KINDS = {
    "productive": "productive_seconds",
    "queued": "queued_seconds",
    "application_restart": "application_restart_seconds",
    "infrastructure_restart": "infrastructure_restart_seconds",
    "checkpoint_stall": "checkpoint_stall_seconds",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge(
            "ftjob_jobs",
            "FineTuneJobs by phase, as of their last reconcile",
            ["phase"],
            registry=self.registry,
        )
        self.restarts = Counter(
            "ftjob_gang_restarts",
            "Gang restarts begun, by class: application (counted toward maxRestarts) or infrastructure",
            ["class"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "ftjob_reconcile_duration_seconds",
            "Duration of one reconcile pass (observe, decide, write status, act)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.api_errors = Counter(
            "ftjob_api_errors",
            "Kubernetes API calls that failed, by operation and HTTP status (or 'timeout'/'connection')",
            ["operation", "code"],
            registry=self.registry,
        )
        self.job_time = Counter(
            "ftjob_job_time_seconds",
            "Wall-clock time of FineTuneJobs by what it went to: productive (every rank running), "
            "queued, application_restart, infrastructure_restart, checkpoint_stall (part of productive)",
            ["kind"],
            registry=self.registry,
        )
        self.goodput = Gauge(
            "ftjob_goodput_percent",
            "Per job: productive time less checkpoint stalls over all accounted time (status.goodput)",
            ["namespace", "name"],
            registry=self.registry,
        )
        self._phases: dict[Hashable, str] = {}
        for phase in Phase:
            self.jobs.labels(phase.value).set(0)

    def set_phase(self, key: Hashable, phase: Phase | None) -> None:
        self._phases[key] = (phase or Phase.PENDING).value
        self._publish()

    def forget(self, key: Hashable) -> None:
        if self._phases.pop(key, None) is not None:
            self._publish()
        if isinstance(key, tuple) and len(key) == 2:
            with contextlib.suppress(KeyError):
                self.goodput.remove(*key)

    def count_time(self, key: tuple[str, str], old: FineTuneJobStatus | None, new: FineTuneJobStatus) -> None:
        """Add what the written goodput accrued since the previous write; publish the job's percent."""
        before, after = (old.goodput if old else None) or Goodput(), new.goodput
        if after is None:
            return
        for kind, field in TIME_KINDS.items():
            grown = getattr(after, field) - getattr(before, field)
            if grown > 0:
                self.job_time.labels(kind).inc(grown)
        if after.percent is not None:
            self.goodput.labels(*key).set(after.percent)

    def _publish(self) -> None:
        tally = Tally(self._phases.values())
        for phase in Phase:
            self.jobs.labels(phase.value).set(tally.get(phase.value, 0))

    def count_restarts(self, old: FineTuneJobStatus | None, new: FineTuneJobStatus) -> None:
        before = old or FineTuneJobStatus()
        if new.restarts > before.restarts:
            self.restarts.labels("application").inc(new.restarts - before.restarts)
        if new.infra_restarts > before.infra_restarts:
            self.restarts.labels("infrastructure").inc(new.infra_restarts - before.infra_restarts)

    def serve(self, port: int, addr: str = "0.0.0.0") -> object:
        """Start the /metrics endpoint in a thread; returns the server (has .shutdown())."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
