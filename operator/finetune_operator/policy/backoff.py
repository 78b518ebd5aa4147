"""Gang restart delay: exponential in the counted restarts, capped, with jitter.

The jitter is drawn from the job's uid and attempt, not a random generator, so the decide step stays
a pure function (an operator restarted mid-backoff computes the same end time) while jobs that fail
together still spread their restarts.
"""

from __future__ import annotations

import hashlib


def jitter_fraction(uid: str, attempt: int) -> float:
    digest = hashlib.sha256(f"{uid}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def backoff_seconds(*, restarts: int, base: int, cap: int, uid: str, attempt: int) -> float:
    """Delay before attempt `attempt + 1` after `restarts` counted restarts: between half and all of
    min(cap, base * 2**restarts) ("equal jitter"), so a delay never collapses to nothing."""
    ceiling = min(float(cap), base * 2.0 ** max(0, restarts))
    return ceiling / 2 + ceiling / 2 * jitter_fraction(uid, attempt)
