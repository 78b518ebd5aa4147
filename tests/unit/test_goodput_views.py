"""Goodput where people and dashboards read it: `ftjob describe`, `kubectl get -o wide`, /metrics."""

from __future__ import annotations

from finetune_operator.api import FineTuneJobStatus
from finetune_operator.jobview import JobView, describe, wide_row
from finetune_operator.metrics import Metrics

from tests.support.factories import manifest

GOODPUT = {
    "productiveSeconds": 7200.0,
    "queuedSeconds": 300.0,
    "applicationRestartSeconds": 125.0,
    "infrastructureRestartSeconds": 3725.0,
    "checkpointStallSeconds": 90.0,
    "percent": 63.2,
}


def _body() -> dict:
    body = manifest(name="demo", namespace="team-a")
    body["metadata"]["creationTimestamp"] = "2026-01-01T12:00:00Z"
    body["status"] = {"phase": "Running", "attempt": 3, "goodput": GOODPUT}
    return body


def test_describe_shows_where_the_time_went() -> None:
    text = describe(JobView(_body()))
    assert (
        "Goodput:      63.2% training; queued 5m00s, restarts 2m05s application + 1h02m infrastructure,"
        " checkpoint stalls 1m30s of 2h00m training"
    ) in text


def test_describe_shows_the_restart_budgets_a_manifest_left_to_their_defaults() -> None:
    body = _body()
    body["spec"].pop("runPolicy", None)  # a local run's job.json keeps the manifest as written
    assert "restarts 0 (max 3), infrastructure restarts 0 (max 20)" in describe(JobView(body))


def test_the_wide_listing_has_a_goodput_column() -> None:
    assert wide_row(_body())["GOODPUT"] == "63.2"


def test_the_metrics_count_time_by_kind_and_publish_each_jobs_goodput() -> None:
    metrics = Metrics()
    old = FineTuneJobStatus.model_validate({"goodput": {**GOODPUT, "productiveSeconds": 7000.0}})
    metrics.count_time(("team-a", "demo"), old, FineTuneJobStatus.model_validate({"goodput": GOODPUT}))
    assert metrics.registry.get_sample_value("ftjob_job_time_seconds_total", {"kind": "productive"}) == 200
    sample = metrics.registry.get_sample_value(
        "ftjob_goodput_percent", {"namespace": "team-a", "name": "demo"}
    )
    assert sample == 63.2
    metrics.forget(("team-a", "demo"))
    assert (
        metrics.registry.get_sample_value("ftjob_goodput_percent", {"namespace": "team-a", "name": "demo"})
        is None
    )


def test_describe_shows_what_became_of_each_sources_records() -> None:
    body = _body()
    body["status"]["progress"] = {"step": 3, "data": [{
        "name": "glaive", "read": 200, "kept": 180, "duplicates": 2, "empty": 0, "dropped": 18,
        "reasons": {"the chat template does not render tool calls": 18},
    }]}  # fmt: skip
    assert (
        "Data:         glaive: 180 of 200 kept, 2 duplicates, 0 empty, 18 dropped"
        " (18 the chat template does not render tool calls)"
    ) in describe(JobView(body))
