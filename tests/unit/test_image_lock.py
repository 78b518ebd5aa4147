"""The image runs what CI tests: one lock (constraints.txt) that the Makefile and the trainer image
both install from, an image whose torch is the locked one, and a locked torch whose torchrun gives
the ranks the pod's grace period for their emergency checkpoint."""

from __future__ import annotations

import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# torchrun reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT from 2.12 on (torch/distributed/launcher/api.py,
# LaunchConfig.__post_init__); before, it sent SIGKILL 30 s after SIGTERM whatever the pod's grace.
GRACE_PERIOD_TORCH = Version("2.12")
TRAINING_STACK = (
    "torch",
    "deepspeed",
    "transformers",
    "peft",
    "bitsandbytes",
    "boto3",
    "pyarrow",
    "safetensors",
)
BASE_IMAGE = re.compile(r"^ARG BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-\w+$", re.M)


def _lock(repo: Path) -> dict[str, str]:
    pins = {}
    for line in (repo / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def _dockerfile(repo: Path) -> str:
    return (repo / "trainer_image" / "Dockerfile").read_text()


def _base_image_torch(dockerfile: str) -> str:
    match = BASE_IMAGE.search(dockerfile)
    assert match, "Dockerfile: BASE_IMAGE must be pytorch/pytorch:<torch>-cuda<x>-cudnn<y>-<kind>"
    return match.group(1)


def test_the_image_base_is_the_cuda_build_of_the_locked_torch(repo: Path) -> None:
    assert _base_image_torch(_dockerfile(repo)) == _lock(repo)["torch"]


def test_the_image_installs_the_trainer_from_the_lock(repo: Path) -> None:
    dockerfile = _dockerfile(repo)
    installs = [shlex.split(cmd) for cmd in re.findall(r"pip install ([^\\&\n]+)", dockerfile)]
    assert installs, "the Dockerfile installs nothing with pip"
    for args in installs:
        assert "--constraint" in args and args[args.index("--constraint") + 1] == "constraints.txt", args
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M)


def test_ci_installs_from_the_same_lock(repo: Path) -> None:
    makefile = (repo / "Makefile").read_text()
    assert "export PIP_CONSTRAINT := $(CURDIR)/constraints.txt" in makefile
    assert "TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)" in makefile


def test_the_locked_torch_honours_the_grace_period(repo: Path) -> None:
    assert Version(_lock(repo)["torch"]) >= GRACE_PERIOD_TORCH, (
        f"torch {_lock(repo)['torch']}: torchrun before {GRACE_PERIOD_TORCH} kills the ranks 30 s after "
        "SIGTERM, cutting off the emergency checkpoint; lock torch >= 2.12 (and its base image)"
    )


def test_the_installed_torchrun_reads_the_shutdown_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The behaviour itself, in the torch CI runs (the locked one: see below)."""
    from torch.distributed.run import config_from_args, parse_args

    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "115")
    config, _, _ = config_from_args(parse_args(["--nproc-per-node=1", "-m", "finetune_trainer"]))
    assert config.shutdown_timeout == 115


@pytest.mark.parametrize("name", TRAINING_STACK)
def test_the_training_stack_is_locked(repo: Path, name: str) -> None:
    assert canonicalize_name(name) in _lock(repo)


def _closure(requirement: str, extras: tuple[str, ...] = ()) -> set[str]:
    seen: set[str] = set()
    pending = [(requirement, extras)]
    while pending:
        name, wanted = pending.pop()
        if canonicalize_name(name) in seen:
            continue
        seen.add(canonicalize_name(name))
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *wanted)):
                try:
                    metadata.version(req.name)
                except metadata.PackageNotFoundError:
                    continue  # an optional dependency for another platform
                pending.append((req.name, tuple(req.extras)))
    return seen


def test_everything_the_trainer_extra_pulls_in_is_locked(repo: Path) -> None:
    unpinned = _closure("finetune-operator", ("trainer",)) - {"finetune-operator"} - set(_lock(repo))
    assert not unpinned, f"not in constraints.txt (run `make lock`): {sorted(unpinned)}"


def test_the_installed_environment_is_the_locked_one(repo: Path) -> None:
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    drift = {
        name: (pinned, installed[name])
        for name, pinned in _lock(repo).items()
        if name in installed and installed[name].split("+")[0] != pinned
    }
    assert not drift, f"installed versions differ from constraints.txt (pinned, installed): {drift}"
