"""Run the CLI in-process and check how it refused an input.

``run_cli`` captures what Python writes to ``sys.stderr`` (click's runner) and what native libraries
(ITK, GDCM, MetaIO) write to file descriptor 2, so "exactly one line" covers both.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

PROGRESS = re.compile(r"^[\w-]+:\s+\d+%\|")  # a tqdm line: "explain:  50%|#####     | 2/4 ..."


@dataclass
class Outcome:
    args: list[str]
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    @property
    def lines(self) -> list[str]:
        """stderr lines that are not progress bars."""
        out = []
        for line in re.split(r"[\r\n]+", self.stderr):
            if line.strip() and not PROGRESS.match(line.strip()):
                out.append(line.strip())
        return out

    @property
    def errors(self) -> list[str]:
        return [line for line in self.lines if line.startswith("error:")]

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.lines if line.startswith("warning:")]

    def __str__(self) -> str:
        return f"medvit-explain {' '.join(self.args)} -> {self.exit_code}\nstdout: {self.stdout}\nstderr: {self.stderr}"


@contextlib.contextmanager
def _native_stderr():
    """Send file descriptor 2 to a temporary file for the block; yields a list that gets its text."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def run_cli(args: list[str], cwd: str | os.PathLike | None = None) -> Outcome:
    """``medvit-explain ARGS`` in this process (click's runner), optionally from folder ``cwd``."""
    from medvit_explain.cli import _add_commands, cli

    _add_commands()
    runner = CliRunner()
    args = [str(a) for a in args]
    previous = os.getcwd()
    with _native_stderr() as native:
        try:
            if cwd is not None:
                os.chdir(cwd)
            result = runner.invoke(cli, args, catch_exceptions=True)
        finally:
            os.chdir(previous)
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    stderr = result.stderr + native[0]
    if exception is not None:
        import traceback

        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(exception))
    return Outcome(args, result.exit_code, result.stdout, stderr, exception)


def run_cli_process(
    args: list[str], *, cwd: str | os.PathLike | None = None, fsize_limit: int | None = None, timeout: float = 300
) -> Outcome:
    """``python -m medvit_explain ARGS`` in a child process, optionally under ``RLIMIT_FSIZE`` (bytes)."""

    def limit() -> None:
        if fsize_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    args = [str(a) for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "medvit_explain", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
        env={**os.environ, "PYTHONWARNINGS": ""},
    )
    return Outcome(args, done.returncode, done.stdout, done.stderr)


def assert_refused(
    outcome: Outcome,
    *,
    match: str | None = None,
    code: int = 2,
    absent: tuple[str | os.PathLike, ...] = (),
    warnings_allowed: int = 0,
) -> str:
    """The contract for bad input: exit ``code``, exactly one ``error:`` line (matching ``match``), no
    traceback, no other stderr lines than progress bars and up to ``warnings_allowed`` ``warning:`` lines,
    and nothing at any of the ``absent`` paths (a folder must not exist, or be empty). Returns the line."""
    assert outcome.exit_code == code, str(outcome)
    assert "Traceback" not in outcome.stderr, str(outcome)
    assert len(outcome.errors) == 1, str(outcome)
    others = [line for line in outcome.lines if not line.startswith(("error:", "warning:"))]
    assert not others, str(outcome)
    assert len(outcome.warnings) <= warnings_allowed, str(outcome)
    line = outcome.errors[0]
    if match is not None:
        assert re.search(match, line, re.IGNORECASE), f"{line!r} does not match {match!r}\n{outcome}"
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", line), f"control characters echoed: {line!r}"
    for path in absent:
        path = Path(path)
        if path.is_dir():
            left = [p for p in path.rglob("*")]
            assert not left, f"{path} holds {left}\n{outcome}"
        else:
            assert not path.exists() and not path.is_symlink(), f"{path} was written\n{outcome}"
    return line


def assert_clean(outcome: Outcome, *, warnings_allowed: int = 0) -> None:
    """A run that succeeds: exit 0, no traceback, no stderr lines but progress and ``warning:`` lines."""
    assert outcome.exit_code == 0, str(outcome)
    assert "Traceback" not in outcome.stderr, str(outcome)
    others = [line for line in outcome.lines if not line.startswith("warning:")]
    assert not others, str(outcome)
    assert len(outcome.warnings) <= warnings_allowed, str(outcome)
