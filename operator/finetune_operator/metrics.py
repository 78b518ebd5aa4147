"""Prometheus metrics of the operator, each instance in its own registry (tests run several
operators in one process)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Hashable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from finetune_operator.api import FineTuneJobStatus, Phase


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
        self._phases: dict[Hashable, str] = {}
        for phase in Phase:
            self.jobs.labels(phase.value).set(0)

    def set_phase(self, key: Hashable, phase: Phase | None) -> None:
        self._phases[key] = (phase or Phase.PENDING).value
        self._publish()

    def forget(self, key: Hashable) -> None:
        if self._phases.pop(key, None) is not None:
            self._publish()

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
