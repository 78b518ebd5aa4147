"""The checkpoint's blocking part is a host-memory snapshot that training can no longer change; the
files are written from it later, whole or not at all."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from finetune_trainer.snapshot import SnapshotEngine, to_host, write


def _state() -> dict[str, object]:
    weights = torch.arange(6, dtype=torch.float32)
    return {
        "module": OrderedDict(w=weights[:3], b=weights[3:]),  # views of one buffer, like ZeRO's flat groups
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "global_steps": 7,
        "ds_version": "0.19.8",
    }


def test_a_snapshot_does_not_change_when_training_changes_the_state() -> None:
    state = _state()
    snapshot = to_host(state)
    state["module"]["w"].add_(100)  # type: ignore[index]
    state["optimizer"]["state"][0]["exp_avg"].mul_(0)  # type: ignore[index]
    state["optimizer"]["param_groups"][0]["lr"] = 0.5  # type: ignore[index]
    assert snapshot["module"]["w"].tolist() == [0.0, 1.0, 2.0]
    assert snapshot["optimizer"]["state"][0]["exp_avg"].tolist() == [1.0, 1.0, 1.0]
    assert snapshot["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_a_snapshot_keeps_container_types_and_plain_values() -> None:
    snapshot = to_host(_state())
    assert isinstance(snapshot["module"], OrderedDict) and list(snapshot["module"]) == ["w", "b"]
    assert snapshot["global_steps"] == 7 and snapshot["ds_version"] == "0.19.8"


def test_the_engine_writes_nothing_while_training_waits(tmp_path: Path) -> None:
    engine = SnapshotEngine()
    engine.save(_state(), str(tmp_path / "mp_rank_00_model_states.pt"))
    assert not any(tmp_path.iterdir())
    assert engine.bytes_held() == (6 + 3) * 4


def test_the_engine_hands_its_snapshots_over_once(tmp_path: Path) -> None:
    engine = SnapshotEngine()
    engine.save(_state(), str(tmp_path / "a.pt"))
    assert [path for path, _ in engine.take()] == [str(tmp_path / "a.pt")]
    assert engine.take() == [] and engine.bytes_held() == 0


def test_written_files_load_as_the_state_that_was_snapshotted(tmp_path: Path) -> None:
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    write(str(path), to_host(_state()))
    loaded = SnapshotEngine().load(str(path), map_location="cpu")  # DeepSpeed's own load
    assert loaded["module"]["b"].tolist() == [3.0, 4.0, 5.0] and loaded["global_steps"] == 7


def test_a_write_that_fails_leaves_no_file_under_the_final_name(tmp_path: Path) -> None:
    path = tmp_path / "mp_rank_00_model_states.pt"
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for an unpicklable object
        write(str(path), {"bad": lambda: None})
    assert not path.exists()
