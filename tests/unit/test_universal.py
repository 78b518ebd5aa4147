"""A checkpoint's universal conversion in the store: when one is needed, which one may be used, and
that it never passes for a checkpoint of its own. The conversion itself (DeepSpeed's) runs in
tests/integration/test_resume_other_world_size.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from finetune_trainer.checkpoint_store import CheckpointManifest, CheckpointStore
from finetune_trainer.committed_dir import FileEntry, upload_tree
from finetune_trainer.storage import open_store
from finetune_trainer.universal import (
    Reshaper,
    UniversalManifest,
    WorldSizeChangeRefused,
    check_global_batch,
    manifest_sha256,
    needs_conversion,
    universal_dir,
)

SHARDS = ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def _manifest(
    step: int = 8, world_size: int = 2, files: list[str] = SHARDS, batch: int = 16
) -> CheckpointManifest:
    return CheckpointManifest(
        step=step, nnodes=1, world_size=world_size,
        files=[FileEntry(path=p, size=1, sha256="0" * 64) for p in [*files, "mp_rank_00_model_states.pt"]],
        data_position={"globalStep": step, "epoch": 0, "stepInEpoch": step, "samplesSeen": step * batch},
        created_at=datetime.now(UTC),
    )  # fmt: skip


def _store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(open_store(f"file://{tmp_path}/store/team-a/tiny"))


def _publish(store: CheckpointStore, tmp_path: Path, step: int, source_sha256: str) -> UniversalManifest:
    local = tmp_path / "converted"
    (local / "zero" / "lm_head.weight").mkdir(parents=True, exist_ok=True)
    (local / "zero" / "lm_head.weight" / "fp32.pt").write_bytes(b"tensor")
    files = upload_tree(store.store, local, universal_dir(step))
    manifest = UniversalManifest(step=step, source_world_size=2, source_manifest_sha256=source_sha256,
                                 files=files, convert_seconds=0.1, created_at=datetime.now(UTC))  # fmt: skip
    store.store.put_bytes(f"{universal_dir(step)}/MANIFEST.json", manifest.model_dump_json().encode())
    return manifest


def _reshaper(store: CheckpointStore, tmp_path: Path) -> Reshaper:
    return Reshaper(None, store, None, None, tmp_path / "scratch")  # type: ignore[arg-type]


def test_a_zero_checkpoint_of_another_world_size_needs_conversion() -> None:
    assert needs_conversion(_manifest(world_size=2), world_size=1)
    assert needs_conversion(
        _manifest(world_size=2, files=["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]), 4
    )


def test_a_checkpoint_of_the_same_world_size_loads_as_saved() -> None:
    assert not needs_conversion(_manifest(world_size=2), world_size=2)


def test_a_checkpoint_without_zero_shards_loads_at_any_world_size() -> None:
    assert not needs_conversion(_manifest(world_size=2, files=[]), world_size=1)


def test_a_resume_with_another_global_batch_is_refused_naming_the_field() -> None:
    with pytest.raises(WorldSizeChangeRefused, match=r"set training.globalBatchSize to 16"):
        check_global_batch(_manifest(batch=16), global_batch=8)
    check_global_batch(_manifest(batch=16), global_batch=16)


def test_a_conversion_does_not_commit_the_checkpoint_it_sits_in(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _publish(store, tmp_path, 8, "a" * 64)
    assert store.committed_steps() == []


def test_the_committed_conversion_of_the_same_commit_is_reused(tmp_path: Path) -> None:
    store, checkpoint = _store(tmp_path), _manifest()
    published = _publish(store, tmp_path, 8, manifest_sha256(checkpoint))
    assert _reshaper(store, tmp_path).committed(8, manifest_sha256(checkpoint)) == published


def test_a_conversion_of_an_earlier_commit_of_the_step_is_not_used(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _publish(store, tmp_path, 8, "a" * 64)
    assert _reshaper(store, tmp_path).committed(8, manifest_sha256(_manifest())) is None


def test_a_conversion_without_its_manifest_is_not_used(tmp_path: Path) -> None:
    store, checkpoint = _store(tmp_path), _manifest()
    _publish(store, tmp_path, 8, manifest_sha256(checkpoint))
    store.store.delete([f"{universal_dir(8)}/MANIFEST.json"])
    assert _reshaper(store, tmp_path).committed(8, manifest_sha256(checkpoint)) is None


def test_a_conversion_missing_a_file_is_not_used(tmp_path: Path) -> None:
    store, checkpoint = _store(tmp_path), _manifest()
    _publish(store, tmp_path, 8, manifest_sha256(checkpoint))
    store.store.delete([f"{universal_dir(8)}/zero/lm_head.weight/fp32.pt"])
    assert _reshaper(store, tmp_path).committed(8, manifest_sha256(checkpoint)) is None
