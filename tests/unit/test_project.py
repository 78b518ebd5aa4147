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
    assert '".[trainer]"' in text  # the lock it installs from: test_image_lock.py


TRAINER_ONLY_MODULES = ("torch", "transformers", "deepspeed", "peft", "boto3", "finetune_trainer")


def test_the_operator_runs_without_any_trainer_dependency(repo: Path) -> None:
    """The operator image installs only the operator extra: loading the handlers must not import a
    trainer dependency (blocked here as if absent)."""
    code = (
        "import sys, importlib.abc\n"
        f"blocked = {TRAINER_ONLY_MODULES!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in blocked: raise ImportError(f'trainer-only module {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import finetune_operator.handlers, finetune_operator.cli\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_operator_dockerfile_installs_only_the_operator_extra_and_runs_kopf_non_root(repo: Path) -> None:
    import yaml

    text = (repo / "operator" / "Dockerfile").read_text()
    lines = text.splitlines()
    copied = [line.split()[1:-1] for line in lines if line.startswith("COPY ") and "--from" not in line]
    assert copied and all((repo / p).exists() for paths in copied for p in paths)
    assert '".[operator]"' in text and "[trainer]" not in text
    assert "trainer_image/finetune_trainer" not in text
    assert "USER 65532:65532" in text
    assert 'ENTRYPOINT ["kopf", "run", "-m", "finetune_operator.handlers"]' in text
    deployment = (repo / "charts" / "finetune-operator" / "templates" / "deployment.yaml").read_text()
    assert "runAsUser: 65532" in deployment  # the chart runs the image as the user it was built for
    assert yaml.safe_load((repo / "charts" / "finetune-operator" / "Chart.yaml").read_text())["appVersion"]
