"""One reconcile pass against a recording backend: status first, then events, then actions; no
write when nothing changed; nothing done when the status write finds the job changed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from finetune_operator.api import FineTuneJob, FineTuneJobStatus
from finetune_operator.backends.base import CreateRefused
from finetune_operator.backends.kubernetes import merge_patch
from finetune_operator.policy.actions import Action, CreateAttempt, CreateService, Event
from finetune_operator.policy.decide import Observed
from finetune_operator.reconciler import Reconciler
from finetune_operator.settings import OperatorSettings

from tests.support.clock import JumpingClock
from tests.support.factories import job

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class RecordingBackend:
    def __init__(
        self, observed: Observed | None, *, conflict: bool = False, refuse: CreateRefused | None = None
    ) -> None:
        self.observed, self.conflict, self.refuse = observed, conflict, refuse
        self.log: list[Any] = []
        self.statuses: list[FineTuneJobStatus] = []

    async def observe(self, key: tuple[str, str], now: datetime) -> Observed | None:
        return self.observed

    async def write_status(self, job: FineTuneJob, status: FineTuneJobStatus) -> bool:
        self.log.append(("status", status.phase))
        self.statuses.append(status)
        return not self.conflict

    async def apply(self, job: FineTuneJob, action: Action) -> None:
        self.log.append(action)
        if self.refuse is not None and isinstance(action, CreateAttempt):
            raise self.refuse

    async def emit(self, job: FineTuneJob, event: Event) -> None:
        self.log.append(("event", event.reason))


def _reconciler(backend: RecordingBackend) -> Reconciler:
    return Reconciler(backend, JumpingClock(), OperatorSettings(metrics_port=None))


@pytest.mark.asyncio
async def test_a_new_job_gets_its_status_then_its_event_then_its_children() -> None:
    backend = RecordingBackend(Observed(job(), pods=(), service_exists=False, now=NOW))
    await _reconciler(backend).reconcile(("team-a", "demo"))
    assert backend.log == [
        ("status", "Starting"),
        ("event", "Created"),
        CreateService(),
        CreateAttempt(1, (0,)),
    ]


@pytest.mark.asyncio
async def test_a_status_write_refused_as_a_conflict_stops_the_pass_and_asks_for_another() -> None:
    backend = RecordingBackend(Observed(job(), pods=(), service_exists=False, now=NOW), conflict=True)
    again = await _reconciler(backend).reconcile(("team-a", "demo"))
    assert backend.log == [("status", "Starting")] and again == 0.0


@pytest.mark.asyncio
async def test_a_refused_create_is_recorded_in_status_for_the_decide_step_and_the_pass_ends() -> None:
    quota = CreateRefused(403, "Forbidden", 'pods "demo-a1-n0" is forbidden: exceeded quota: gpus')
    backend = RecordingBackend(Observed(job(), pods=(), service_exists=True, now=NOW), refuse=quota)
    again = await _reconciler(backend).reconcile(("team-a", "demo"))
    assert again == 0.0  # decide on the refusal now
    assert backend.log[-1] == ("status", None)  # the refusal, written on the job as observed again
    refusal = backend.statuses[-1].create_refusal
    assert refusal is not None and (refusal.code, refusal.reason) == (403, "Forbidden")
    assert refusal.message.endswith("exceeded quota: gpus")


@pytest.mark.asyncio
async def test_goodput_accrued_alone_is_no_reason_to_write_the_status() -> None:
    """Accounted to `now` on every pass; the next real write carries the whole interval."""
    first = RecordingBackend(Observed(job(), pods=(), service_exists=False, now=NOW))
    await _reconciler(first).reconcile(("team-a", "demo"))
    written = first.statuses[-1].model_dump(mode="json", by_alias=True, exclude_none=True)
    later = NOW.replace(minute=5)
    stored = job().model_copy(update={"status": FineTuneJobStatus.model_validate(written)})
    again = RecordingBackend(Observed(stored, pods=(), service_exists=True, now=later))
    await _reconciler(again).reconcile(("team-a", "demo"))
    assert not any(entry[0] == "status" for entry in again.log if isinstance(entry, tuple))


@pytest.mark.asyncio
async def test_a_job_that_is_gone_is_left_alone() -> None:
    backend = RecordingBackend(None)
    assert await _reconciler(backend).reconcile(("team-a", "demo")) is None
    assert backend.log == []


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"p": {"x": 1, "y": 2}}, {"p": {"x": 1}}, {"p": {"y": None}}),
        ({"c": [1, 2]}, {"c": [2]}, {"c": [2]}),
        ({}, {"phase": "Running"}, {"phase": "Running"}),
    ],
)
def test_status_is_written_as_the_merge_patch_from_old_to_new(old: dict, new: dict, patch: dict) -> None:
    assert merge_patch(old, new) == patch


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FTJOB_WORKERS": "many"}, "FTJOB_WORKERS='many' is not a number"),
        ({"FTJOB_WORKERS": "0"}, "FTJOB_WORKERS='0' must be at least 1"),
        ({"FTJOB_RESYNC_SECONDS": "1"}, "FTJOB_RESYNC_SECONDS='1' must be at least 10"),
        ({"FTJOB_NETWORK_POLICY": "yes"}, "FTJOB_NETWORK_POLICY='yes' must be true or false"),
        ({"FTJOB_PEERING_PRIORITY": "high"}, "FTJOB_PEERING_PRIORITY='high' is not a number"),
    ],
)
def test_bad_operator_settings_are_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OperatorSettings.from_env(env)


def test_operator_settings_come_from_the_environment_the_chart_sets() -> None:
    settings = OperatorSettings.from_env(
        {"FTJOB_DEFAULT_IMAGE": "registry.example/trainer:1", "FTJOB_WORKERS": "3", "FTJOB_METRICS_PORT": "0"}
    )
    assert (settings.default_image, settings.workers, settings.metrics_port) == (
        "registry.example/trainer:1",
        3,
        None,
    )


def test_network_policies_are_made_only_when_the_installation_enables_them() -> None:
    assert OperatorSettings.from_env({}).network_policy is False
    assert OperatorSettings.from_env({"FTJOB_NETWORK_POLICY": "true"}).network_policy is True


def test_each_replica_draws_its_own_peering_priority_unless_one_is_given() -> None:
    """kopf pauses every replica when two live ones share a priority; drawn ones practically never do."""
    drawn = {OperatorSettings.from_env({}).peering_priority for _ in range(50)}
    assert len(drawn) == 50 and min(drawn) >= 1
    assert OperatorSettings.from_env({"FTJOB_PEERING_PRIORITY": "7"}).peering_priority == 7


def _sample(metrics: Any, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


@pytest.mark.asyncio
async def test_metrics_count_jobs_by_phase_and_restarts_by_class() -> None:
    backend = RecordingBackend(Observed(job(), pods=(), service_exists=False, now=NOW))
    reconciler = _reconciler(backend)
    await reconciler.reconcile(("team-a", "demo"))
    metrics = reconciler.metrics
    assert _sample(metrics, "ftjob_jobs", phase="Starting") == 1
    metrics.count_restarts(FineTuneJobStatus(restarts=1), FineTuneJobStatus(restarts=2, infra_restarts=1))
    assert _sample(metrics, "ftjob_gang_restarts_total", **{"class": "application"}) == 1
    assert _sample(metrics, "ftjob_gang_restarts_total", **{"class": "infrastructure"}) == 1
    assert _sample(metrics, "ftjob_reconcile_duration_seconds_count") == 1
    metrics.forget(("team-a", "demo"))
    assert _sample(metrics, "ftjob_jobs", phase="Starting") == 0


def test_a_refusal_carries_the_apis_code_reason_and_message_and_never_the_request_body() -> None:
    from finetune_operator.backends.kube_api import refusal
    from kubernetes.client.exceptions import ApiException

    exc = ApiException(status=403, reason="Forbidden")
    exc.body = (
        '{"kind":"Status","code":403,"reason":"Forbidden","message":"pods \\"demo-a1-n0\\" is forbidden: '
        "exceeded quota: gpus, requested: nvidia.com/gpu=8, used: nvidia.com/gpu=8, "
        'limited: nvidia.com/gpu=8"}'
    )
    refused = refusal(exc)
    assert (refused.code, refused.reason) == (403, "Forbidden")
    assert refused.message.startswith('pods "demo-a1-n0" is forbidden: exceeded quota: gpus')
    garbled = ApiException(status=422, reason="Unprocessable Entity")
    garbled.body = "<html>proxy error</html>"
    assert (refusal(garbled).code, refusal(garbled).reason, refusal(garbled).message) == (
        422,
        "Unprocessable Entity",
        "",
    )


def test_the_kubernetes_backend_carries_out_every_kind_of_action() -> None:
    from typing import get_args

    from finetune_operator.backends.kube_api import KubeApi
    from finetune_operator.backends.kubernetes import KubernetesBackend
    from finetune_operator.metrics import Metrics
    from finetune_operator.policy import actions as act
    from finetune_operator.progress_poll import ProgressLog
    from finetune_operator.watch_filter import WatchFilter
    from kubernetes import client

    api = KubeApi(client.ApiClient(), OperatorSettings(metrics_port=None), Metrics())
    watch = WatchFilter()
    backend = KubernetesBackend(api, ProgressLog(api, watch), watch)
    assert set(backend._actions) == set(get_args(act.Action))
    backend.close()


def test_a_pass_without_a_poller_comes_back_for_a_running_jobs_progress() -> None:
    from finetune_operator.reconciler import PassReadsProgress

    follower = PassReadsProgress(30.0)
    assert follower.follow(("team-a", "demo"), FineTuneJobStatus(phase="Running")) == 30.0
    assert follower.follow(("team-a", "demo"), FineTuneJobStatus(phase="Starting")) is None
    assert follower.follow(("team-a", "demo"), None) is None
