"""Rank 0's voice: a readable log line per report, the structured progress line the operator reads
(finetune_operator.progress), and TensorBoard scalars, uploaded next to the checkpoints after each
commit and at the end. Other ranks stay quiet.

The reporter is built once the run has resumed, so its ETA counts training time only, not the
checkpoint download. It listens to the checkpointer (checkpointing.CheckpointListener).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_operator.api.status import (
    CheckpointRef,
    DataSourceReport,
    InPlaceRestart,
    ObjectiveMetrics,
    Progress,
)
from finetune_operator.progress import ProgressReport, format_line

log = logging.getLogger("finetune_trainer")


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _label(name: str) -> str:
    """A metric's name as TRL and TensorBoard users read it: rewards_margin -> rewards/margin."""
    return name.replace("rewards_", "rewards/")


class Reporter:
    def __init__(
        self,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        tensorboard_dir: Path | None,
        data: list[DataSourceReport] | None = None,
        tensorboard_store: Any = None,
        in_place_restarts: list[InPlaceRestart] | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.monotonic()
        # Every report carries this attempt's stall count, 0 until a save blocked training.
        self.progress = Progress(
            step=start_step,
            total_steps=total_steps,
            checkpoint_stall_seconds=0.0,
            data=data or None,
            in_place_restarts=in_place_restarts or None,
        )
        self.checkpoint: CheckpointRef | None = None
        self._lock = threading.Lock()  # the upload thread reports commits
        self._writer: Any = None
        self._tensorboard_dir = tensorboard_dir
        self._tensorboard_store = tensorboard_store  # an ObjectStore: the job's, under tensorboard/
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(tensorboard_dir))
        if enabled and in_place_restarts:
            # Restarted in place: said at once, not at the next logged step, so the operator counts
            # the restart while the run is still catching up.
            self.progress = self.progress.model_copy(update={"updated_at": datetime.now(UTC)})
            self._emit()

    def _eta(self, step: int) -> int | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return int((time.monotonic() - self.started) / done * (self.total_steps - step))

    def _emit(self) -> None:
        line = format_line(ProgressReport(progress=self.progress, latest_checkpoint=self.checkpoint))
        print(line, file=sys.stdout, flush=True)

    def step(self, step: int, *, loss: float, tokens_per_second: float, learning_rate: float,
             metrics: dict[str, float] | None = None) -> None:  # fmt: skip
        """`metrics`: the objective's parts (ObjectiveMetrics' field names), averaged like the loss."""
        if not self.enabled:
            return
        with self._lock:
            self.progress = self.progress.model_copy(
                update={
                    "step": step,
                    "percent": round(100 * step / self.total_steps, 2),
                    "eta_seconds": self._eta(step),
                    "loss": round(loss, 5),
                    "tokens_per_second": round(tokens_per_second, 1),
                    "updated_at": datetime.now(UTC),
                    "metrics": self._with_metrics(metrics or {}),
                }
            )
            eta = self.progress.eta_seconds
            ckpt = f" | ckpt step {self.checkpoint.step}" if self.checkpoint else ""
            evl = f" eval {self.progress.eval_loss:.4f}" if self.progress.eval_loss is not None else ""
            parts = "".join(f" | {_label(k)} {v:.4f}" for k, v in (metrics or {}).items())
            log.info(
                "step %d/%d (%.0f%%) | loss %.4f%s%s | lr %.2e | %.0f tok/s | eta %s%s",
                step, self.total_steps, self.progress.percent, loss, evl, parts, learning_rate,
                tokens_per_second, human_duration(eta) if eta is not None else "?", ckpt,
            )  # fmt: skip
            self._emit()
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/learning_rate", learning_rate, step)
            self._writer.add_scalar("train/tokens_per_second", tokens_per_second, step)
            for name, value in (metrics or {}).items():
                self._writer.add_scalar(f"train/{_label(name)}", value, step)

    def evaluation(self, step: int, eval_loss: float, metrics: dict[str, float] | None = None) -> None:
        """`metrics` as in `step`, over the held-out data, named without the eval_ prefix."""
        if not self.enabled:
            return
        held_out = {f"eval_{k}": v for k, v in (metrics or {}).items()}
        with self._lock:
            self.progress = self.progress.model_copy(
                update={"eval_loss": round(eval_loss, 5), "metrics": self._with_metrics(held_out)}
            )
        parts = "".join(f" | {_label(k)} {v:.4f}" for k, v in (metrics or {}).items())
        log.info("step %d | eval loss %.4f%s", step, eval_loss, parts)
        if self._writer is not None:
            self._writer.add_scalar("eval/loss", eval_loss, step)
            for name, value in (metrics or {}).items():
                self._writer.add_scalar(f"eval/{_label(name)}", value, step)

    def _with_metrics(self, values: dict[str, float]) -> ObjectiveMetrics | None:
        """The reported metrics with `values` replacing theirs (the train and eval parts are reported
        at different steps; each report carries the latest of both)."""
        if not values:
            return self.progress.metrics
        current = self.progress.metrics.model_dump() if self.progress.metrics else {}
        return ObjectiveMetrics(**{**current, **{k: round(v, 5) for k, v in values.items()}})

    def stalled(self, seconds: float) -> None:
        """Training waited `seconds` on a checkpoint save. The sum over this attempt goes out with the
        next report: the operator's goodput subtracts it from productive time."""
        if not self.enabled:
            return
        with self._lock:
            total = (self.progress.checkpoint_stall_seconds or 0.0) + seconds
            self.progress = self.progress.model_copy(update={"checkpoint_stall_seconds": round(total, 3)})

    def committed(self, step: int, uri: str, at: datetime, seconds: float | None = None) -> None:
        if not self.enabled:
            return
        with self._lock:
            duration = round(seconds, 3) if seconds is not None else None
            self.checkpoint = CheckpointRef(step=step, uri=uri, time=at, duration_seconds=duration)
            log.info("checkpoint step %d committed: %s", step, uri)
            self._emit()

    def settled(self, step: int) -> None:
        """Step `step`'s commit and keepLast are done (rank 0's upload thread): its events follow it."""
        self.upload_tensorboard()

    def upload_tensorboard(self) -> None:
        """Every TensorBoard file on this node's scratch disk (each attempt its own folder), at the same
        keys under `<job>/tensorboard/`."""
        if not self.enabled or self._tensorboard_dir is None or self._tensorboard_store is None:
            return
        if self._writer is not None:
            self._writer.flush()
        root = self._tensorboard_dir.parent
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            self._tensorboard_store.put_file(path, f"tensorboard/{path.relative_to(root).as_posix()}")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.upload_tensorboard()
