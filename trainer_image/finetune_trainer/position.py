"""Where the data stands after a number of optimizer steps, as a checkpoint carries it.

The batch schedule makes the optimizer step alone pin the data position; the rest is written next to it
so that a person reading a manifest sees the epoch and the samples seen without the plan, and
`dataKey` so a resumed run can say the data changed under it. The JSON form is the checkpoint
format (DeepSpeed's client state and MANIFEST.json): its keys, their order and their values never
change, so a checkpoint written by any earlier trainer resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataPosition:
    global_step: int
    epoch: int
    step_in_epoch: int
    samples_seen: int
    data_key: str | None = None  # the tokenized cache's key; left out of the plan's own position

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "globalStep": self.global_step,
            "epoch": self.epoch,
            "stepInEpoch": self.step_in_epoch,
            "samplesSeen": self.samples_seen,
        }
        if self.data_key is not None:
            out["dataKey"] = self.data_key
        return out

    @classmethod
    def from_json(cls, stored: dict[str, Any]) -> DataPosition | None:
        """The position a checkpoint stored; None for a checkpoint that stored none (a fresh start)."""
        if not stored:
            return None
        return cls(
            global_step=int(stored["globalStep"]),
            epoch=int(stored["epoch"]),
            step_in_epoch=int(stored["stepInEpoch"]),
            samples_seen=int(stored["samplesSeen"]),
            data_key=stored.get("dataKey"),
        )
