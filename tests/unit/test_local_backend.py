"""The local backend's translation of a rank pod into a local process, its stored "API objects", and
what `ftjob status`/`describe` print from them."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from finetune_operator import contract
from finetune_operator.api import FineTuneJobStatus, parse_manifest
from finetune_operator.api.crd import PRINTER_COLUMNS
from finetune_operator.backends.local import LOCAL_CONTEXT, LocalBackend
from finetune_operator.builders import build_rank_pod
from finetune_operator.cli import main
from finetune_operator.jobview import load_local, wide_row
from finetune_operator.local_run import RunOptions, local_manifest

from tests.support.factories import manifest

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _job(**changes: object) -> dict:
    return manifest({"spec.resources.nodes": 2, **changes}, name="tiny", namespace="default")


def test_a_rank_runs_the_pods_own_command_and_env_made_local(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, base_env={})
    job = parse_manifest(_job())
    command, env = backend.rank_process(job, 2, 1, 41234)
    pod = build_rank_pod(job, 2, 1, LOCAL_CONTEXT)["spec"]["containers"][0]
    pod_env = {e["name"]: e["value"] for e in pod["env"] if "value" in e}
    local_only = {contract.ENV_MASTER_ADDR, contract.ENV_MASTER_PORT, contract.ENV_SCRATCH_DIR,
                  contract.ENV_TERMINATION_LOG, "HF_HOME"}  # fmt: skip
    assert {k: v for k, v in env.items() if k not in local_only} == {
        k: v for k, v in pod_env.items() if k not in local_only
    }
    assert env[contract.ENV_MASTER_ADDR] == "127.0.0.1" and env[contract.ENV_MASTER_PORT] == "41234"
    assert command[1:7] == [
        "-m",
        "finetune_trainer.launch",
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:41234",
    ]
    assert env[contract.ENV_NODE_RANK] == "1"  # the trainer keeps the pod's node rank
    assert command[-1] == str(tmp_path.resolve() / "attempt-2" / "config.json")
    assert "$(" not in " ".join(command)


def test_each_node_rank_gets_its_own_share_of_the_gpus(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, gpus_per_node=2, base_env={})
    _, env = backend.rank_process(parse_manifest(_job()), 1, 1, 1)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_resubmitting_keeps_the_status_and_counts_a_spec_change(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    job = backend.submit(_job(), NOW)
    assert asyncio.run(backend.write_status(job, FineTuneJobStatus(phase="Running", attempt=3)))
    again = backend.submit(_job(**{"spec.training.maxSteps": 99}), NOW)
    assert again.status is not None and again.status.attempt == 3
    assert (backend.read_job() or {})["metadata"]["generation"] == 2


def test_a_status_written_from_a_stale_read_is_refused(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    stale = backend.submit(_job(), NOW)
    backend.submit(_job(**{"spec.training.maxSteps": 99}), NOW)
    assert not asyncio.run(backend.write_status(stale, FineTuneJobStatus(phase="Running")))


def test_a_gang_job_runs_locally_as_if_it_had_no_gang_scheduler(tmp_path: Path) -> None:
    """One machine has no Kueue or Volcano: the decide step sees no spec.gang (never Queued, no
    PodGroup actions), while the stored manifest keeps it for the cluster."""
    backend = LocalBackend(tmp_path)
    backend.submit(_job(**{"spec.gang": {"scheduler": "Volcano"}}), NOW)
    observed = asyncio.run(backend.observe(("default", "tiny"), NOW))
    assert observed is not None and observed.job.spec.gang is None
    assert (backend.read_job() or {})["spec"]["gang"] == {"scheduler": "Volcano"}


def test_a_workdir_holds_one_job(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    backend.submit(_job(), NOW)
    with pytest.raises(ValueError, match="holds job 'tiny'"):
        backend.submit(manifest(name="other", namespace="default"), NOW)


def test_the_checkpoint_store_defaults_to_the_workdir_and_a_named_one_is_kept(tmp_path: Path) -> None:
    options = RunOptions(workdir=tmp_path, nodes=3)
    bare = _job()
    del bare["spec"]["checkpoint"]["uri"]
    local = local_manifest(bare, options)
    assert local["spec"]["checkpoint"]["uri"] == f"file://{tmp_path.resolve()}/store"
    assert local["spec"]["resources"]["nodes"] == 3
    named = local_manifest(_job(**{"spec.checkpoint.uri": "s3://bucket/runs"}), options)
    assert named["spec"]["checkpoint"]["uri"] == "s3://bucket/runs"


def test_status_row_has_every_printer_column_of_the_crd(tmp_path: Path) -> None:
    body = _job()
    body["metadata"]["creationTimestamp"] = "2026-11-23T11:00:00Z"
    body["status"] = {
        "phase": "Failed",
        "conditions": [{"type": "Failed", "status": "True", "reason": "InvalidConfig"}],
        "progress": {"step": 7, "loss": 1.23456},
    }
    row = wide_row(body, NOW)
    assert list(row) == ["NAME", *(c["name"].upper() for c in PRINTER_COLUMNS)]
    assert (row["PHASE"], row["STEP"], row["LOSS"], row["REASON"], row["AGE"]) == (
        "Failed", "7", "1.235", "InvalidConfig", "1h"
    )  # fmt: skip


def test_ftjob_status_and_describe_read_a_local_workdir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = LocalBackend(tmp_path)
    job = backend.submit(_job(), NOW)
    asyncio.run(backend.write_status(job, FineTuneJobStatus(phase="Running", attempt=1)))
    assert main(["status", "tiny", "--workdir", str(tmp_path)]) == 0
    assert "Running" in capsys.readouterr().out
    assert main(["describe", "tiny", "--workdir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "Phase:        Running" in text and "Events:" in text
    assert load_local(tmp_path) is not None


def test_ftjob_status_of_a_missing_local_job_names_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "ghost", "--workdir", str(tmp_path / "nothing")]) == 1
    assert re.search(
        r"no FineTuneJob 'ghost' in .*use -n NAMESPACE for a cluster job", capsys.readouterr().err
    )
