"""Keep what C++ readers (ITK, MetaIO, GDCM, teem) print straight to file descriptor 2 off the terminal.

Those libraries write lines such as ``MetaImage: M_ReadElementsData: data not read completely`` with
``std::cerr``, below Python's ``sys.stderr``, so neither ``warnings`` nor ``contextlib.redirect_stderr``
can catch them. :func:`native_stderr` points descriptor 2 at a temporary file for one call and hands the
text back, so a failed read can quote it in its one-line error instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

# Descriptor 2 belongs to the whole process: one redirection at a time (re-entrant for nested reads).
_LOCK = threading.RLock()
_MAX_CHARS = 4000  # a runaway library cannot fill memory through us


@dataclass
class NativeOutput:
    """What the libraries wrote to descriptor 2 during the block; ``text`` is set when the block ends."""

    text: str = ""

    @property
    def lines(self) -> list[str]:
        """The non-blank lines, stripped."""
        return [line.strip() for line in self.text.splitlines() if line.strip()]


@contextlib.contextmanager
def native_stderr() -> Iterator[NativeOutput]:
    """Send file descriptor 2 to a temporary file for the block; the real descriptor 2 is always restored.

    Yields a :class:`NativeOutput` whose ``text`` holds the captured output once the block has ended
    (also when it ended with an exception). Where descriptor 2 is closed, nothing is redirected.
    """
    output = NativeOutput()
    with _LOCK:
        _flush_python_stderr()
        redirect = _open_redirect()
        if redirect is None:  # no descriptor 2 or no temporary folder: read without the redirection
            yield output
            return
        saved, sink = redirect
        with sink:
            try:
                os.dup2(sink.fileno(), 2)
                yield output
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                output.text = sink.read(_MAX_CHARS).decode("utf-8", "replace")


def _open_redirect():
    """``(copy of descriptor 2, temporary file)``, or ``None`` where either cannot be had."""
    try:
        saved = os.dup(2)
    except OSError:
        return None
    try:
        return saved, tempfile.TemporaryFile()
    except OSError:
        os.close(saved)
        return None


def _flush_python_stderr() -> None:
    """Python text already buffered for descriptor 2 goes out before the swap, not into our file."""
    stream = sys.stderr
    if stream is not None:
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
