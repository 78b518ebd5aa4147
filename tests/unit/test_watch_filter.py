"""The watch filter: a pod listed again unchanged and the echo of the operator's own status write
run no pass; anyone else's change does, even one arriving while our write is in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from finetune_operator.watch_filter import WatchFilter

KEY = ("team-a", "demo")


def test_a_pod_listed_again_unchanged_after_a_watch_reconnect_is_no_reason_for_a_pass() -> None:
    seen = WatchFilter()
    key = ("team-a", "demo-a1-n0")
    assert seen.pod_changed(key, "ADDED", "10") is True
    assert seen.pod_changed(key, None, "10") is False  # the relisting after a reconnect
    assert seen.pod_changed(key, "MODIFIED", "11") is True
    assert seen.pod_changed(key, "DELETED", "11") is True
    assert seen.pod_changed(key, None, "11") is True  # seen again after its deletion: news


class _Watch(WatchFilter):
    changed: list[tuple[str, str]]


def _filter_whose_writes_see(events: list[str], version: str) -> tuple[_Watch, Callable[[], Awaitable[str]]]:
    """A watch filter, and a status write that returns `version` and meanwhile sees watch `events`."""
    watch = _Watch()
    changed: list[tuple[str, str]] = []
    watch.on_change = changed.append
    watch.changed = changed

    async def write() -> str:
        for event in events:
            assert watch.job_changed(KEY, event) is False  # held while writing
        return version

    return watch, write


@pytest.mark.asyncio
async def test_the_echo_of_our_own_status_write_runs_no_pass_even_when_it_arrives_first() -> None:
    watch, write = _filter_whose_writes_see(["v2"], "v2")
    await watch.own_write(KEY, write())
    assert watch.changed == []
    assert watch.job_changed(KEY, "v2") is False  # arriving after the response
    assert watch.job_changed(KEY, "v3") is True  # someone else's change


@pytest.mark.asyncio
async def test_another_change_arriving_while_we_write_still_runs_a_pass() -> None:
    watch, write = _filter_whose_writes_see(["v2", "v3"], "v3")
    await watch.own_write(KEY, write())
    assert watch.changed == [KEY]


def test_a_deleted_job_forgets_its_own_writes() -> None:
    watch = WatchFilter()

    async def write() -> str:
        return "v2"

    asyncio.run(watch.own_write(KEY, write()))
    assert watch.job_changed(KEY, "v2") is False
    watch.forget(KEY)
    assert watch.job_changed(KEY, "v2") is True
