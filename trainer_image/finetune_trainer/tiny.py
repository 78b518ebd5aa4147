"""Tiny stand-ins built on the spot, never downloaded: a word-level tokenizer with the interface of a
Llama tokenizer, a small randomly initialised Llama, and a learnable dataset. `make demo` and the
tests train on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def tiny_tokenizer(corpus: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainer=trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# A learnable task for demos and tests: continue a counting sequence. A model that learns it drives
# the loss well below its starting value within a few dozen steps, on CPU.
NUMBER_WORDS = [f"n{i}" for i in range(48)]
VERBS = ["count", "continue", "list", "go"]


def counting_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        stride, length = rng.randrange(1, 4), rng.randrange(3, 6)
        start = rng.randrange(0, len(NUMBER_WORDS) - stride * (length + 6))
        words = NUMBER_WORDS[start::stride]
        prompt = "count after " + " ".join(words[:length]) + " :"
        completion = " ".join(words[length : length + 6])
        out.append({"prompt": prompt, "completion": completion})
    return out


def preference_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Counting pairs for DPO: the chosen answer continues the sequence, the rejected one gives the
    same numbers backwards. A tiny model learns to prefer the first within a few dozen steps."""
    return [
        {
            "prompt": r["prompt"],
            "chosen": r["completion"],
            "rejected": " ".join(reversed(r["completion"].split())),
        }
        for r in counting_records(count, seed)
    ]


def write_tiny_model(dest: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised Llama with a word-level tokenizer that covers counting_records."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [" ".join(VERBS) + " after :", " ".join(NUMBER_WORDS), "hello world"]
    tokenizer = tiny_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune_trainer.tiny DIR`: the tiny model and dataset examples/tiny-cpu.yaml reads
    (DIR/tiny-llama, DIR/data/train.jsonl); what exists is kept."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--records", type=int, default=1024)
    args = parser.parse_args(argv)
    model, data = args.directory / "tiny-llama", args.directory / "data" / "train.jsonl"
    if not (model / "config.json").exists():
        write_tiny_model(model)
    if not data.exists():
        write_jsonl(data, counting_records(args.records))
    print(f"tiny model: {model}\ndataset:    {data} ({args.records} records)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
