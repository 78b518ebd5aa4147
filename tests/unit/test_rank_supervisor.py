"""A local rank's processes never outlive the `ftjob run` that started them, and never run beside a
second `ftjob run` of the same workdir. The rank here is shaped as torchrun shapes it: a launcher
in the pod's process group and a worker in a session of its own (which a signal to the group misses)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from finetune_operator.backends.local import signal_rank, spawn_process_group
from finetune_operator.cli import main
from finetune_operator.cli_errors import EXIT_BUSY
from finetune_operator.local_run import workdir_lock
from finetune_operator.rank_supervisor import descendants

from tests.support.factories import manifest
from tests.support.processes import alive, until

WAIT = 20.0  # seconds: a bounded wait for anything below (the supervisor polls every 0.2 s)

# A launcher in the style of torchrun: its worker starts a session of its own, then both wait.
LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys, time
    worker = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "print('worker up', flush=True); time.sleep(600)"]
    subprocess.Popen(worker, start_new_session=True)
    if sys.argv[1] == "exit":
        time.sleep(0.5)
        sys.exit(0)
    time.sleep(600)
    """
)

# What stands in for `ftjob run`: it starts one rank the way LocalBackend does, then waits.
RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from finetune_operator.backends.local import signal_rank, spawn_process_group
    env = {"PATH": "/usr/bin:/bin", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1"}
    spawn_process_group([sys.executable, "-c", sys.argv[1], "run"], env, Path(sys.argv[2]))
    time.sleep(600)
    """
)


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids a test saw; any still alive afterwards (the test failed) is killed, not left running."""
    seen: list[int] = []
    yield seen
    for pid in seen:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1"}


def test_a_sigkilled_run_takes_every_rank_process_with_it_workers_in_their_own_sessions_too(
    tmp_path: Path, leftovers: list[int]
) -> None:
    run = subprocess.Popen([sys.executable, "-c", RUN, LAUNCHER, str(tmp_path / "rank.log")], env=os.environ)
    try:
        until(lambda: len(descendants(run.pid)) >= 3, WAIT, "supervisor, launcher and worker started")
        until(lambda: "worker up" in (tmp_path / "rank.log").read_text(), WAIT, "the worker running")
        tree = descendants(run.pid)
        leftovers.extend(tree)
        run.kill()
        run.wait(WAIT)
        until(lambda: not any(alive(pid) for pid in tree), WAIT, f"every rank process of {tree} gone")
    finally:
        run.kill()


def test_a_worker_that_outlives_its_launcher_ends_with_the_rank(tmp_path: Path, leftovers: list[int]) -> None:
    rank = spawn_process_group([sys.executable, "-c", LAUNCHER, "exit"], _env(), tmp_path / "rank.log")
    until(lambda: "worker up" in (tmp_path / "rank.log").read_text(), WAIT, "the worker running")
    tree = descendants(rank.pid)
    leftovers.extend(tree)
    assert rank.wait(WAIT) == 0
    assert not any(alive(pid) for pid in tree), "the orphaned worker is ended before the rank reports"


def test_a_force_deleted_rank_ends_with_its_workers(tmp_path: Path, leftovers: list[int]) -> None:
    rank = spawn_process_group([sys.executable, "-c", LAUNCHER, "run"], _env(), tmp_path / "rank.log")
    until(lambda: "worker up" in (tmp_path / "rank.log").read_text(), WAIT, "the worker running")
    tree = descendants(rank.pid)
    leftovers.extend(tree)
    signal_rank(rank.pid, signal.SIGKILL)  # what LocalBackend.delete_pod(force=True) sends
    assert rank.wait(WAIT) == -signal.SIGKILL
    until(lambda: not any(alive(pid) for pid in tree), WAIT, f"every process of {tree} gone")


@pytest.mark.parametrize(
    ("program", "returncode"),
    [("import sys; sys.exit(3)", 3), ("import os; os.kill(os.getpid(), 9)", -9), ("pass", 0)],
)
def test_the_rank_exits_as_its_command_did(program: str, returncode: int, tmp_path: Path) -> None:
    rank = spawn_process_group([sys.executable, "-c", program], _env(), tmp_path / "rank.log")
    assert rank.wait(WAIT) == returncode


def test_sigterm_to_the_rank_group_reaches_the_command_and_is_its_exit(tmp_path: Path) -> None:
    program = "import time; print('up', flush=True); time.sleep(600)"
    rank = spawn_process_group([sys.executable, "-c", program], _env(), tmp_path / "rank.log")
    until(lambda: "up" in (tmp_path / "rank.log").read_text(), WAIT, "the command running")
    os.killpg(rank.pid, signal.SIGTERM)
    assert rank.wait(WAIT) == -signal.SIGTERM  # 143 as the backend records it, as before


def _job_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest({"spec.checkpoint.uri": f"file://{tmp_path / 'store'}"})))
    return path


def test_a_second_run_of_a_busy_workdir_is_refused_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "run"
    with workdir_lock(workdir):  # the first `ftjob run`, alive
        assert main(["run", str(_job_file(tmp_path)), "--workdir", str(workdir)]) == EXIT_BUSY
    line = capsys.readouterr().err.strip()
    assert "is in use by another `ftjob run` of this job" in line and "--workdir" in line
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from finetune_operator.local_run import workdir_lock
    with workdir_lock(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(600)
    """
)


def test_a_killed_run_leaves_no_stale_lock(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait(WAIT)
        with workdir_lock(workdir):
            pass  # taken at once: the kernel released the dead holder's flock
    finally:
        holder.kill()
