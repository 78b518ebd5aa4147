"""In-place restarts without a cluster: which exits restart in place, how the launcher's records
become one cause per restart, how a restarted process keeps its pod's node rank, and how the
operator counts what rank 0 reports (each restart once, toward maxRestarts, in goodput)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from finetune_operator import contract
from finetune_operator.api.status import FineTuneJobStatus, Goodput, InPlaceRestart, Phase, Progress
from finetune_operator.policy import in_place
from finetune_operator.policy.failures import EXIT_VERDICTS, Outcome
from finetune_trainer.gang_agent import backoff_schedule, exit_code_of
from finetune_trainer.launch import rendezvous_args
from finetune_trainer.process_group import keep_pod_node_rank
from finetune_trainer.restart_records import FailureRecord, append, read, root_causes
from finetune_trainer.resuming import RESTART_COPY, keep_for_restart

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("code", "in_place"),
    [(1, True), (75, True), (139, True), (134, True), (2, False), (3, False), (4, False), (77, False),
     (137, False), (143, False)],
)  # fmt: skip
def test_only_failures_a_fresh_process_may_get_past_restart_in_place(code: int, in_place: bool) -> None:
    assert contract.restartable_in_place(code) is in_place


def test_every_exit_restarted_in_place_is_one_the_operator_would_restart() -> None:
    for code in (1, contract.ExitCode.TRANSIENT):
        assert EXIT_VERDICTS.get(code, (Outcome.RESTART, ""))[0] is Outcome.RESTART


def test_a_signal_death_is_reported_as_a_shell_would() -> None:
    assert exit_code_of(-9) == 137 and exit_code_of(75) == 75


def _record(number: int, node: int, code: int, reason: str, seconds: float) -> FailureRecord:
    return FailureRecord(number, (T0 + timedelta(seconds=seconds)).isoformat(), code, reason, node)


def test_the_cause_of_a_restart_is_not_the_survivors_broken_collective(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(contract.ENV_ATTEMPT, "2")
    records = [
        _record(1, 0, 75, "collective failed at step 9: RuntimeError: Connection reset by peer", 0.0),
        _record(1, 1, 75, "storage unreachable: s3://bucket/x", 0.2),
    ]
    [restart] = root_causes(records)
    assert (restart.attempt, restart.number, restart.exit_code) == (2, 1, 75)
    assert restart.reason == "node 1: storage unreachable: s3://bucket/x"
    assert restart.at == T0, "the restart began at the first failure seen"


def test_an_exception_outranks_a_transient_failure_of_the_same_restart() -> None:
    records = [
        _record(1, 0, 75, "storage unreachable", 0.0),
        _record(1, 1, 1, "ValueError at step 3: x", 1.0),
    ]
    assert root_causes(records)[0].exit_code == 1


def test_each_restart_gets_its_own_cause() -> None:
    records = [_record(2, 0, 1, "second", 5.0), _record(1, 0, 75, "first", 0.0)]
    assert [r.number for r in root_causes(records)] == [1, 2]


def test_a_torn_record_line_is_skipped(tmp_path: Path) -> None:
    append(tmp_path, _record(1, 0, 75, "first", 0.0))
    with (tmp_path / "restarts.jsonl").open("a") as out:
        out.write('{"number": 2, "at": "2026-')
    assert [r.number for r in read(tmp_path)] == [1]


def test_a_restarted_process_keeps_its_pods_node_rank() -> None:
    """torchrun's c10d rendezvous numbered pod 1's node 0 (it sorts host names)."""
    env = {"NODE_RANK": "1", "GROUP_RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "RANK": "1"}
    keep_pod_node_rank(env)
    assert (env["RANK"], env["GROUP_RANK"]) == ("5", "1")


def test_a_process_without_a_pod_node_rank_is_left_as_torchrun_numbered_it() -> None:
    env = {"GROUP_RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "RANK": "1"}
    keep_pod_node_rank(env)
    assert env["RANK"] == "1"


def test_node_rank_0_hosts_the_c10d_rendezvous() -> None:
    args = ["--rdzv-backend=c10d", "-m", "finetune_trainer"]
    assert rendezvous_args(args, 0)[0] == "--rdzv-conf=is_host=true"
    assert rendezvous_args(args, 3)[0] == "--rdzv-conf=is_host=false"
    assert rendezvous_args(["--master-addr=x"], 0) == ["--master-addr=x"], "a static rendezvous is left alone"


def test_the_backoff_schedule_reads_the_operators_list() -> None:
    assert backoff_schedule("7,14,29") == [7.0, 14.0, 29.0] and backoff_schedule(None) == []


def test_a_nodes_uploaded_checkpoint_is_kept_with_the_one_before_it(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        written = tmp_path / f"step-{step:08d}"
        written.mkdir()
        (written / "shard.pt").write_text(str(step))
        keep_for_restart(tmp_path, written)
    assert sorted(p.name for p in (tmp_path / RESTART_COPY).iterdir()) == ["step-00000004", "step-00000006"]


def _status(*restarts: InPlaceRestart, counted: int = 0, attempt: int = 1) -> FineTuneJobStatus:
    goodput = Goodput(productive_seconds=100.0, step_reached=40, accounted_until=T0 + timedelta(seconds=60))
    return FineTuneJobStatus(
        phase=Phase.RUNNING,
        attempt=attempt,
        attempt_in_place_restarts=counted,
        progress=Progress(step=30, in_place_restarts=list(restarts) or None),
        goodput=goodput,
    )


def _restart(number: int, attempt: int = 1, seconds: float = 20.0) -> InPlaceRestart:
    return InPlaceRestart(attempt=attempt, number=number, at=T0 + timedelta(seconds=seconds), exit_code=75,
                          reason="node 1: storage unreachable")  # fmt: skip


def test_a_reported_restart_is_counted_toward_max_restarts_once() -> None:
    status, events = _status(_restart(1)), []
    in_place.count(status, T0 + timedelta(seconds=60), events)
    in_place.count(status, T0 + timedelta(seconds=70), events)
    assert (status.restarts, status.in_place_restarts, status.attempt_in_place_restarts) == (1, 1, 1)
    assert [e.reason for e in events] == ["RankFailed", "RestartedInPlace"]


def test_restarts_reported_together_are_each_counted() -> None:
    status = _status(_restart(1), _restart(2, seconds=30))
    in_place.count(status, T0 + timedelta(seconds=60), [])
    assert (status.restarts, status.attempt_in_place_restarts) == (2, 2)


def test_a_previous_attempts_report_is_not_counted_again() -> None:
    status = _status(_restart(1, attempt=1), attempt=2)
    in_place.count(status, T0 + timedelta(seconds=60), [])
    assert status.restarts == 0


def test_the_time_since_the_failure_moves_from_productive_to_restart_time() -> None:
    status = _status(_restart(1, seconds=20))
    in_place.count(status, T0 + timedelta(seconds=60), [])
    assert status.goodput is not None
    assert status.goodput.productive_seconds == pytest.approx(60.0)
    assert status.goodput.application_restart_seconds == pytest.approx(40.0)
    assert status.goodput.redo_until_step == 40, "the steps up to the highest reached are redone"


def test_the_allowance_is_what_is_left_of_max_restarts() -> None:
    from tests.support.factories import job

    assert in_place.allowance(job({"spec.runPolicy.maxRestarts": 2})) == 2
    assert in_place.allowance(job({"spec.runPolicy.maxRestarts": 9})) == 3
    assert in_place.allowance(job({"spec.runPolicy.inPlaceRestarts": 0})) == 0
