"""When to log, evaluate, checkpoint and stop after an optimizer step: a pure function of the step
and the two flags the ranks agreed on (a SIGTERM arrived; checkpoint.everyMinutes elapsed), so every
rank takes the same decisions at the same step. Tested like batch_schedule.py, without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api import TrainerConfig


@dataclass(frozen=True)
class Decisions:
    log: bool
    evaluate: bool
    checkpoint: bool  # in the background, training goes on
    stop: bool  # emergency checkpoint, waited for until committed, then exit 143


@dataclass(frozen=True)
class Cadence:
    total_steps: int
    log_every: int
    eval_every: int | None  # None: evaluate at every checkpoint
    checkpoint_every: int  # 0: only the time trigger, the stop and the final checkpoint
    has_validation: bool

    @classmethod
    def of(cls, config: TrainerConfig, total_steps: int, has_validation: bool) -> Cadence:
        return cls(
            total_steps=total_steps,
            log_every=config.training.log_every_steps,
            eval_every=config.training.eval_every_steps,
            checkpoint_every=config.checkpoint.every_steps,
            has_validation=has_validation,
        )

    def after(self, done: int, *, stop: bool, time_due: bool) -> Decisions:
        """Decisions after `done` optimizer steps. The final step's checkpoint is the run's last one,
        taken (and waited for) after the loop, so it is never a background one here."""
        last = done == self.total_steps
        by_steps = self.checkpoint_every > 0 and done % self.checkpoint_every == 0
        checkpoint_point = stop or time_due or by_steps
        evaluate = done % self.eval_every == 0 if self.eval_every else checkpoint_point
        return Decisions(
            log=done % self.log_every == 0 or last,
            evaluate=self.has_validation and evaluate,
            checkpoint=checkpoint_point and not stop and not last,
            stop=stop,
        )
