"""Checksums of inputs and checkpoints (recorded in summary.json for provenance), and the one read-through
of a gzip stream that both the reader (a truncated ``.nii.gz``) and the writer (a write cut short) check."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

GZIP_ERRORS = (EOFError, OSError, zlib.error)  # what reading a truncated or corrupt gzip stream raises


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of every file (sorted by relative path) in a folder."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def gzip_content(path: str | os.PathLike, head: int = 0) -> tuple[int, bytes]:
    """The decompressed size of the gzip file ``path`` and its first ``head`` bytes, read through once in
    16 MB blocks (nothing else kept). Raises one of :data:`GZIP_ERRORS` for a cut or corrupt stream."""
    size, first = 0, b""
    with gzip.open(path, "rb") as stream:
        while block := stream.read(1 << 24):
            first += block[: max(0, head - len(first))]
            size += len(block)
    return size, first
