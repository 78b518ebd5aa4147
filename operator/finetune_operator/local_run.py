"""`ftjob run`: one FineTuneJob on this machine, through the LocalBackend and the operator's own
Reconciler, with a live display while it runs and a summary and loss curve at the end.

Ctrl-C suspends the job exactly as `runPolicy.suspend: true` does on a cluster: every rank gets
SIGTERM and writes its emergency checkpoint within the grace period, the status is kept, and running
the same manifest again resumes (the new manifest's suspend is false, so the next attempt starts
from the latest committed checkpoint). A second Ctrl-C kills the ranks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from finetune_operator.api.status import TERMINAL_PHASES
from finetune_operator.backends.local import LocalBackend
from finetune_operator.cli_errors import EXIT_BUSY, EXIT_INPUT_MISSING, EXIT_INTERRUPTED, CliError
from finetune_operator.clock import SystemClock
from finetune_operator.jobview import describe, load_local, plot_loss, table, wide_row
from finetune_operator.metrics import Metrics
from finetune_operator.progress import parse_all
from finetune_operator.reconciler import Reconciler
from finetune_operator.settings import OperatorSettings

PASS_SECONDS = 0.5  # locally a pass reads a few small files: looking often costs nothing


@dataclass(frozen=True)
class RunOptions:
    workdir: Path
    nodes: int | None = None
    gpus_per_node: int | None = None
    live: bool | None = None  # None: a live display on a terminal, plain lines otherwise


def local_manifest(manifest: dict[str, Any], options: RunOptions) -> dict[str, Any]:
    """The manifest as the local run takes it: --nodes/--gpus-per-node applied, the checkpoint store
    defaulting to the workdir, and the default namespace when none is named."""
    out = copy.deepcopy(manifest)
    # A section of the wrong shape is left as it is, for validation to name it.
    meta = out.setdefault("metadata", {})
    if isinstance(meta, dict):
        meta.setdefault("namespace", "default")
    spec = out.setdefault("spec", {})
    if not isinstance(spec, dict):
        return out
    resources = spec.setdefault("resources", {})
    if isinstance(resources, dict):
        if options.nodes is not None:
            resources["nodes"] = options.nodes
        if options.gpus_per_node is not None:
            resources["gpusPerNode"] = options.gpus_per_node
    checkpoint = spec.setdefault("checkpoint", {})
    if isinstance(checkpoint, dict):
        checkpoint.setdefault("uri", f"file://{options.workdir.resolve() / 'store'}")
    return out


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold the workdir for this `ftjob run`: a second one of the same job (same workdir) would
    start a second gang beside the first on the same files. flock is released by the kernel when
    the holder dies, even by SIGKILL, so a crashed run never leaves a stale lock behind; and the
    lock is taken before anything in the workdir is read or written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        lock = (workdir / ".lock").open("w")
    except OSError as exc:
        raise CliError(EXIT_INPUT_MISSING, f"workdir {workdir} cannot be used ({exc.strerror})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CliError(
                EXIT_BUSY,
                f"{workdir} is in use by another `ftjob run` of this job; wait for it to end (or stop "
                "it with Ctrl-C), or pass another --workdir",
            ) from None
        yield


class LocalRun:
    def __init__(self, manifest: dict[str, Any], options: RunOptions, out: TextIO = sys.stdout) -> None:
        """`manifest` as `local_manifest` made it (and validated)."""
        self.options, self.out, self.manifest = options, out, manifest
        resources = self.manifest["spec"]["resources"]
        self.backend = LocalBackend(options.workdir, gpus_per_node=int(resources.get("gpusPerNode", 0) or 0))
        settings = OperatorSettings(metrics_port=None, progress_poll_seconds=PASS_SECONDS)
        self.reconciler = Reconciler(self.backend, SystemClock(), settings, Metrics())
        self.key = (self.manifest["metadata"]["namespace"], self.manifest["metadata"]["name"])
        self.interrupts = 0
        self._events_seen = 0

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> int:
        with workdir_lock(self.options.workdir):
            self.backend.submit(self.manifest, SystemClock().now())
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, self._interrupted)
            loop.add_signal_handler(signal.SIGTERM, self._interrupted)
            try:
                with self._display() as show:
                    phase = await self._drive(show)
            finally:
                loop.remove_signal_handler(signal.SIGINT)
                loop.remove_signal_handler(signal.SIGTERM)
            return self._finish(phase)

    async def _drive(self, show: Any) -> str | None:
        suspending = False
        while True:
            await self.reconciler.reconcile(self.key)
            body = self.backend.read_job()
            show(body)
            self._print_new_events()
            if body is None:
                return None  # deleted by its TTL
            phase = (body.get("status") or {}).get("phase")
            if self.interrupts and not suspending:
                suspending = True
                self._suspend()
            if self.interrupts > 1:
                for name in self.backend.running_pods():
                    self.backend.delete_pod(name, force=True, grace=0)
            if phase in TERMINAL_PHASES and not self.backend.running_pods():
                return str(phase)
            if suspending and phase == "Suspended" and not self.backend.pod_records():
                return "Suspended"
            await asyncio.sleep(PASS_SECONDS)

    def _interrupted(self) -> None:
        self.interrupts += 1
        message = (
            "stopping: every rank writes an emergency checkpoint (Ctrl-C again to kill them now)"
            if self.interrupts == 1
            else "killing every rank"
        )
        print(f"\n{message}", file=self.out, flush=True)

    def _suspend(self) -> None:
        manifest = copy.deepcopy(self.manifest)
        manifest["spec"].setdefault("runPolicy", {})["suspend"] = True
        self.backend.submit(manifest, SystemClock().now())

    # -- what the person sees ----------------------------------------------------------------------

    def _print_new_events(self) -> None:
        events = self.backend.events()
        for event in events[self._events_seen :]:
            print(f"[{event['type']}] {event['reason']}: {event['message']}", file=self.out, flush=True)
        self._events_seen = len(events)

    @contextlib.contextmanager
    def _display(self) -> Iterator[Any]:
        live = self.options.live if self.options.live is not None else self.out.isatty()
        if not live:
            last: list[Any] = [None]

            def show(body: dict[str, Any] | None) -> None:
                line = status_line(body)
                if line != last[0]:
                    print(line, file=self.out, flush=True)
                    last[0] = line

            yield show
            return
        from rich.console import Console
        from rich.live import Live

        with Live(console=Console(file=self.out), refresh_per_second=4, transient=False) as display:
            yield lambda body: display.update(live_panel(body))

    def _finish(self, phase: str | None) -> int:
        view = load_local(self.options.workdir)
        if view is not None:
            print("\n" + table([wide_row(view.body)]), file=self.out)
        png = self.loss_curve()
        if png is not None:
            print(f"loss curve: {png}", file=self.out)
        print(f"rank logs: {self.options.workdir / 'logs'}", file=self.out)
        if phase == "Succeeded":
            return 0
        if phase == "Suspended":
            print("suspended: run the same command again to resume from the latest checkpoint", file=self.out)
            return EXIT_INTERRUPTED
        if view is not None:
            print("\n" + describe(view), file=self.out)
        return 1

    def loss_curve(self) -> Path | None:
        name = self.manifest["metadata"]["name"]
        logs = {
            int(p.stem.rsplit("-a", 1)[1].split("-")[0]): p
            for p in (self.options.workdir / "logs").glob(f"{name}-a*-n0.log")
        }
        attempts = [(a, parse_all(logs[a].read_text(errors="replace"))) for a in sorted(logs)]
        return plot_loss(attempts, self.options.workdir / "loss.png", f"{name}: loss by step")


def status_line(body: dict[str, Any] | None) -> str:
    if body is None:
        return "job deleted"
    status = body.get("status") or {}
    progress = status.get("progress") or {}
    checkpoint = (status.get("latestCheckpoint") or {}).get("step")
    parts = [f"{status.get('phase', 'Pending')}", f"attempt {status.get('attempt', 0)}"]
    if progress:
        parts.append(f"step {progress.get('step', 0)}/{progress.get('totalSteps', '?')}")
        if progress.get("loss") is not None:
            parts.append(f"loss {progress['loss']:.4f}")
    if checkpoint is not None:
        parts.append(f"checkpoint {checkpoint}")
    return " | ".join(parts)


def live_panel(body: dict[str, Any] | None) -> Any:
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    if body is None:
        grid.add_row("job", "deleted")
        return grid
    status = body.get("status") or {}
    progress = status.get("progress") or {}
    step, total = progress.get("step", 0), progress.get("totalSteps") or 0
    checkpoint = status.get("latestCheckpoint") or {}
    grid.add_row("job", f"{body['metadata']['name']}   phase {status.get('phase', 'Pending')}")
    grid.add_row("attempt", f"{status.get('attempt', 0)}   restarts {status.get('restarts', 0)}"
                 f" + {status.get('infraRestarts', 0)} infrastructure")  # fmt: skip
    grid.add_row("step", f"{step}/{total or '?'}")
    grid.add_row("", ProgressBar(total=max(total, 1), completed=step, width=40))
    grid.add_row("loss", _number(progress.get("loss")) + f"   eval {_number(progress.get('evalLoss'))}")
    grid.add_row("tokens/s", _number(progress.get("tokensPerSecond"), "{:.0f}"))
    grid.add_row("ETA", f"{progress['etaSeconds']} s" if progress.get("etaSeconds") is not None else "-")
    grid.add_row("checkpoint", f"step {checkpoint['step']}" if checkpoint else "none yet")
    return grid


def _number(value: Any, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def run_manifest(manifest: dict[str, Any], options: RunOptions) -> int:
    return asyncio.run(LocalRun(manifest, options).run())
