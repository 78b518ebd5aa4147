"""The checkpoint commit protocol, on both store kinds: the file store and S3 (moto's server)."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.checkpoint_store import CheckpointStore, TornCheckpoint, step_dir
from finetune_trainer.committed_dir import MANIFEST
from finetune_trainer.storage import FileStore, ObjectStore, StorageUnavailable, open_store

from tests.support.s3 import SECRET_KEY


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store/team-a/demo")
    s3 = request.getfixturevalue("s3_env")
    return open_store(f"s3://{s3.new_bucket()}/runs/team-a/demo")


def _saved(tmp_path: Path, node: int, step: int, files: dict[str, bytes]) -> Path:
    local = tmp_path / f"node{node}" / f"step{step}"
    for name, data in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    return local


def _checkpoint(cs: CheckpointStore, tmp_path: Path, step: int, nnodes: int = 2) -> None:
    """What a whole gang does for one checkpoint: every node uploads, rank 0 commits."""
    for node in range(nnodes):
        files = {f"global_step{step}/zero_rank_{node}_optim_states.pt": os.urandom(2048 + node)}
        if node == 0:
            files[f"global_step{step}/mp_rank_00_model_states.pt"] = os.urandom(4096)
        cs.upload_node(step, node, _saved(tmp_path, node, step, files))
    reports = cs.wait_for_nodes(step, nnodes, timeout=5)
    cs.commit(step, reports, world_size=nnodes, data_position={"epoch": 0, "consumed": step * 8})


def test_a_committed_checkpoint_round_trips(store: ObjectStore, tmp_path: Path) -> None:
    cs = CheckpointStore(store)
    _checkpoint(cs, tmp_path, 100)
    (manifest,) = cs.resumable()
    assert manifest.step == 100 and manifest.nnodes == 2 and manifest.data_position["consumed"] == 800
    cs.download(manifest, tmp_path / "restore")
    original = (tmp_path / "node0/step100/global_step100/mp_rank_00_model_states.pt").read_bytes()
    assert (tmp_path / "restore/global_step100/mp_rank_00_model_states.pt").read_bytes() == original


def test_no_manifest_is_written_until_every_node_reported(store: ObjectStore, tmp_path: Path) -> None:
    cs = CheckpointStore(store, poll_seconds=0.01)
    cs.upload_node(100, 0, _saved(tmp_path, 0, 100, {"a.pt": b"a"}))
    with pytest.raises(TimeoutError, match="1 of 2 nodes"):
        cs.wait_for_nodes(100, 2, timeout=0.1)
    assert cs.committed_steps() == []


def test_reports_left_by_an_earlier_run_of_the_same_step_do_not_count(
    store: ObjectStore, tmp_path: Path
) -> None:
    cs = CheckpointStore(store, poll_seconds=0.01)
    cs.upload_node(100, 1, _saved(tmp_path, 1, 100, {"b.pt": b"old"}), run_id="earlier")
    cs.upload_node(100, 0, _saved(tmp_path, 0, 100, {"a.pt": b"a"}), run_id="now")
    with pytest.raises(TimeoutError, match="1 of 2 nodes"):
        cs.wait_for_nodes(100, 2, timeout=0.1, run_id="now")


def test_retraining_a_committed_step_uncommits_it_before_replacing_files(
    store: ObjectStore, tmp_path: Path
) -> None:
    cs = CheckpointStore(store)
    _checkpoint(cs, tmp_path, 100)
    cs.upload_node(100, 0, _saved(tmp_path / "again", 0, 100, {"a.pt": b"retrained"}), run_id="again")
    assert cs.committed_steps() == []


def test_a_checkpoint_without_manifest_is_not_resumable(store: ObjectStore, tmp_path: Path) -> None:
    cs = CheckpointStore(store)
    _checkpoint(cs, tmp_path, 100)
    cs.upload_node(200, 0, _saved(tmp_path, 0, 200, {"a.pt": b"uncommitted"}))
    assert [m.step for m in cs.resumable()] == [100]


def test_a_checkpoint_with_a_missing_file_is_skipped_with_a_warning(
    store: ObjectStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cs = CheckpointStore(store)
    _checkpoint(cs, tmp_path, 100)
    _checkpoint(cs, tmp_path, 200)
    store.delete([f"{step_dir(200)}/global_step200/zero_rank_1_optim_states.pt"])
    with caplog.at_level(logging.WARNING):
        assert [m.step for m in cs.resumable()] == [100]
    assert "skipping torn checkpoint step 200" in caplog.text and "missing" in caplog.text


def test_a_truncated_file_is_caught_by_its_size(store: ObjectStore, tmp_path: Path) -> None:
    cs = CheckpointStore(store)
    _checkpoint(cs, tmp_path, 100)
    store.put_bytes(f"{step_dir(100)}/global_step100/mp_rank_00_model_states.pt", b"short")
    assert cs.resumable(warn=lambda _: None) == []


def test_a_corrupted_file_of_the_right_size_fails_its_checksum(store: ObjectStore, tmp_path: Path) -> None:
    cs = CheckpointStore(store)
    _checkpoint(cs, tmp_path, 100)
    key = f"{step_dir(100)}/global_step100/mp_rank_00_model_states.pt"
    store.put_bytes(key, b"\0" * 4096)
    (manifest,) = cs.resumable()
    with pytest.raises(TornCheckpoint, match="checksum"):
        cs.download(manifest, tmp_path / "restore")


def test_retention_keeps_the_newest_k_committed(store: ObjectStore, tmp_path: Path) -> None:
    cs = CheckpointStore(store)
    for step in (100, 200, 300, 400):
        _checkpoint(cs, tmp_path, step)
    assert cs.retain(keep_last=2) == [100, 200]
    assert cs.committed_steps() == [300, 400]
    assert store.list(step_dir(100) + "/") == []


def test_retention_never_deletes_the_checkpoint_being_resumed_from(
    store: ObjectStore, tmp_path: Path
) -> None:
    cs = CheckpointStore(store)
    for step in (100, 200, 300):
        _checkpoint(cs, tmp_path, step)
    cs.retain(keep_last=1, protect=100)
    assert cs.committed_steps() == [100, 300]


def test_retention_clears_old_leftovers_but_not_uploads_in_flight(store: ObjectStore, tmp_path: Path) -> None:
    cs = CheckpointStore(store)
    cs.upload_node(50, 0, _saved(tmp_path, 0, 50, {"torn.pt": b"x"}))
    _checkpoint(cs, tmp_path, 100)
    cs.upload_node(150, 0, _saved(tmp_path, 0, 150, {"in-flight.pt": b"y"}))
    cs.retain(keep_last=3)
    assert store.list(step_dir(50) + "/") == []
    assert [o.key for o in store.list(step_dir(150) + "/")] == [
        f"{step_dir(150)}/in-flight.pt",
        f"{step_dir(150)}/nodes/node-00000.json",
    ]


def test_retention_removes_the_manifest_before_the_files(tmp_path: Path) -> None:
    """A retention killed halfway leaves an uncommitted checkpoint, never a committed torn one."""
    store = open_store(f"file://{tmp_path}/store")
    cs = CheckpointStore(store)
    for step in (100, 200):
        _checkpoint(cs, tmp_path, step)
    deleted: list[list[str]] = []
    real_delete = store.delete

    def spy(keys: list[str]) -> None:
        deleted.append(keys)
        real_delete(keys)

    store.delete = spy  # type: ignore[method-assign]
    cs.retain(keep_last=1)
    assert deleted[0] == [f"{step_dir(100)}/{MANIFEST}"]


def test_unreachable_storage_raises_storage_unavailable_without_secrets(
    monkeypatch: pytest.MonkeyPatch, s3_env: object
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = open_store("s3://bucket/runs")
    with pytest.raises(StorageUnavailable) as caught:
        store.list("checkpoints/")
    assert SECRET_KEY not in str(caught.value) and caught.value.__cause__ is None


# A manifest as the commit protocol has written it so far: byte for byte what resumes must read and
# a commit must still write (a checkpoint committed by an earlier image resumes on a newer one).
COMMITTED_BEFORE = """{
 "format_version": 1,
 "step": 5,
 "nnodes": 1,
 "world_size": 2,
 "files": [
  {
   "path": "a.pt",
   "size": 3,
   "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
  },
  {
   "path": "global_step5/b.pt",
   "size": 0,
   "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
  }
 ],
 "data_position": {
  "globalStep": 5,
  "epoch": 0
 },
 "created_at": "2026-01-02T03:04:05.678901Z"
}"""


def test_a_commit_writes_the_manifest_byte_for_byte_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finetune_trainer.checkpoint_store as checkpoint_store

    class Then(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Then:
            return cls(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

    monkeypatch.setattr(checkpoint_store, "datetime", Then)
    store = FileStore(tmp_path / "store")
    cs = CheckpointStore(store)
    report = cs.upload_node(5, 0, _saved(tmp_path, 0, 5, {"a.pt": b"abc", "global_step5/b.pt": b""}))
    cs.commit(5, [report], world_size=2, data_position={"globalStep": 5, "epoch": 0})
    assert store.get_bytes(f"{step_dir(5)}/{MANIFEST}") == COMMITTED_BEFORE.encode()


def test_a_checkpoint_committed_before_resumes(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    store.put_bytes(f"{step_dir(5)}/a.pt", b"abc")
    store.put_bytes(f"{step_dir(5)}/global_step5/b.pt", b"")
    store.put_bytes(f"{step_dir(5)}/{MANIFEST}", COMMITTED_BEFORE.encode())
    cs = CheckpointStore(store)
    (manifest,) = cs.resumable()
    assert manifest.step == 5 and manifest.data_position == {"globalStep": 5, "epoch": 0}
    assert cs.download(manifest, tmp_path / "restore") == 3
    assert (tmp_path / "restore" / "a.pt").read_bytes() == b"abc"
    assert (tmp_path / "restore" / MANIFEST).read_text() == COMMITTED_BEFORE


# -- resume traffic: a node fetches what its ranks load ----------------------------------------


def _node(node_rank: int, *, local_world: int = 2, nnodes: int = 2) -> Any:
    from finetune_trainer.process_group import Ranks

    return Ranks(rank=node_rank * local_world, local_rank=0, world_size=nnodes * local_world,
                 local_world_size=local_world, node_rank=node_rank)  # fmt: skip


FILES = [
    "mp_rank_00_model_states.pt",
    "zero_to_fp32.py",
    *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)),
    *(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)),
    *(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(4)),
]


def test_a_node_fetches_its_ranks_shards_and_every_shared_file() -> None:
    from finetune_trainer.resuming import node_files

    wanted = node_files(_node(1), saved_world_size=4, reads_all=False)
    assert wanted is not None
    assert [f for f in FILES if wanted(f)] == [
        "mp_rank_00_model_states.pt",
        "zero_to_fp32.py",
        "zero_pp_rank_2_mp_rank_00_optim_states.pt",
        "zero_pp_rank_3_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt",
        "zero_pp_rank_2_mp_rank_00_model_states.pt",
        "zero_pp_rank_3_mp_rank_00_model_states.pt",
    ]


def test_a_changed_world_size_fetches_everything() -> None:
    from finetune_trainer.resuming import node_files

    assert node_files(_node(0), saved_world_size=8, reads_all=False) is None


def test_elastic_or_universal_loading_fetches_everything() -> None:
    from finetune_trainer.resuming import node_files

    assert node_files(_node(0), saved_world_size=4, reads_all=True) is None


def test_a_filtered_download_fetches_and_verifies_only_the_wanted_files(tmp_path: Path) -> None:
    store = CheckpointStore(FileStore(tmp_path / "store"))
    local = tmp_path / "saved"
    local.mkdir()
    for name, size in (("shared.pt", 10), ("zero_pp_rank_0_x.pt", 5), ("zero_pp_rank_1_x.pt", 7)):
        (local / name).write_bytes(b"x" * size)
    report = store.upload_node(5, 0, local)
    manifest = store.commit(5, [report], world_size=2, data_position={})
    fetched = store.download(manifest, tmp_path / "dest", lambda path: "rank_1" not in path)
    assert fetched == 15
    fetched_names = sorted(p.name for p in (tmp_path / "dest").iterdir())
    assert fetched_names == ["MANIFEST.json", "shared.pt", "zero_pp_rank_0_x.pt"]


# -- checkpoint addresses: written by step_dir, read back by parse_checkpoint_uri ----------------


@pytest.mark.parametrize("step", [0, 7, 123456789])
def test_a_checkpoint_address_reads_back_as_its_job_and_step(step: int) -> None:
    from finetune_trainer.checkpoint_store import parse_checkpoint_uri

    uri = f"s3://bucket/runs/team-a/job/{step_dir(step)}"
    assert parse_checkpoint_uri(uri) == ("s3://bucket/runs/team-a/job", step)
    assert parse_checkpoint_uri(uri + "/") == ("s3://bucket/runs/team-a/job", step)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/runs/team-a/job",
        "s3://bucket/runs/team-a/job/checkpoints/step-",
        "s3://bucket/runs/team-a/job/checkpoints/step-12x",
        "s3://bucket/runs/team-a/job/checkpoints/step-00000010/MANIFEST.json",
        "file:///checkpoints/step-00000010",
    ],
)
def test_anything_else_is_not_a_checkpoint_address(uri: str) -> None:
    from finetune_trainer.checkpoint_store import parse_checkpoint_uri

    assert parse_checkpoint_uri(uri) is None


def test_the_trainer_opens_exactly_the_storage_schemes_the_api_accepts() -> None:
    from finetune_operator.api.base import STORAGE_SCHEMES
    from finetune_trainer.storage import OPENERS

    assert set(OPENERS) == set(STORAGE_SCHEMES)


def test_every_store_the_trainer_opens_gets_the_jobs_endpoint_and_region() -> None:
    from finetune_trainer.storage import S3Store, opener

    store = opener("http://minio.storage:9000", "eu-west-3")("s3://models/llama")
    assert isinstance(store, S3Store)
    assert store._client.meta.endpoint_url == "http://minio.storage:9000"
    assert store._client.meta.region_name == "eu-west-3"
