"""Packing whole examples into windows without letting them see each other.

Concatenating examples into full windows (what packing used to be) lets every example attend to the
ones before it, runs positions on across them and cuts examples at window edges, losing a prompt.
Here examples are bins' items: first-fit decreasing puts whole examples into windows of
`maxSeqLength` (an example is never split; one longer than the window was already truncated or
dropped by `dataset.overlength`), and each packed example remembers its parts' lengths, from which
collate gives position ids that restart per part. The attention implementations then keep each part
to itself (encoding.collate says which honour what).

The bins are a pure function of the examples' lengths and order (which the seed fixes), so the packed
split, and with it the batch schedule's data position, is the same on every rank and every attempt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from finetune_trainer.encoding import IGNORE_INDEX, Example


class RandomAccess(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Example: ...


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`: longest first, each into the
    leftmost bin it fits. A max segment tree over the bins' free space finds that bin in O(log n),
    so millions of examples pack in seconds. Ties are broken by index, so the result is
    deterministic; each bin lists its items in data order."""
    count = len(lengths)
    if any(length > capacity for length in lengths):
        raise ValueError(f"an example is longer than the window ({capacity} tokens)")
    size = 1
    while size < max(count, 1):
        size *= 2
    free = [capacity] * (2 * size)  # every bin starts empty; the leftmost empty one is the next new one
    bins: list[list[int]] = []
    for index in sorted(range(count), key=lambda i: (-lengths[i], i)):
        length, node = lengths[index], 1
        while node < size:  # descend to the leftmost leaf with room
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        leaf = node - size
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(index)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return [sorted(b) for b in bins]


def packed(parts: Sequence[Example]) -> Example:
    """One window of whole examples. Each part's first label is masked: alone it is never a target
    (the causal-LM loss shifts labels), and packed it would teach the previous part's last token to
    predict the next example."""
    ids: list[int] = []
    labels: list[int] = []
    for part in parts:
        ids += part.input_ids
        labels += [IGNORE_INDEX, *part.labels[1:]]
    segments = tuple(len(p.input_ids) for p in parts) if len(parts) > 1 else ()
    return Example(id="+".join(p.id for p in parts), input_ids=ids, labels=labels, segments=segments)


def iter_pack(examples: RandomAccess, lengths: Sequence[int], capacity: int) -> Iterator[Example]:
    """`examples` packed into windows of `capacity`, streamed: only one window is held at a time."""
    for members in first_fit_decreasing(lengths, capacity):
        yield packed([examples[i] for i in members])


def padding_share(lengths: Sequence[int] | Any, sequences: int, window: int) -> float:
    """The share of padding when `sequences` rows holding `lengths` tokens are padded to the window."""
    return 1.0 - float(sum(lengths)) / (sequences * window) if sequences else 0.0
