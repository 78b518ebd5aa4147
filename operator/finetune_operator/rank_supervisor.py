"""The process a local rank "pod" runs first: it starts the rank's command and makes sure nothing of
the rank outlives the `ftjob run` that started it, however that run ends (SIGKILL included).

Why a supervisor and not only a parent-death signal on the command: the command is the launcher
(torchrun in-process), and torchrun starts each worker in a session of its own, so neither a signal
to the pod's process group nor the launcher's own death reaches the workers; a SIGKILLed `ftjob
run` left both ranks training. Here:

- `prctl(PR_SET_PDEATHSIG)` wakes the supervisor the moment its parent goes. Linux sends it when the
  parent *thread* that forked us exits, not only the process, so the signal alone proves nothing:
  the supervisor acts when `getppid()` is no longer the `ftjob run` that started it (checked on
  the signal and every poll, which also covers a parent that died before the prctl).
- `prctl(PR_SET_CHILD_SUBREAPER)` makes every descendant that loses its parent (a worker whose
  launcher died) our child instead of init's, so the whole tree stays findable under us.
- Orphaned, it SIGTERMs the tree (the launcher forwards it; ranks write their emergency checkpoint),
  and SIGKILLs whatever is left after the launcher's shutdown timeout plus a margin.
- When the command ends, any descendant still running is ended the same way, and the supervisor
  exits as the command did (a signal death as that signal), which is what the backend records.

It runs as a script of the standard library only (`python -I <this file>`), so it starts fast and
does not depend on which finetune_operator the rank's environment would import.

The supervisor is in the pod's process group, so the backend's killpg reaches it with the
command; it ignores SIGTERM itself (the command got it too) and keeps waiting for the command.
Only a SIGKILL sent to the supervisor itself escapes it: that is outside "ftjob run was killed".
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_SECONDS = 0.2


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:  # Linux only; elsewhere the getppid poll remains
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def descendants(root: int) -> list[int]:
    """Every live process below `root`, from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended while we looked
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            out.append(pid)
            todo.append(pid)
    return out


def _signal_tree(sig: int) -> int:
    tree = descendants(os.getpid())
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return len(tree)


def _reap(child: int) -> int | None:
    """Reap every ended descendant (they are ours as subreaper); the command's wait status if it
    was among them."""
    status = None
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == child:
            status = code


def _end_tree(grace: float) -> None:
    """SIGTERM the tree, give it `grace` seconds, SIGKILL the rest, reap."""
    if not _signal_tree(signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while descendants(os.getpid()) and time.monotonic() < deadline:
        _reap(-1)
        time.sleep(POLL_SECONDS)
    _signal_tree(signal.SIGKILL)
    deadline = time.monotonic() + grace
    while descendants(os.getpid()) and time.monotonic() < deadline:
        _reap(-1)
        time.sleep(POLL_SECONDS)
    _reap(-1)


def supervise(parent: int, command: list[str], grace: float) -> int:
    """Run `command` until it ends or `parent` does; the command's wait status."""
    # Handlers, not SIG_IGN: exec resets handled signals to their defaults, so the command starts
    # with its own. SIGTERM to the group is the command's to act on; SIGUSR1 is the parent-death
    # signal, which only has to end the poll's sleep early.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, _wake)
    try:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
    except (OSError, AttributeError):
        pass
    process = subprocess.Popen(command)  # same group, same stdout/stderr (the rank's log)
    status: int | None = None
    orphaned_at: float | None = None
    while status is None:
        status = _reap(process.pid)
        if status is not None:
            break
        if orphaned_at is None and os.getppid() != parent:
            orphaned_at = time.monotonic()
            _signal_tree(signal.SIGTERM)
        elif orphaned_at is not None and time.monotonic() > orphaned_at + grace:
            _signal_tree(signal.SIGKILL)
        time.sleep(POLL_SECONDS)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    _end_tree(grace)  # workers that outlived their launcher
    return status


def _wake(signum: int, frame: object) -> None:
    del signum, frame


def _exit_as(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # died of a signal: so do we, so the backend records 128+N as for the command
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)
        return 128 - code
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    split = args.index("--")
    options, command = args[:split], args[split + 1 :]
    parent = int(options[options.index("--parent") + 1])
    grace = float(options[options.index("--grace") + 1])
    return _exit_as(supervise(parent, command, grace))


if __name__ == "__main__":
    sys.exit(main())
