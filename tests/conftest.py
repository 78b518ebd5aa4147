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
