"""What the decide step asks a backend to do. Plain values, so two backends can be compared by the
sequence of actions they receive for the same observations."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CreateService:
    pass


@dataclass(frozen=True)
class CreateAttempt:
    """The attempt's ConfigMap, then one pod per listed rank (creating an existing one is success)."""

    attempt: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class CreatePodGroup:
    """The attempt's PodGroup (spec.gang with Volcano or Coscheduling), before its pods."""

    attempt: int


@dataclass(frozen=True)
class DeletePodGroup:
    """A PodGroup no pods need any more: an earlier attempt's, or the last one's once the job stopped."""

    attempt: int


@dataclass(frozen=True)
class DeletePods:
    names: tuple[str, ...]
    force: bool = False  # grace period 0: for pods stuck Terminating on a lost node


@dataclass(frozen=True)
class DeleteAttemptConfig:
    attempt: int


@dataclass(frozen=True)
class DeleteJob:
    """ttlSecondsAfterFinished elapsed; owner references take the children with it."""


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


Action = (
    CreateService
    | CreateAttempt
    | CreatePodGroup
    | DeletePodGroup
    | DeletePods
    | DeleteAttemptConfig
    | DeleteJob
)
