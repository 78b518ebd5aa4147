"""The operator as its own process for the operator benchmarks, pointed at the emulator's URL, so
its CPU time and memory are its own: `python benchmarks/_operator_process.py URL WORKERS [POLL_SECONDS]`."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import kopf
from finetune_operator import handlers  # noqa: F401  (registers the operator's handlers)
from finetune_operator.settings import OperatorSettings
from kubernetes import client


@kopf.on.login()
def _login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=memo["server_url"], insecure=True)


def main() -> None:
    url, workers = sys.argv[1], int(sys.argv[2])
    poll = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    settings = OperatorSettings(
        default_image="registry.example/trainer:bench",
        workers=workers,
        metrics_port=None,
        progress_poll_seconds=poll,
    )
    memo = kopf.Memo(
        server_url=url, settings=settings, api_client=client.ApiClient(client.Configuration(host=url))
    )
    asyncio.run(kopf.operator(clusterwide=True, standalone=True, memo=memo))


if __name__ == "__main__":
    main()
