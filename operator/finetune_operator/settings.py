"""What an operator installation decides for every job, read from the environment the Helm chart
sets on the operator's Deployment. Bad values stop the operator at start with the variable named."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from finetune_operator.builders import BuildContext

DEFAULT_TRAINER_IMAGE = "finetune-operator/trainer:0.1.0"


@dataclass(frozen=True)
class OperatorSettings:
    default_image: str = DEFAULT_TRAINER_IMAGE
    workers: int = 8  # reconcile passes running at once (each is mostly waiting on the API)
    metrics_port: int | None = 9090  # None: no metrics endpoint
    request_timeout_seconds: float = 30.0  # any single API call; a timed-out pass is retried
    progress_poll_seconds: float = 30.0  # how often a running job's rank-0 log is read for progress
    resync_seconds: float = 300.0  # the level-based safety net: every active job looked at again
    create_concurrency: int = 16  # pods of one attempt created in parallel
    network_policy: bool = False  # one NetworkPolicy per job: ingress only from the job's own pods
    # kopf's peering: replicas of equal priority ALL pause (kopf 1.45), so each replica draws its own
    # and the highest live one works; a fixed value is for the rare deliberate primary/standby set-up.
    peering_priority: int = 0

    @property
    def build_context(self) -> BuildContext:
        return BuildContext(default_image=self.default_image)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorSettings:
        def number(name: str, default: float, *, minimum: float) -> float:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None
            if value < minimum:
                raise ValueError(f"{name}={raw!r} must be at least {minimum:g}")
            return value

        def flag(name: str) -> bool:
            raw = env.get(name, "").strip().lower()
            if raw not in ("", "true", "false", "1", "0"):
                raise ValueError(f"{name}={raw!r} must be true or false")
            return raw in ("true", "1")

        port = env.get("FTJOB_METRICS_PORT", "9090")
        priority = env.get("FTJOB_PEERING_PRIORITY", "")
        return cls(
            default_image=env.get("FTJOB_DEFAULT_IMAGE") or DEFAULT_TRAINER_IMAGE,
            workers=int(number("FTJOB_WORKERS", cls.workers, minimum=1)),
            metrics_port=None if port in ("", "0") else int(number("FTJOB_METRICS_PORT", 9090, minimum=1)),
            request_timeout_seconds=number("FTJOB_REQUEST_TIMEOUT_SECONDS", 30.0, minimum=1),
            progress_poll_seconds=number("FTJOB_PROGRESS_POLL_SECONDS", 30.0, minimum=1),
            resync_seconds=number("FTJOB_RESYNC_SECONDS", 300.0, minimum=10),
            create_concurrency=int(number("FTJOB_CREATE_CONCURRENCY", 16, minimum=1)),
            network_policy=flag("FTJOB_NETWORK_POLICY"),
            peering_priority=(
                int(number("FTJOB_PEERING_PRIORITY", 0, minimum=1))
                if priority
                else 1 + secrets.randbelow(2**31 - 1)
            ),
        )
