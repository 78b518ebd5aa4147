"""The trainer reads the operator's rendered config with the same model, and refuses a bad one
with exit 2 and a one-line reason in the termination log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from finetune_operator import contract
from finetune_operator.builders import build_config_map
from finetune_trainer.config import load_config

from tests.support.factories import job


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def test_the_trainer_reads_what_the_operator_rendered(tmp_path: Path) -> None:
    rendered = build_config_map(job({"spec.training.maxSteps": 500}), 1)["data"][contract.CONFIG_FILE_NAME]
    config = load_config(_write_config(tmp_path, rendered))
    assert config.training.max_steps == 500 and config.job.name == "demo"


def _run_trainer(tmp_path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", contract.ENV_TERMINATION_LOG: str(tmp_path / "termination-log")}
    return subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_invalid_config_exits_2_with_a_one_line_reason(tmp_path: Path) -> None:
    rendered = json.loads(build_config_map(job(), 1)["data"][contract.CONFIG_FILE_NAME])
    rendered["world"]["nnodes"] = 0
    result = _run_trainer(tmp_path, _write_config(tmp_path, json.dumps(rendered)))
    assert result.returncode == contract.ExitCode.INVALID_CONFIG
    message = (tmp_path / "termination-log").read_text()
    assert message.count("\n") == 1 and "world.nnodes" in message


def test_a_missing_config_exits_2(tmp_path: Path) -> None:
    result = _run_trainer(tmp_path, tmp_path / "nowhere.json")
    assert result.returncode == contract.ExitCode.INVALID_CONFIG
    assert "cannot read trainer config" in (tmp_path / "termination-log").read_text()
