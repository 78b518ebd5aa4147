"""Which chat template renders the conversations: the tokenizer's own, or `dataset.chatTemplate`.

The named templates are this project's own text, written to render exactly what the model families'
published templates render (tests/unit/test_chat_templates_realworld.py compares them on real
conversations). `mistral` adds one thing the Mistral v0.1 / Mixtral templates refuse: a system prompt,
put before the first user message as LLaMA-Factory and axolotl do. The choice is set on the
tokenizer, so it is part of the tokenized cache's key and of the exported tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer.failures import InputMissing, InvalidInput
from finetune_trainer.storage import ObjectNotFound, Opener, open_store

_HEADER = "'<|start_header_id|>' + {role} + '<|end_header_id|>\\n\\n'"

LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- " + _HEADER.format(role="message['role']") + " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- " + _HEADER.format(role="'assistant'") + " }}{%- endif %}"
)

# Llama 3.1-3.3 Instruct: a dated system header, custom tools given as JSON in the first user
# message, one JSON tool call per assistant turn, tool results as ipython turns.
LLAMA31 = (
    "{{- bos_token }}"
    "{%- set tools = tools if tools is defined else none %}"
    "{%- set date_string = date_string if date_string is defined else '26 Jul 2024' %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- " + _HEADER.format(role="'system'") + " }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- if tools is not none %}"
    "{%- if messages | length == 0 %}"
    "{{- raise_exception('tools need a first user message to be given in') }}{%- endif %}"
    "{{- " + _HEADER.format(role="'user'") + " }}"
    "{{- 'Given the following functions, please respond with a JSON for a function call '"
    " + 'with its proper arguments that best answers the given prompt.\\n\\n'"
    ' + \'Respond in the format {"name": function name, "parameters": dictionary of argument name \''
    " + 'and its value}.Do not use variables.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson(indent=4) + '\\n\\n' }}{%- endfor %}"
    "{{- messages[0]['content'] | trim + '<|eot_id|>' }}{%- set messages = messages[1:] %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] in ('tool', 'ipython') %}"
    "{{- " + _HEADER.format(role="'ipython'") + " }}"
    "{%- if message['content'] is mapping or message['content'] is iterable %}"
    "{{- message['content'] | tojson }}{%- else %}{{- message['content'] }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}"
    "{%- if message['tool_calls'] | length != 1 %}"
    "{{- raise_exception('Llama 3.1 calls one tool per assistant turn') }}{%- endif %}"
    "{%- set call = message['tool_calls'][0]['function'] %}"
    "{{- " + _HEADER.format(role="'assistant'") + " }}"
    "{{- '{\"name\": \"' + call['name'] + '\", \"parameters\": ' + call['arguments'] | tojson + '}' }}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- " + _HEADER.format(role="message['role']") + " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- " + _HEADER.format(role="'assistant'") + " }}{%- endif %}"
)

_ALTERNATE = (
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
)

# Llama 2 Chat: every user turn opens with bos and [INST], the system prompt in <<SYS>> inside the
# first; an assistant turn is its stripped text between spaces, then eos.
LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- for message in messages %}" + _ALTERNATE + ""
    "{%- if message['role'] == 'user' %}"
    "{%- set text = (system if loop.first else '') + message['content'] %}"
    "{{- bos_token + '[INST] ' + text | trim + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Mistral 7B Instruct v0.1 / v0.2 and Mixtral 8x7B Instruct: [INST] turns after one bos.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in messages %}" + _ALTERNATE + ""
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

NAMED = {"llama3": LLAMA3, "llama3.1": LLAMA31, "llama2": LLAMA2, "mistral": MISTRAL, "chatml": CHATML}


class TemplateNotFound(InputMissing):
    """dataset.chatTemplate names a file that is not there (exit 3)."""


class NoChatTemplate(InvalidInput):
    """Chat data, and no template to render it with (exit 2)."""


def choose(config: TrainerConfig, tokenizer: Any, tokenizer_dir: str,
           open_store: Opener = open_store) -> None:  # fmt: skip
    """Set `dataset.chatTemplate` on the tokenizer; refuse chat data with no template at all."""
    choice = config.dataset.chat_template
    if choice is not None:
        tokenizer.chat_template = _text(choice, tokenizer_dir, open_store)
    needs = [
        i for i, s in enumerate(config.dataset.sources)
        if s.shape == "chat" or (s.shape in ("promptCompletion", "alpaca") and s.prompt_format == "chat")
    ]  # fmt: skip
    if needs and not tokenizer.chat_template:
        raise NoChatTemplate(
            f"dataset.chatTemplate: dataset.sources[{needs[0]}] is chat data, and the tokenizer has no "
            "chat template (a base model's has none); set dataset.chatTemplate.name to one of "
            f"{', '.join(NAMED)}, or give .jinja, .modelFile or .uri"
        )


def _text(choice: Any, tokenizer_dir: str, open_store: Opener) -> str:
    if choice.name is not None:
        return NAMED[choice.name]
    if choice.jinja is not None:
        return str(choice.jinja)
    if choice.model_file is not None:
        path = Path(tokenizer_dir) / choice.model_file
        if not path.is_file():
            raise TemplateNotFound(
                f"dataset.chatTemplate.modelFile: {choice.model_file} is not in the model's folder"
            )
        return path.read_text(encoding="utf-8")
    parent, _, name = str(choice.uri).rstrip("/").rpartition("/")
    try:
        return open_store(parent).get_bytes(name).decode("utf-8")
    except ObjectNotFound:
        raise TemplateNotFound(f"dataset.chatTemplate.uri: {choice.uri} not found") from None
