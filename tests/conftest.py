from __future__ import annotations

import faulthandler
import os
import sys
import threading
from pathlib import Path

import pytest
import yaml
from finetune_operator.api.crd import build_crd

from tests.support.apiserver import FakeApiServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def committed_crd() -> dict:
    path = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def apiserver() -> FakeApiServer:
    return FakeApiServer(build_crd())


@pytest.fixture(scope="session")
def s3():  # type: ignore[no-untyped-def]
    from tests.support.s3 import moto_s3

    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3, monkeypatch):  # type: ignore[no-untyped-def]
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


EXIT_GRACE_SECONDS = 120


def pytest_unconfigure(config: pytest.Config) -> None:
    """A thread left running (an operator, a server) can hold the interpreter's exit for ever, long
    after the summary: print every thread's stack and exit with failure instead."""

    def stuck() -> None:
        sys.stderr.write(f"\nthe test process did not exit within {EXIT_GRACE_SECONDS}s; threads:\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(3)

    watchdog = threading.Timer(EXIT_GRACE_SECONDS, stuck)
    watchdog.daemon = True  # a normal exit does not wait for it
    watchdog.start()
