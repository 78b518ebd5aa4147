"""Which watch events are news: the one place that remembers, per job, what the operator has
already seen or written itself.

Two kinds of event are no reason for a pass. A pod listed again unchanged: a watch that reconnects
lists every pod again (kopf relists; API servers end watches every 30-60 minutes, the emulator far
more often). And the echo of the operator's own status write: the state it just decided on or
copied. The echo can arrive before the write's response, so events arriving while a write is in
flight are held and judged once its version is known; those that were not ours go to `on_change`.

A cache of what the watches delivered, never a fact of its own: a fresh filter only costs a few
passes that find nothing to do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from finetune_operator.backends.base import JobKey

PodKey = tuple[str, str]  # (namespace, pod name)


class WatchFilter:
    def __init__(self) -> None:
        self.on_change: Callable[[JobKey], None] = lambda key: None
        self._pods: dict[PodKey, str] = {}  # the resourceVersion each pod was last seen at
        self._own: dict[JobKey, str] = {}  # the version of our own latest status write per job
        self._writing: dict[JobKey, int] = {}
        self._arrived: dict[JobKey, set[str]] = {}

    def pod_changed(self, key: PodKey, event: str | None, version: str | None) -> bool:
        """Whether a pod's watch event is news for its job."""
        if event == "DELETED":
            self._pods.pop(key, None)
            return True
        if version is None:
            return True
        if self._pods.get(key) == version:
            return False
        self._pods[key] = version
        return True

    def job_changed(self, key: JobKey, version: str | None) -> bool:
        """Whether a job's watch event is news: not the echo of our own status write."""
        if version is not None and version == self._own.get(key):
            return False
        if self._writing.get(key) and version is not None:
            self._arrived.setdefault(key, set()).add(version)
            return False
        return True

    async def own_write(self, key: JobKey, write: Awaitable[str | None]) -> str | None:
        """Run one of our status writes (it returns the job's new resourceVersion) so that its
        echo, early or late, is recognised."""
        self._writing[key] = self._writing.get(key, 0) + 1
        try:
            version = await write
            if version is not None:
                self._own[key] = version
            return version
        finally:
            self._writing[key] -= 1
            if not self._writing[key]:
                del self._writing[key]
                if self._arrived.pop(key, set()) - {self._own.get(key)}:
                    self.on_change(key)

    def forget(self, key: JobKey) -> None:
        """The job is gone. Its pods' versions leave with their own DELETED events."""
        self._own.pop(key, None)
        self._arrived.pop(key, None)
