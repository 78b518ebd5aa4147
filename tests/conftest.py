from __future__ import annotations

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
