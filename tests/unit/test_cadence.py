"""After each optimizer step, every rank decides the same: log, evaluate, checkpoint, stop."""

from __future__ import annotations

import pytest
from finetune_trainer.cadence import Cadence, Decisions


def _cadence(**changes: object) -> Cadence:
    base: dict[str, object] = dict(total_steps=20, log_every=5, eval_every=None, checkpoint_every=4,
                                   has_validation=True)  # fmt: skip
    return Cadence(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("done", "stop", "time_due", "expected"),
    [
        (1, False, False, Decisions(log=False, evaluate=False, checkpoint=False, stop=False)),
        (4, False, False, Decisions(log=False, evaluate=True, checkpoint=True, stop=False)),
        (5, False, False, Decisions(log=True, evaluate=False, checkpoint=False, stop=False)),
        (7, False, True, Decisions(log=False, evaluate=True, checkpoint=True, stop=False)),
        (6, True, False, Decisions(log=False, evaluate=True, checkpoint=False, stop=True)),
        (20, False, False, Decisions(log=True, evaluate=True, checkpoint=False, stop=False)),
        (20, True, False, Decisions(log=True, evaluate=True, checkpoint=False, stop=True)),
    ],
    ids=["nothing", "every-steps", "log", "every-minutes", "sigterm", "final-step", "sigterm-on-final-step"],
)
def test_decisions_after_a_step(done: int, stop: bool, time_due: bool, expected: Decisions) -> None:
    assert _cadence().after(done, stop=stop, time_due=time_due) == expected


def test_the_final_step_is_always_logged() -> None:
    assert _cadence(total_steps=7, log_every=5).after(7, stop=False, time_due=False).log


def test_eval_every_steps_replaces_evaluating_at_checkpoints() -> None:
    cadence = _cadence(eval_every=3)
    assert cadence.after(3, stop=False, time_due=False).evaluate
    assert not cadence.after(4, stop=False, time_due=False).evaluate


def test_no_validation_split_never_evaluates() -> None:
    assert not _cadence(has_validation=False).after(4, stop=False, time_due=False).evaluate


def test_only_the_time_trigger_when_every_steps_is_off() -> None:
    cadence = _cadence(checkpoint_every=0)
    assert not any(cadence.after(d, stop=False, time_due=False).checkpoint for d in range(1, 20))
    assert cadence.after(9, stop=False, time_due=True).checkpoint
