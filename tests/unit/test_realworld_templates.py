"""Labels under the chat templates models ship, with the real Llama 2 and Llama 3 tokenizers, read
from ../shared/realworld (skipped, with that reason, on a clone without it).

For every template and conversation shape (several turns; with and without a system prompt; a tool
call and its result) the learned tokens must be exactly each assistant answer (or call) and the
end-of-turn marker after it, in order: role headers, system, user and tool turns never. A template
that cannot render a shape (Llama 2 has no tool turns) must refuse the record with a reason, never
train it wrongly. The project's named templates must render byte for byte as the real ones do.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.chat_labels import IGNORE_INDEX, chat_labels
from finetune_trainer.chat_templates import NAMED
from finetune_trainer.messages import Refused

REALWORLD = Path(__file__).resolve().parents[3] / "shared" / "realworld"
pytestmark = pytest.mark.skipif(not REALWORLD.is_dir(), reason=f"{REALWORLD} is not beside this checkout")

# Which real tokenizer each template's model uses (Mistral's and Vicuna's vocabularies are Llama 2's
# SentencePiece family; DeepSeek-R1-Distill-Llama's is Llama 3's).
LLAMA2_FAMILY = ("llama-2", "mistral", "mixtral", "vicuna", "zephyr")
TOOL_TEMPLATES = ("llama-3.1-instruct", "llama-3.2-instruct", "qwen2.5-instruct", "mistral-7b-instruct-v0.3")


def _template_text(path: Path) -> str:
    text = path.read_text()
    if "chujiezheng" in path.name:  # stored indented: its README says to strip indents and newlines
        text = "".join(line.strip() for line in text.splitlines())
    return text


TEMPLATES = sorted(p.name for p in (REALWORLD / "templates").glob("*.jinja")) if REALWORLD.is_dir() else []


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    return {}  # tokenizers are loaded once per template by _prepared


def _family(template_name: str) -> str:
    return "llama2" if template_name.startswith(LLAMA2_FAMILY) else "llama3"


@functools.cache
def _prepared(family: str) -> Any:
    """The model family's real tokenizer (loaded once: the Llama 3 one takes seconds), given its
    templates' own special tokens as their models' tokenizers have them (`<|eot_id|>` is in Llama 3's;
    `<|im_end|>` in ChatML models'). A token one template adds is text no other template renders."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REALWORLD / "tokenizers" / f"{family}-base")
    bars = "|\uff5c"  # DeepSeek's specials use the fullwidth bar
    special = re.compile(f"<[{bars}][^<>'\"]{{1,40}}[{bars}]>")
    texts = [_template_text(REALWORLD / "templates" / name) for name in TEMPLATES if _family(name) == family]
    found = {token for text in texts for token in special.findall(text)}
    new = sorted(t for t in found if t not in tokenizer.get_vocab())
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return tokenizer


def _tokenizer_for(tokenizers: dict[str, Any], template_name: str) -> Any:
    tokenizer = _prepared(_family(template_name))
    tokenizer.chat_template = _template_text(REALWORLD / "templates" / template_name)  # a test may swap it
    return tokenizer


def _learned(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The learned tokens as runs of consecutive labels, decoded."""
    runs: list[list[int]] = []
    for i, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label == IGNORE_INDEX:
            continue
        if not runs or labels[i - 1] == IGNORE_INDEX:
            runs.append([])
        runs[-1].append(token)
    return [tokenizer.decode(run).strip() for run in runs]


SYSTEM = {"role": "system", "content": "You answer in one sentence."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "It is Rome."},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
CALL = {"id": "call00001", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}  # fmt: skip
TOOL_TURNS = [
    {"role": "user", "content": "How is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call00001"},
    {"role": "assistant", "content": "It is sunny in Paris."},
]


def _answers_with_their_end(learned: list[str], answers: list[str]) -> None:
    assert len(learned) == len(answers), learned
    for run, answer in zip(learned, answers, strict=True):
        assert run.startswith(answer), (run, answer)
        rest = run[len(answer) :].strip()
        assert rest and len(rest) <= 25 and " " not in rest, f"an end of turn after {answer!r}: {run!r}"


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
def test_every_real_template_learns_exactly_the_answers_and_their_end_of_turn(
    tokenizers: dict[str, Any], template: str, with_system: bool
) -> None:
    tokenizer = _tokenizer_for(tokenizers, template)
    messages = [SYSTEM, *TURNS] if with_system else TURNS
    ids, labels, rendered = chat_labels(tokenizer, {"messages": messages})
    learned = _learned(tokenizer, ids, labels)
    _answers_with_their_end(learned, ["The capital of France is Paris.", "It is Rome."])
    learned_text = " ".join(learned)
    for prompt in ("capital of France?", "And of Italy", "one sentence", "assistant", "user"):
        assert prompt not in learned_text
    if with_system:
        assert "You answer in one sentence." in rendered.text  # moved or merged, never lost


@pytest.mark.parametrize("template", TEMPLATES)
def test_a_tool_call_is_learned_where_the_template_renders_tools_and_refused_where_it_cannot(
    tokenizers: dict[str, Any], template: str
) -> None:
    tokenizer = _tokenizer_for(tokenizers, template)
    record = {"messages": TOOL_TURNS, "tools": TOOLS}
    if not template.startswith(TOOL_TEMPLATES):
        with pytest.raises(Refused):
            chat_labels(tokenizer, record)
        return
    ids, labels, rendered = chat_labels(tokenizer, record)
    call, answer = _learned(tokenizer, ids, labels)
    assert "get_weather" in call and "Paris" in call
    assert answer.startswith("It is sunny in Paris.")
    assert "sunny, 21 C" in rendered.text and "sunny, 21 C" not in call + answer  # the result is context
    assert "Weather of a city" in rendered.text  # the tools column reached the template


def test_reasoning_the_template_would_drop_is_still_learned(tokenizers: dict[str, Any]) -> None:
    tokenizer = _tokenizer_for(tokenizers, "deepseek-r1-distill-llama-8b.jinja")
    answer = "<think>\nFrance's capital is Paris.\n</think>\n\nParis."
    messages = [TURNS[0], {"role": "assistant", "content": answer}]
    assert "France's capital" not in tokenizer.apply_chat_template(messages, tokenize=False)  # it drops it
    ids, labels, rendered = chat_labels(tokenizer, {"messages": messages})
    (learned,) = _learned(tokenizer, ids, labels)
    assert learned.startswith(answer.strip()) and rendered.rewritten


@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize(
    ("name", "real"),
    [
        ("llama3", "llama-3-instruct.jinja"),
        ("llama3.1", "llama-3.1-instruct.jinja"),
        ("llama2", "llama-2-chat.jinja"),
        ("mistral", "mixtral-8x7b-instruct-v0.1.jinja"),
        ("chatml", "chatml.jinja"),
    ],
)
@pytest.mark.parametrize("generation", [False, True], ids=["", "generation-prompt"])
def test_a_named_template_renders_byte_for_byte_as_the_real_one(
    tokenizers: dict[str, Any], name: str, real: str, with_system: bool, generation: bool
) -> None:
    tokenizer = _tokenizer_for(tokenizers, real)
    messages = [SYSTEM, *TURNS] if with_system else TURNS
    if generation:
        messages = messages[:-1]
    if name == "mistral" and with_system:
        pytest.skip("the real Mixtral template refuses a system prompt; ours puts it before the first turn")
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    tokenizer.chat_template = NAMED[name]
    ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    assert ours == expected


def test_the_llama31_named_template_renders_tools_as_the_real_one(tokenizers: dict[str, Any]) -> None:
    tokenizer = _tokenizer_for(tokenizers, "llama-3.1-instruct.jinja")
    messages = [SYSTEM, *TOOL_TURNS]
    expected = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    tokenizer.chat_template = NAMED["llama3.1"]
    assert tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False) == expected
