"""Long single-rank phases are awaited through the rendezvous store, not in a collective: the
outcome (or the worker's exception) reaches every rank, and a wait has a deadline of its own."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from finetune_operator import contract
from finetune_trainer.coordination import Coordinator, PhaseTimeout
from finetune_trainer.process_group import Ranks
from finetune_trainer.records import DataNotFound
from torch.distributed import HashStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        time.sleep(0.0005)  # let the other "ranks" (threads) run


def _ranks(rank: int, *, local_world: int = 2, world: int = 4) -> Ranks:
    return Ranks(rank=rank, local_rank=rank % local_world, world_size=world,
                 local_world_size=local_world, node_rank=rank // local_world)  # fmt: skip


def _gang(store: HashStore, world: int = 4) -> list[Coordinator]:
    return [Coordinator(store, _ranks(r, world=world), deadline=60, poll=0.001) for r in range(world)]


def _all(gang: list[Coordinator], call: object) -> list[object]:
    """Every rank's result of `call(coordinator)`, each rank in a thread of its own (as processes)."""
    results: list[object] = [None] * len(gang)

    def one(i: int) -> None:
        try:
            results[i] = call(gang[i])  # type: ignore[operator]
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(gang))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_every_rank_gets_rank_0s_result() -> None:
    gang = _gang(HashStore())
    assert _all(gang, lambda c: c.on_main("tokenization", lambda: "key-123")) == ["key-123"] * 4


def test_the_work_runs_only_on_rank_0() -> None:
    ran: list[int] = []
    gang = _gang(HashStore())
    _all(gang, lambda c: c.on_main("tokenization", lambda: ran.append(c.ranks.rank)))
    assert ran == [0]


def test_per_node_work_runs_once_per_node_and_every_rank_sees_every_node() -> None:
    gang = _gang(HashStore())
    results = _all(gang, lambda c: c.per_node("download", lambda: f"node {c.ranks.node_rank}"))
    assert results == [["node 0", "node 1"]] * 4


def test_a_workers_exception_reaches_every_rank_with_its_exit_class() -> None:
    def missing() -> None:
        raise DataNotFound("dataset s3://b/train.jsonl: not found")

    results = _all(_gang(HashStore()), lambda c: c.on_main("tokenization", missing))
    assert all(isinstance(r, DataNotFound) for r in results)
    assert all(r.exit_code == contract.ExitCode.INPUT_NOT_FOUND for r in results)  # type: ignore[union-attr]


def test_a_failed_node_ends_the_wait_without_waiting_for_the_others() -> None:
    store = HashStore()
    clock = FakeClock()
    waiter = Coordinator(store, _ranks(1), deadline=60, poll=1.0, clock=clock, sleep=clock.sleep)
    failing = Coordinator(store, _ranks(2), deadline=60, poll=1.0)

    def broken() -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        failing.per_node("download", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        waiter.per_node("download", lambda: None)  # node 0's result never comes; node 1 failed
    assert clock.now < 60


def test_a_phase_run_again_never_reads_the_earlier_outcome() -> None:
    gang = _gang(HashStore(), world=2)
    first = _all(gang, lambda c: c.on_main("upload", lambda: 1))
    second = _all(gang, lambda c: c.on_main("upload", lambda: 2))
    assert (first, second) == ([1, 1], [2, 2])


def test_a_wait_past_the_deadline_is_transient_and_names_the_phase(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    waiter = Coordinator(HashStore(), _ranks(1), deadline=100, log_every=30, poll=1.0,
                         clock=clock, sleep=clock.sleep)  # fmt: skip
    with caplog.at_level(logging.INFO), pytest.raises(PhaseTimeout) as raised:
        waiter.on_main("tokenization", lambda: None)
    assert raised.value.exit_code == contract.ExitCode.TRANSIENT
    assert "tokenization" in str(raised.value) and "phaseTimeoutSeconds" in str(raised.value)
    progress = [r.getMessage() for r in caplog.records if "waiting for tokenization" in r.getMessage()]
    assert len(progress) == 3  # at 30, 60 and 90 seconds


def test_a_long_phase_is_waited_for_past_any_collective_timeout() -> None:
    clock = FakeClock()
    store = HashStore()
    waiter = Coordinator(store, _ranks(1), deadline=3600, poll=5.0, clock=clock, sleep=clock.sleep)
    worker = Coordinator(store, _ranks(0), deadline=3600)

    def slow_worker() -> None:
        while clock.now < 1200:  # twenty minutes of the waiter's time: twice torch's default timeout
            threading.Event().wait(0.001)
        worker.on_main("the download", lambda: "done")

    thread = threading.Thread(target=slow_worker)
    thread.start()
    assert waiter.on_main("the download", lambda: None) == "done"
    thread.join(10)
    assert clock.now >= 1200


def test_the_collective_timeout_bounds_every_group_deepspeed_creates() -> None:
    """DeepSpeed's ZeRO groups come from torch's new_group, which takes the module's default timeout
    (torch/distributed/distributed_c10d.py, _get_default_timeout), not init_process_group's."""
    from datetime import timedelta

    from finetune_trainer.process_group import bound_every_group
    from torch.distributed import Backend, distributed_c10d

    saved = (distributed_c10d.default_pg_timeout, distributed_c10d.default_pg_nccl_timeout)
    try:
        bound_every_group(timedelta(seconds=7))
        assert distributed_c10d._get_default_timeout(Backend.GLOO) == timedelta(seconds=7)
        assert distributed_c10d._get_default_timeout(Backend.NCCL) == timedelta(seconds=7)
    finally:
        distributed_c10d.default_pg_timeout, distributed_c10d.default_pg_nccl_timeout = saved
