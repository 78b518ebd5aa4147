"""model.tokenSecret end to end, without network: the rank pod's env (as the builder writes it, with
the Secret's value filled in as the kubelet would) is what the trainer's hub download sends, and the
token shows up in nothing the trainer prints. A fake hub on 127.0.0.1 serves one gated repository."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_operator import contract
from finetune_operator.builders import BuildContext, build_rank_pod

from tests.support.factories import job
from tests.support.hub import FakeHub, fake_hub

REPO = "meta-llama/Gated-Tiny"
TOKEN = "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"
SECRET = {"name": "hf-token", "data": {"token": TOKEN}}  # the Secret as the kubelet reads it

LOAD = (
    "import sys; from types import SimpleNamespace as N\n"
    "from finetune_trainer.model import ModelNotFound, load_tokenizer\n"
    "config = N(model=N(revision=None, trust_remote_code=False, tokenizer=None),"
    " dataset=N(chat_template=None, sources=[]))\n"
    "try:\n"
    f"    print('loaded', type(load_tokenizer(config, {REPO!r})).__name__)\n"
    "except ModelNotFound as exc:\n"
    "    print('not found:', exc); sys.exit(3)\n"
)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("tokenizer")
    code = (
        "from finetune_trainer.tiny import tiny_tokenizer\n"
        f"tiny_tokenizer(['a b c']).save_pretrained({str(folder)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def hub(tokenizer_files: dict[str, bytes]) -> Iterator[FakeHub]:
    with fake_hub(REPO, tokenizer_files, TOKEN) as served:
        yield served


def _kubelet_env(pod: dict[str, Any], secrets: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The container env the kubelet would start: plain values, secretKeyRefs filled in."""
    env: dict[str, str] = {}
    for entry in pod["spec"]["containers"][0]["env"]:
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            env[entry["name"]] = entry["value"]
        elif ref["name"] in secrets:
            env[entry["name"]] = secrets[ref["name"]]["data"][ref["key"]]
    return env


def _trainer_download(
    hub: FakeHub, pod_env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env = {**base, **pod_env, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    return subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)


def _pod(changes: dict[str, Any]) -> dict[str, Any]:
    return build_rank_pod(job({"spec.model.source": REPO, **changes}), 1, 0, BuildContext("trainer:test"))


def test_the_hub_download_sends_the_token_from_the_secret_and_prints_it_nowhere(
    hub: FakeHub, tmp_path: Path
) -> None:
    pod = _pod({"spec.model.tokenSecret": {"name": "hf-token", "key": "token"}})
    env = _kubelet_env(pod, {"hf-token": SECRET})
    assert env[contract.ENV_HF_TOKEN] == TOKEN
    result = _trainer_download(hub, env, tmp_path)
    assert result.returncode == 0 and "loaded" in result.stdout, result.stdout + result.stderr
    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}
    assert TOKEN not in result.stdout + result.stderr


def test_without_a_token_the_gated_model_is_input_not_found(hub: FakeHub, tmp_path: Path) -> None:
    result = _trainer_download(hub, _kubelet_env(_pod({}), {}), tmp_path)
    assert result.returncode == 3 and "gated repo" in result.stdout, result.stdout + result.stderr
    assert set(hub.authorizations) == {None}


def test_a_wrong_token_is_refused_and_not_echoed(hub: FakeHub, tmp_path: Path) -> None:
    wrong = "hf_ThisTokenIsWrong0000000000000000000"
    pod = _pod({"spec.model.tokenSecret": {"name": "hf-token", "key": "token"}})
    env = _kubelet_env(pod, {"hf-token": {"data": {"token": wrong}}})
    result = _trainer_download(hub, env, tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert wrong not in result.stdout + result.stderr
