"""No rank waits in a collective for work that grows with the model, the data or the checkpoint:
with the collective timeout at a few seconds, a model download several times longer still trains
to the end, while a collective that hangs during training ends the run within that timeout, exit 75.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from finetune_operator import contract
from finetune_trainer.storage import open_store

from tests.support.s3 import S3Endpoint
from tests.support.slow_link import slow_link
from tests.support.trainer_run import Workspace, reports, run, start, trainer_config, worker_pid

pytestmark = pytest.mark.slow

COLLECTIVE_TIMEOUT = 5


def _short_timeouts(changes: dict[str, object]) -> dict[str, object]:
    return {"spec.runPolicy.collectiveTimeoutSeconds": COLLECTIVE_TIMEOUT, **changes}


def test_a_model_download_longer_than_the_collective_timeout_still_trains(
    workspace: Workspace, s3_module_env: S3Endpoint, tmp_path: Path
) -> None:
    bucket = s3_module_env.new_bucket()
    model = open_store(f"s3://{bucket}/models/tiny")
    for path in Path(workspace.model_uri.removeprefix("file://")).iterdir():
        model.put_file(path, path.name)
    upstream = urlparse(s3_module_env.url)
    # ~330 KB of weights at 16 KiB a second: local rank 0 downloads for 20 s or more while rank 1
    # waits, four times the collective timeout.
    with slow_link(upstream.hostname or "", upstream.port or 0, upload_delay=0.0, download_delay=1.0) as url:
        config = trainer_config(
            workspace,
            f"file://{tmp_path}/store",
            _short_timeouts({"spec.model.source": f"s3://{bucket}/models/tiny", "spec.training.maxSteps": 4}),
        )
        started = time.monotonic()
        finished = run(config, tmp_path / "work", env={**s3_module_env.env(), "AWS_ENDPOINT_URL_S3": url})
    assert finished.code == 0, finished.output[-3000:]
    assert time.monotonic() - started > 4 * COLLECTIVE_TIMEOUT  # the download really was that long


def test_a_hung_collective_during_training_ends_the_run_within_the_timeout_exit_75(
    workspace: Workspace, tmp_path: Path
) -> None:
    config = trainer_config(
        workspace, f"file://{tmp_path}/store", _short_timeouts({"spec.training.maxSteps": 200})
    )
    # The launcher gives the ranks 2 s after the failure instead of the tests' usual minute: the
    # stopped rank cannot answer SIGTERM, only the SIGKILL that follows.
    process = start(config, tmp_path / "work", env={contract.ENV_SHUTDOWN_TIMEOUT: "2"})
    process.wait_for(lambda out: any((r.progress.step or 0) >= 2 for r in reports(out)))
    stopped = worker_pid(process, 1)
    os.kill(stopped, signal.SIGSTOP)  # rank 1 hangs: alive, connected, silent
    hung_at = time.monotonic()
    try:
        finished = process.finish(timeout=120)
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, sig)
    assert finished.code == contract.ExitCode.TRANSIENT, finished.output[-3000:]
    assert finished.termination.startswith("collective failed at step")
    # Well inside the run's 200 steps and the default 300 s: the timeout that ended it was ours.
    assert time.monotonic() - hung_at < 60
