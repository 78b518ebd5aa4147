"""The demo datasets users start from (LLaMA-Factory's, OpenAI's), read from ../shared/realworld as
they ship: every one loads with its shape and no override, every record kept, and the tool and
reasoning records keep their calls and their thinking. (The ranking file, dpo_en_demo.json, is
read as preference pairs in test_preference_data.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.spec import DatasetSpec
from finetune_trainer.records import DataReport, Record, fetch_source, iter_records

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "realworld" / "datasets"
pytestmark = pytest.mark.skipif(not DATASETS.is_dir(), reason=f"{DATASETS} is not beside this checkout")


def _load(tmp_path: Path, name: str, reasoning: str = "train", **source: Any
          ) -> tuple[list[Record], dict[str, Any]]:  # fmt: skip
    spec = DatasetSpec.model_validate(
        {"sources": [{"uri": f"file://{DATASETS / name}", "name": "s", **source}], "reasoning": reasoning}
    )
    report = DataReport()
    records = list(iter_records(spec, 0, fetch_source(spec.sources[0], tmp_path), report, lambda d: False))
    return records, report.as_dict()["s"]


@pytest.mark.parametrize(
    ("name", "shape", "count"),
    [
        ("alpaca_en_demo.json", "alpaca", 200),  # a JSON array
        ("glaive_toolcall_en_demo.json", "chat", 200),  # ShareGPT with function_call/observation, tools
        ("v1_sft_demo.jsonl", "chat", 200),  # typed content blocks
        ("reason_tool_use_demo_50.jsonl", "chat", 50),  # reasoning + tool_call blocks, tool turns
        ("openai_toy_chat_fine_tuning.jsonl", "chat", 4),
        ("openai_drone_training.first.jsonl", "chat", 1),  # OpenAI tool_calls and tools
    ],
)
def test_every_demo_dataset_loads_whole_with_its_shape_and_no_overrides(
    tmp_path: Path, name: str, shape: str, count: int
) -> None:
    _, counts = _load(tmp_path, name, shape=shape)
    assert counts["read"] == count
    assert counts["malformed"] == 0, counts
    assert counts["kept"] + counts["duplicates"] == count


def test_sharegpt_function_calls_become_tool_calls_and_observations_tool_results(tmp_path: Path) -> None:
    records, _ = _load(tmp_path, "glaive_toolcall_en_demo.json", shape="chat")
    with_call = next(r for r in records if any(m.get("tool_calls") for m in r.fields["messages"]))
    roles = [m["role"] for m in with_call.fields["messages"]]
    assert "tool" in roles and set(roles) <= {"system", "user", "assistant", "tool"}
    call = next(m for m in with_call.fields["messages"] if m.get("tool_calls"))["tool_calls"][0]
    assert isinstance(call["function"]["arguments"], dict) and call["function"]["name"]
    tools = with_call.fields["tools"]
    assert tools and all(t["type"] == "function" and t["function"]["name"] for t in tools)


def test_reasoning_blocks_are_kept_before_the_answer_unless_dropped(tmp_path: Path) -> None:
    records, _ = _load(tmp_path, "reason_tool_use_demo_50.jsonl", shape="chat")
    answers = [m["content"] for r in records for m in r.fields["messages"] if m["role"] == "assistant"]
    assert any(a.startswith("<think>\n") and "</think>" in a for a in answers)
    dropped, _ = _load(tmp_path, "reason_tool_use_demo_50.jsonl", shape="chat", reasoning="drop")
    assert not any("<think>" in m["content"] for r in dropped for m in r.fields["messages"])


def test_typed_text_blocks_are_joined_into_plain_content(tmp_path: Path) -> None:
    records, _ = _load(tmp_path, "v1_sft_demo.jsonl", shape="chat")
    first = json.loads((DATASETS / "v1_sft_demo.jsonl").open().readline())
    assert records[0].fields["messages"][0]["content"] == first["messages"][0]["content"][0]["value"]
