"""Which checkpoints `checkpoint.resume` makes a start try: latest, none, or one committed
checkpoint of another job (a warm start); this job's own commits always win once it has any."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from finetune_trainer.checkpoint_store import CheckpointStore, step_dir
from finetune_trainer.resuming import Resumer, ResumeSourceNotFound, resume_address
from finetune_trainer.storage import open_store


def _job_store(root: Path, job: str) -> CheckpointStore:
    return CheckpointStore(open_store(f"file://{root}/store/team-a/{job}"))


def _commit(cs: CheckpointStore, root: Path, step: int) -> None:
    local = root / "saved" / str(step)
    local.mkdir(parents=True)
    (local / "mp_rank_00_model_states.pt").write_bytes(os.urandom(64))
    cs.upload_node(step, 0, local)
    cs.commit(step, cs.wait_for_nodes(step, 1, timeout=5), world_size=1, data_position={})


def _candidates(own: CheckpointStore, resume: str, root: Path) -> list[tuple[bool, int]]:
    """What the rank-0 listing of a start decides; the engine and the gang play no part in it."""
    resumer = Resumer(engine=None, store=own, ranks=None, phases=None, local_root=root)  # type: ignore[arg-type]
    address = resume_address(resume)
    return resumer.candidates(resume, address, _job_store(root, "base") if address else None)


def test_latest_tries_this_jobs_commits_newest_first(tmp_path: Path) -> None:
    own = _job_store(tmp_path, "demo")
    _commit(own, tmp_path, 10)
    _commit(own, tmp_path, 20)
    assert _candidates(own, "latest", tmp_path) == [(False, 20), (False, 10)]


def test_none_starts_fresh_when_the_job_has_no_commit(tmp_path: Path) -> None:
    assert _candidates(_job_store(tmp_path, "demo"), "none", tmp_path) == []


def test_a_warm_start_tries_the_named_checkpoint_of_the_other_job(tmp_path: Path) -> None:
    _commit(_job_store(tmp_path, "base"), tmp_path, 30)
    uri = f"file://{tmp_path}/store/team-a/base/{step_dir(30)}"
    assert _candidates(_job_store(tmp_path, "demo"), uri, tmp_path) == [(True, 30)]


def test_the_jobs_own_commits_win_over_a_warm_start(tmp_path: Path) -> None:
    own = _job_store(tmp_path, "demo")
    _commit(own, tmp_path, 5)
    uri = f"file://{tmp_path}/store/team-a/base/{step_dir(30)}"
    assert _candidates(own, uri, tmp_path) == [(False, 5)]


def test_a_warm_start_from_an_uncommitted_step_is_refused(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/store/team-a/base/{step_dir(30)}"
    with pytest.raises(ResumeSourceNotFound, match="not a committed, intact checkpoint"):
        _candidates(_job_store(tmp_path, "demo"), uri, tmp_path)


def test_a_uri_that_names_no_checkpoint_is_refused_with_the_expected_form(tmp_path: Path) -> None:
    with pytest.raises(ResumeSourceNotFound, match="expected <store>/<namespace>/<job>/checkpoints/step-"):
        _candidates(_job_store(tmp_path, "demo"), f"file://{tmp_path}/store/team-a/base", tmp_path)
