"""One rank's run: set up and resume (startup.py), train step by step (step_loop.py), then finish:
the final checkpoint, the export and the teardown.

Every decision that all ranks must share (stop for SIGTERM, checkpoint because time is up) is taken
together: after each optimizer step the ranks all-reduce two flags (agreement.py), so no rank ever
waits in a collective the others skipped.
"""

from __future__ import annotations

from finetune_operator.api import TrainerConfig

from finetune_trainer import process_group
from finetune_trainer.agreement import StopFlag
from finetune_trainer.export import export, exported_step
from finetune_trainer.startup import RankContext, Started, set_up
from finetune_trainer.step_loop import StepLoop


class Run:
    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        self.stop = StopFlag()  # first: a SIGTERM during setup is answered at the first step
        self.ctx = RankContext.join(config)
        self._loop: StepLoop | None = None

    @property
    def step(self) -> int:
        """The optimizer steps done so far (0 until the run resumed): failures name it."""
        return self._loop.step if self._loop is not None else 0

    def execute(self) -> None:
        started = set_up(self.ctx)
        self._loop = StepLoop(self.ctx, started, self.stop)
        self._loop.train()
        finish(self.ctx, started)


def finish(ctx: RankContext, run: Started) -> None:
    """After the last step: the final checkpoint, committed; the export, unless a restart finds it
    done; the reporter's last TensorBoard upload; the process group torn down."""
    config, total = ctx.config, run.steps.total_steps
    run.checkpointer.save_last(total, run.steps.position(total, run.data.key))
    output = ctx.open(config.output_uri)
    # Rank 0 decides for all: a rank that looked later could see the new export's manifest and
    # skip the gather (a collective under ZeRO-3) the others are waiting in.
    exported = ctx.phases.on_main("the export check", lambda: exported_step(output) == total)
    if not exported:
        export(config, run.engine, step=total, base_source=run.model_source, tokenizer=run.tokenizer,
               store=output, scratch=ctx.scratch, phases=ctx.phases)  # fmt: skip
    run.reporter.close()
    run.keep_alive = None  # the HF/DeepSpeed link lives as long as the export needs it, not longer
    process_group.shutdown()
