"""Waiting for work whose length grows with the model, the data or the checkpoint, without a collective.

A collective (all_reduce, barrier, broadcast) fails after the process group's timeout, which must stay
short so a hung training step ends the run fast. A 70B download, tokenizing a few GB on one rank or
uploading a checkpoint takes longer than that, so the ranks that wait for such a phase do not wait in
a collective: the ranks that do the work publish their outcome as a key of the rendezvous store (the
TCPStore torchrun already runs for the gang), and every rank polls for the keys it needs with a
deadline of its own (`runPolicy.phaseTimeoutSeconds`), logging how long it has waited.

The outcome travels with the key: a value, or the exception the worker raised, so every rank fails
with the same exit class at once instead of waiting for results that never come. Keys are numbered
in call order, which is the same on every rank, so a phase run twice (each checkpoint) never reads an
earlier outcome.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from finetune_trainer.failures import Transient
from finetune_trainer.process_group import Ranks

log = logging.getLogger(__name__)

T = TypeVar("T")
KEY_PREFIX = "ftjob-phase"


class PhaseTimeout(Transient):
    """A rank waited past runPolicy.phaseTimeoutSeconds for another rank's phase (exit 75)."""


def _encode(outcome: tuple[str, Any]) -> bytes:
    try:
        return pickle.dumps(outcome)
    except Exception:  # an exception that does not pickle still ends every rank, with its text
        kind, value = outcome
        return pickle.dumps((kind, RuntimeError(f"{type(value).__name__}: {value}")))


class Coordinator:
    """Phases run by some ranks and awaited by all, through a key-value store (torch's c10d Store)."""

    def __init__(
        self,
        store: Any,
        ranks: Ranks,
        *,
        deadline: float,
        log_every: float = 30.0,
        poll: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.ranks = ranks
        self.deadline = deadline
        self.log_every = log_every
        self.poll = poll
        self._clock = clock
        self._sleep = sleep
        self._calls = 0

    @property
    def nnodes(self) -> int:
        return max(1, self.ranks.world_size // self.ranks.local_world_size)

    def on_main(self, name: str, work: Callable[[], T]) -> T:
        """`work` on rank 0; its result (or its exception) on every rank."""
        return self.run(name, work if self.ranks.is_main else None, "rank-0", ["rank-0"])[0]

    def per_node(self, name: str, work: Callable[[], T]) -> list[T]:
        """`work` on each node's local rank 0; every node's result, in node order, on every rank."""
        mine = f"node-{self.ranks.node_rank}" if self.ranks.is_node_main else None
        nodes = [f"node-{n}" for n in range(self.nnodes)]
        return self.run(name, work if self.ranks.is_node_main else None, mine, nodes)

    def every_rank(self, name: str, work: Callable[[], T]) -> list[T]:
        """`work` on every rank; every rank's result, in rank order, on every rank."""
        everyone = [f"rank-{r}" for r in range(self.ranks.world_size)]
        return self.run(name, work, f"rank-{self.ranks.rank}", everyone)

    def run(
        self, name: str, work: Callable[[], T] | None, publish_as: str | None, wait_for: Sequence[str]
    ) -> list[T]:
        self._calls += 1
        base = f"{KEY_PREFIX}/{self._calls:06d}-{name}"
        outcomes: dict[str, tuple[str, Any]] = {}
        if work is not None:
            assert publish_as is not None
            try:
                outcome: tuple[str, Any] = ("ok", work())
            except Exception as exc:
                outcome = ("error", exc)
            outcomes[publish_as] = outcome
            self.store.set(f"{base}/{publish_as}", _encode(outcome))
            if outcome[0] == "error":
                raise outcome[1]  # published first, so nobody waits for this rank in vain
        outcomes.update(self._wait(name, base, [w for w in wait_for if w not in outcomes]))
        failed = [who for who, (kind, _) in outcomes.items() if kind == "error"]
        if failed:
            raise outcomes[failed[0]][1] from None
        return [outcomes[who][1] for who in wait_for]

    def _wait(self, name: str, base: str, pending: list[str]) -> dict[str, tuple[str, Any]]:
        started = self._clock()
        next_log = started + self.log_every
        done: dict[str, tuple[str, Any]] = {}
        while pending:
            ready = [who for who in pending if self.store.check([f"{base}/{who}"])]
            for who in ready:
                done[who] = pickle.loads(self.store.get(f"{base}/{who}"))
                pending.remove(who)
                if done[who][0] == "error":
                    return done  # no point waiting for the others: this phase failed
            if not pending:
                break
            now = self._clock()
            if now - started >= self.deadline:
                raise PhaseTimeout(
                    f"waited {now - started:.0f}s for {name} on {', '.join(pending)} "
                    f"(runPolicy.phaseTimeoutSeconds is {self.deadline:.0f})"
                )
            if now >= next_log:
                log.info(
                    "waiting for %s on %s: %.0fs so far (deadline %.0fs)",
                    name, ", ".join(pending), now - started, self.deadline,
                )  # fmt: skip
                next_log = now + self.log_every
            self._sleep(self.poll)
        return done
