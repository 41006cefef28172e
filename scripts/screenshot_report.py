#!/usr/bin/env python
"""Render an HTML report to a PNG with headless Chromium (offline: no network, fresh profile).

Usage: python scripts/screenshot_report.py REPORT.html OUT.png [--width 1280] [--height 2400]
       [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CHROMIUM = "/usr/bin/chromium"


def find_chromium(explicit: str | None = None) -> str | None:
    for candidate in (
        explicit,
        DEFAULT_CHROMIUM,
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def screenshot(
    report: Path,
    out: Path,
    *,
    width: int = 1280,
    height: int = 2400,
    chromium: str | None = None,
    timeout: float = 120.0,
) -> Path:
    """Render ``report`` into ``out`` (PNG); raises ``RuntimeError`` when Chromium fails."""
    exe = find_chromium(chromium)
    if exe is None:
        raise RuntimeError("no Chromium found (expected /usr/bin/chromium; apt-get install chromium)")
    report, out = Path(report).resolve(), Path(out).resolve()
    if not report.is_file():
        raise RuntimeError(f"expected an HTML file, got {report} (not a file)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medvit-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={width},{height}",
            report.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"chromium exited with {proc.returncode}: " + " | ".join(tail))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--chromium", default=None)
    args = parser.parse_args(argv)
    try:
        path = screenshot(args.report, args.out, width=args.width, height=args.height, chromium=args.chromium)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
