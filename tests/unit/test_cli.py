"""`ftjob validate` and `ftjob render` as a user meets them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from finetune_operator.cli import main

from tests.support.factories import manifest


def _file(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_shows_the_derived_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _file(tmp_path, manifest({"spec.training.globalBatchSize": 32}))
    assert main(["validate", str(path)]) == 0
    assert "world size 8" in capsys.readouterr().out


def test_validate_names_each_bad_field_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path, manifest({"spec.resources.nodes": 0, "spec.training.bogus": 1}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.resources.nodes:" in err and "spec.training.bogus: unknown field" in err


def test_validate_says_when_a_file_holds_no_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(_file(tmp_path, {"kind": "ConfigMap"}))]) == 2
    assert "no FineTuneJob" in capsys.readouterr().err


def test_render_prints_service_config_map_and_pods(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path, manifest({"spec.resources.nodes": 2}))
    assert main(["render", str(path), "--attempt", "3"]) == 0
    kinds = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == [
        ("Service", "demo-ranks"),
        ("ConfigMap", "demo-a3-config"),
        ("Pod", "demo-a3-n0"),
        ("Pod", "demo-a3-n1"),
    ]


def test_run_refuses_an_invalid_manifest_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = manifest({"spec.training.maxSteps": -1})
    assert main(["run", str(_file(tmp_path, bad)), "--workdir", str(tmp_path / "run")]) == 2
    assert "maxSteps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
