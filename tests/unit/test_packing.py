"""Packing whole examples into windows (packing.py) and keeping them apart in attention."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from finetune_trainer.encoding import IGNORE_INDEX, Example, collate, model_inputs
from finetune_trainer.packing import first_fit_decreasing, iter_pack, packed, padding_share
from transformers import LlamaConfig, LlamaForCausalLM


def _lengths(count: int, capacity: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [
        rng.randint(1, capacity) if rng.random() < 0.2 else rng.randint(1, capacity // 4)
        for _ in range(count)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_bins_hold_every_example_whole_once_and_never_overflow(seed: int) -> None:
    lengths = _lengths(500, 64, seed)
    bins = first_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing_opens_a_bin_only_when_nothing_open_fits(seed: int) -> None:
    """Its defining property, and why it packs tighter than concatenating in data order."""
    lengths = _lengths(300, 64, seed)
    bins = first_fit_decreasing(lengths, 64)
    free = [64 - sum(lengths[i] for i in b) for b in bins]
    for later, members in enumerate(bins):
        smallest = min(lengths[i] for i in members)
        # every item of a later bin was placed after the earlier bins were opened, and items go
        # largest first: the smallest item of bin `later` fits in no earlier bin's final free space
        assert all(f < smallest for f in free[:later])
    assert len(bins) <= -(-sum(lengths) // 64) * 11 // 9 + 1  # FFD's 11/9 OPT + 6/9 bound, loosely


def test_packing_is_the_same_every_time() -> None:
    lengths = _lengths(200, 32, 3)
    assert first_fit_decreasing(lengths, 32) == first_fit_decreasing(list(lengths), 32)


def test_an_example_longer_than_the_window_is_refused_not_split() -> None:
    with pytest.raises(ValueError, match="longer than the window"):
        first_fit_decreasing([3, 9], 8)


def test_a_packed_window_keeps_each_part_whole_and_masks_its_first_label() -> None:
    parts = [Example("s:0", [1, 2, 3], [1, 2, 3]), Example("s:1", [4, 5], [IGNORE_INDEX, 5])]
    window = packed(parts)
    assert window.id == "s:0+s:1" and window.input_ids == [1, 2, 3, 4, 5] and window.segments == (3, 2)
    assert window.labels == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]
    assert window.position_ids == [0, 1, 2, 0, 1]


def test_every_token_of_the_data_is_in_exactly_one_window() -> None:
    examples = [Example(f"s:{i}", [i] * n, [i] * n) for i, n in enumerate(_lengths(60, 16, 1))]
    windows = list(iter_pack(examples, [len(e.input_ids) for e in examples], 16))
    assert sorted(t for w in windows for t in w.input_ids) == sorted(t for e in examples for t in e.input_ids)
    assert sorted(p for w in windows for p in w.id.split("+")) == sorted(e.id for e in examples)
    shares = padding_share([len(w.input_ids) for w in windows], len(windows), 16)
    assert shares < padding_share([len(e.input_ids) for e in examples], len(examples), 16)


@pytest.fixture(scope="module")
def llama() -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _alone(model: Any, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**model_inputs(collate([example], 0, 64)))
    return out.logits[0], out.loss * (torch.tensor(example.labels[1:]) != IGNORE_INDEX).sum()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
def test_each_example_inside_a_packed_batch_gets_its_logits_and_loss_alone(
    llama: Any, implementation: str, flatten: bool
) -> None:
    """No cross-contamination: sdpa and eager (the CPU kernels) honour packed position ids with
    the block-diagonal mask transformers builds from them (masking_utils.find_packed_sequence_indices)."""
    llama.set_attn_implementation(implementation)
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (7, 3, 11, 5)]
    examples = [Example(f"s:{i}", ids, [IGNORE_INDEX] * 2 + ids[2:]) for i, ids in enumerate(parts)]
    windows = [packed(examples[:3]), packed(examples[3:])]  # the second row is padded
    batch = model_inputs(collate(windows, 0, 64, packed=True, flatten=flatten))
    with torch.no_grad():
        out = llama(**batch, num_items_in_batch=1)  # the summed cross-entropy
        alone = [_alone(llama, e) for e in examples]
    rows = [out.logits[0]] if flatten else list(out.logits)
    place = [(0, 0), (0, 7), (0, 10), (0, 21) if flatten else (1, 0)]
    for (row, start), example, (logits, _) in zip(place, examples, alone, strict=True):
        got = rows[row][start : start + len(example.input_ids)]
        torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, sum(loss for _, loss in alone), rtol=1e-4, atol=1e-4)
