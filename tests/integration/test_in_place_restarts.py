"""In-place restarts in `ftjob run` with the real trainer: two node ranks ("pods") on CPU, the model
and the checkpoints in S3 (moto), one rank failing as transient (exit 75) 5 s after step 10 (the
checkpoints behind training commit meanwhile) through the trainer's test-only fault hook. Its
launcher restarts the training processes inside the same pod, the other pod's joins the new round,
and the run resumes from the newest committed checkpoint with the model and that checkpoint read
from the pods' scratch disks: compared with the same job run without the fault, and with the
store's request log (moto's recorder).

A rank whose whole process group is killed (a lost node) still restarts the gang at pod level:
tests/integration/test_local_run.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_trainer.faults import ENV_FAIL_AT_STEP
from finetune_trainer.sample_trace import ENV_SAMPLE_TRACE

from tests.support.processes import ftjob_run
from tests.support.s3 import S3Endpoint
from tests.support.trainer_run import Workspace, last_trained, losses, sample_trace, tiny_job_manifest

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 480.0
FAILED_AFTER = 10
CHANGES = {
    "spec.resources.nodes": 2,
    "spec.resources.processesPerNode": 1,
    "spec.training.maxSteps": 14,
    "spec.training.logEverySteps": 1,
    "spec.checkpoint.everySteps": 4,
    "spec.runPolicy.backoffBaseSeconds": 1,
    "spec.runPolicy.backoffCapSeconds": 1,
}


@dataclass
class Run:
    status: dict[str, Any]
    events: list[dict[str, Any]]
    logs: dict[str, str]
    trace: list[dict[str, Any]]
    requests: list[tuple[str, str]]


def _upload_model(s3: S3Endpoint, bucket: str, model_dir: Path) -> str:
    client = s3.client()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"models/tiny/{path.relative_to(model_dir).as_posix()}")
    return f"s3://{bucket}/models/tiny"


def _run(root: Path, s3: S3Endpoint, model_uri: str, store_uri: str, env: dict[str, str]) -> Run:
    ws = Workspace.create(root / "ws", records=256)
    trace = root / "trace"
    job = tiny_job_manifest(
        ws,
        store_uri,
        {
            **CHANGES,
            "spec.model.source": model_uri,
            "spec.checkpoint.endpointUrl": s3.url,
            "spec.resources.env": [
                {"name": k, "value": v} for k, v in {**env, ENV_SAMPLE_TRACE: str(trace)}.items()
            ],
        },
    )
    job["metadata"]["namespace"] = "default"
    manifest, workdir, out = root / "job.yaml", root / "run", root / "ftjob-run.out"
    manifest.write_text(yaml.safe_dump(job))
    s3.record()
    proc = ftjob_run(manifest, workdir, out, env=s3.env())
    try:
        assert proc.wait(RUN_TIMEOUT) == 0, out.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    return Run(
        status=json.loads((workdir / "job.json").read_text())["status"],
        events=[json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines()],
        logs={p.stem: p.read_text(errors="replace") for p in (workdir / "logs").glob("*.log")},
        trace=sample_trace(trace),
        requests=s3.recorded(),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, s3_module_env: S3Endpoint) -> tuple[Run, Run]:
    """(uninterrupted, restarted in place), the same job otherwise."""
    s3 = s3_module_env
    bucket = s3.new_bucket()
    root = tmp_path_factory.mktemp("in-place")
    model_uri = _upload_model(s3, bucket, Workspace.create(root / "model-src").root / "model")
    reference = _run(root / "reference", s3, model_uri, f"s3://{bucket}/reference", {})
    restarted = _run(
        root / "restarted",
        s3,
        model_uri,
        f"s3://{bucket}/restarted",
        {ENV_FAIL_AT_STEP: f"{FAILED_AFTER}:75:1:5"},
    )
    return reference, restarted


def test_the_failed_rank_is_restarted_inside_its_pod_without_a_new_attempt(runs: tuple[Run, Run]) -> None:
    _, run = runs
    status = run.status
    assert status["phase"] == "Succeeded" and status["attempt"] == 1, status
    assert sorted(run.logs) == ["tiny-a1-n0", "tiny-a1-n1"], "no pod of a second attempt"
    assert "in-place restart 1 of 3" in run.logs["tiny-a1-n1"]
    rank1 = [row for row in run.trace if row["rank"] == 1]
    before = {row["pid"] for row in rank1 if row["step"] <= FAILED_AFTER}
    after = {row["pid"] for row in rank1 if row["step"] > FAILED_AFTER}
    assert len(before | after) == 2 and before != after, "the training process was replaced, in place"


def test_the_in_place_restart_counts_toward_max_restarts_and_shows_in_status_and_events(
    runs: tuple[Run, Run],
) -> None:
    _, run = runs
    status = run.status
    assert (status["restarts"], status["inPlaceRestarts"], status["infraRestarts"]) == (1, 1, 0)
    restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
    assert restarting["reason"] == "RestartedInPlace" and "test fault" in restarting["message"]
    reasons = [e["reason"] for e in run.events]
    assert "RestartedInPlace" in reasons and reasons.count("Created") == 1
    failed = next(e for e in run.events if e["reason"] == "RankFailed")
    assert "node 1: test fault: rank 1 failed after step 10" in failed["message"]


def test_the_time_the_restart_cost_is_lost_to_application_restarts_in_goodput(runs: tuple[Run, Run]) -> None:
    reference, run = runs
    assert reference.status["goodput"]["applicationRestartSeconds"] == 0
    assert run.status["goodput"]["applicationRestartSeconds"] > 0
    assert run.status["goodput"]["percent"] < reference.status["goodput"]["percent"]


def test_the_restarted_processes_resume_from_the_newest_committed_checkpoint(runs: tuple[Run, Run]) -> None:
    _, run = runs
    log = run.logs["tiny-a1-n0"]
    committed_before = [
        int(s) for s in re.findall(r"checkpoint step (\d+) committed", log.split("resuming at")[0])
    ]
    assert int(re.search(r"resuming at step (\d+)", log)[1]) == max(committed_before)  # type: ignore[index]


def test_the_model_is_downloaded_once_per_pod_not_again_after_the_restart(runs: tuple[Run, Run]) -> None:
    reference, run = runs

    def model_gets(r: Run) -> int:
        return sum(m == "GET" and p.endswith("/models/tiny/config.json") for m, p in r.requests)

    assert model_gets(run) == model_gets(reference) == 2


def test_the_checkpoint_is_read_from_the_pods_scratch_not_downloaded(runs: tuple[Run, Run]) -> None:
    """Only the files a node did not write itself (rank 0's model states, on node 1) are fetched:
    each node's own shards are checked against the manifest on its disk."""
    _, run = runs
    fetched = [p for m, p in run.requests if m == "GET" and "/checkpoints/step-" in p]
    shards = [p for p in fetched if "optim_states" in p]
    assert shards == [], fetched


def test_every_step_trained_on_the_samples_of_the_uninterrupted_run(runs: tuple[Run, Run]) -> None:
    reference, run = runs
    assert last_trained(run.trace) == last_trained(reference.trace)


def test_the_final_loss_matches_the_uninterrupted_run(runs: tuple[Run, Run]) -> None:
    """Resumed from the same checkpoint bytes, a step is the same computation: fp32 on CPU agrees
    to float rounding."""
    reference, run = runs
    assert losses(run.logs["tiny-a1-n0"])[-1] == pytest.approx(
        losses(reference.logs["tiny-a1-n0"])[-1], rel=1e-5
    )
