"""Real files through the whole data pipeline (plan, clean, encode), with the real tokenizers as
users' model folders hold them, read from ../shared/realworld (skipped, with that reason, without it)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer.chat_templates import choose
from finetune_trainer.encoding import IGNORE_INDEX
from finetune_trainer.model import ModelNotFound, TokenizerUnusable, load_tokenizer
from finetune_trainer.prepared_data import build

from tests.support.factories import job

REALWORLD = Path(__file__).resolve().parents[3] / "shared" / "realworld"
pytestmark = pytest.mark.skipif(not REALWORLD.is_dir(), reason=f"{REALWORLD} is not beside this checkout")


def _config(sources: list[dict[str, Any]], **dataset: Any) -> Any:
    changes = {"spec.dataset.sources": sources, "spec.dataset.validationFraction": 0, **{
        f"spec.dataset.{k}": v for k, v in dataset.items()}}  # fmt: skip
    return resolve_trainer_config(job(changes))


def _folder(tmp_path: Path, family: str, *names: str) -> Path:
    out = tmp_path / family
    out.mkdir()
    for name in names:
        shutil.copy(REALWORLD / "tokenizers" / f"{family}-base" / name, out / name)
    return out


def test_a_sentencepiece_model_alone_loads_as_the_llama2_tokenizer(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "llama2", "tokenizer.model")
    tokenizer = load_tokenizer(_config([{"uri": "file:///d.jsonl"}]), str(folder))
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [15043, 3186]


def test_a_tiktoken_model_with_its_config_loads_as_the_llama3_tokenizer(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "llama3", "tokenizer.model", "tokenizer_config.json")
    tokenizer = load_tokenizer(_config([{"uri": "file:///d.jsonl"}]), str(folder))
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]
    assert tokenizer.eos_token == "<|end_of_text|>"


def test_a_tokenizer_without_an_end_of_sequence_token_is_refused_naming_the_fix(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "llama3", "tokenizer.model")  # no tokenizer_config.json
    with pytest.raises(TokenizerUnusable, match=r"model\.source: .*eos_token"):
        load_tokenizer(_config([{"uri": "file:///d.jsonl"}]), str(folder))


def test_a_folder_without_a_tokenizer_is_input_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match=r"model\.source"):
        load_tokenizer(_config([{"uri": "file:///d.jsonl"}]), str(tmp_path / "empty"))


def _learned(example: Any) -> list[int]:
    return [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]


@pytest.fixture(scope="module")
def llama3() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REALWORLD / "tokenizers" / "llama3-base")
    return tokenizer


def test_alpaca_json_on_an_instruct_template_trains_each_output_and_its_end_of_turn(llama3: Any) -> None:
    data = REALWORLD / "datasets" / "alpaca_en_demo.json"
    config = _config([{"uri": f"file://{data}", "shape": "alpaca"}], chatTemplate={"name": "llama3"})
    llama3.chat_template = None  # a base tokenizer: the template comes from the manifest
    choose(config, llama3, str(REALWORLD))
    train, _, report = build(config, {0: [data]}, llama3)
    assert report["sources"]["source0"]["kept"] == 200 and len(train) == 200
    eot = llama3.convert_tokens_to_ids("<|eot_id|>")
    for example in train[:20]:
        learned = _learned(example)
        assert learned[-1] == eot  # the chat's end of turn, not <|end_of_text|>
        assert "<|start_header_id|>" not in llama3.decode(learned)


def test_glaive_tool_calls_train_under_llama31_with_their_tools(llama3: Any) -> None:
    data = REALWORLD / "datasets" / "glaive_toolcall_en_demo.json"
    config = _config([{"uri": f"file://{data}", "shape": "chat"}], chatTemplate={"name": "llama3.1"},
                     maxSeqLength=4096)  # fmt: skip
    choose(config, llama3, str(REALWORLD))
    train, _, report = build(config, {0: [data]}, llama3)
    assert report["encoding"]["unencodable"] <= 0.1 * 200, report["encoding"]["lost"]
    texts = [llama3.decode(_learned(e)) for e in train]
    assert any('{"name": "' in text and '"parameters": ' in text for text in texts)  # calls are learned
    assert not any("Given the following functions" in text for text in texts)  # the tools are context
