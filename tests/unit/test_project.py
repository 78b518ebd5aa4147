"""Project-level promises: generated files are current, the layout keeps `import operator` intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from finetune_operator.api.docs import render_api_docs


def test_committed_api_docs_are_the_generated_ones(repo: Path) -> None:
    assert (repo / "docs" / "api.md").read_text() == render_api_docs(), (
        "docs/api.md is stale: run `make docs`"
    )


def test_import_operator_from_the_repo_root_is_the_standard_library(repo: Path) -> None:
    code = "import operator, sys; sys.exit(0 if hasattr(operator, 'itemgetter') else 1)"
    assert subprocess.run([sys.executable, "-c", code], cwd=repo).returncode == 0


def test_both_packages_import_from_the_installed_distribution(repo: Path) -> None:
    code = "import finetune_operator, finetune_trainer.config"
    assert subprocess.run([sys.executable, "-c", code], cwd=repo).returncode == 0


def test_the_trainer_dockerfile_copies_what_exists_and_runs_as_the_pod_user(repo: Path) -> None:
    from finetune_operator import contract

    text = (repo / "trainer_image" / "Dockerfile").read_text()
    copied = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert copied and all((repo / p).exists() for paths in copied for p in paths)
    assert f"USER {contract.TRAINER_UID}:" in text
    assert '".[trainer]"' in text and "PIP_CONSTRAINT" in text  # the base image's CUDA torch is kept
