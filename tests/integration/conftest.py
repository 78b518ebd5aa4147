from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.s3 import S3Endpoint
from tests.support.trainer_run import Workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A tiny Llama and a learnable dataset on local disk, made on the spot."""
    return Workspace.create(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def s3_module_env(s3: S3Endpoint) -> Iterator[S3Endpoint]:
    """The test process itself talks to moto with the stand-in credentials, like the trainer does."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env().items():
            mp.setenv(key, value)
        yield s3


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "work"
