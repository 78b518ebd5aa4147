"""Standard output that goes quiet when its reader goes away (`ftjob render ... | head`).

Python ignores SIGPIPE, so a write to a closed pipe raises BrokenPipeError: a traceback in the middle
of a command, and another when the interpreter flushes stdout at exit. `ftjob` instead points its
stdout at /dev/null from then on and carries on: a printing command finishes (quietly), `ftjob run`
keeps training and suspends its ranks properly on exit, and a follower (`logs -f`) sees
`reader_gone` and stops, as `kubectl logs -f | head` does."""

from __future__ import annotations

import io
import os
import sys
from typing import Any, TextIO, cast


class QuietStdout:
    """A text stream wrapper: writes and flushes never raise BrokenPipeError."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)

    def write_bytes(self, data: bytes) -> None:
        """Raw bytes (a pod's log as it comes), after whatever text is still buffered."""
        try:
            self._stream.flush()
            self._stream.buffer.write(data)
            self._stream.buffer.flush()
        except BrokenPipeError:
            self._silence()
        except AttributeError:  # a stream without a byte buffer (a test's capture)
            self.write(data.decode("utf-8", errors="replace"))

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._silence()

    def _silence(self) -> None:
        self.reader_gone = True
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, io.UnsupportedOperation):
            return
        # The stream's buffer still holds what could not be written; with the descriptor on
        # /dev/null its next flush (at the latest, the interpreter's at exit) succeeds.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def quiet_stdout() -> QuietStdout:
    """Install (once) and return the quiet wrapper as sys.stdout."""
    if isinstance(sys.stdout, QuietStdout):
        return sys.stdout
    quiet = QuietStdout(sys.stdout)
    sys.stdout = cast(TextIO, quiet)
    return quiet
