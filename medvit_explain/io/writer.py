"""Write volumes on a source grid, atomically (a final path never holds a partial file)."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..vocabulary import IMAGE_SUFFIXES
from ..volume import Volume


def usual_mode(directory: bool = False) -> int:
    """The permissions a new file (or folder) gets under the process umask. ``mkstemp`` / ``mkdtemp``
    make private 0600 / 0700 files; results are meant to be read by others."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


_KNOWN_SUFFIXES = (*IMAGE_SUFFIXES, ".csv", ".json", ".html", ".png")
_TEMP_NAME_BYTES = 160  # the part of a final name kept in its temporary name (file names stop at 255 bytes)


def _temp_affixes(final: Path) -> tuple[str, str]:
    """(prefix, suffix) of ``final``'s temporary names: ``.<name, cut to 160 bytes>.`` and its image suffix
    (writers such as ITK pick the format from it). Only known suffixes count: a dotted name such as
    ``a.b.c.nii.gz`` keeps ``.nii.gz``, not ``.b.c.nii.gz``, so the temporary name stays short."""
    name = final.name
    suffix = next((s for s in _KNOWN_SUFFIXES if name.lower().endswith(s)), final.suffix[:16] or ".tmp")
    head = name.encode("utf-8")[:_TEMP_NAME_BYTES].decode("utf-8", "ignore")
    return f".{head}.", suffix


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_affixes(final)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, usual_mode())
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def replace_folder(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder ``new`` onto ``final`` (same filesystem). A previous ``final`` is moved
    aside first, put back if the move fails, and removed only once it is replaced."""
    import shutil

    new, final = Path(new), Path(final)
    old: Path | None = None
    try:
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old)  # a folder may be renamed onto an empty one
        os.replace(new, final)
    except BaseException:
        if old is not None and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final)  # put the previous one back
        raise
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(finals: list[Path]) -> None:
    """Remove the temporary files of :func:`atomic_path` (``.<name>.XXXXXXXX<suffix>``) that a killed
    process left beside these final paths; nothing else is touched."""
    for final in finals:
        prefix, _ = _temp_affixes(Path(final))
        for path in Path(final).parent.glob(f"{glob.escape(prefix)}*"):
            if path.is_file():
                path.unlink(missing_ok=True)


def to_sitk(volume: Volume, dtype=np.float32) -> sitk.Image:
    """A SimpleITK image with the volume's values (cast to ``dtype``) and exact geometry."""
    array = np.ascontiguousarray(np.asarray(volume.array, dtype=dtype).transpose(2, 1, 0))
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    image.SetSpacing(tuple(float(v) for v in volume.spacing))
    image.SetDirection(tuple(float(v) for v in volume.direction.reshape(-1)))
    return image


def write_volume(volume: Volume, path: str | os.PathLike, dtype=np.float32, compress: bool = True) -> Path:
    """Write ``volume`` to ``path`` (.nii.gz, .nii, .nrrd, .mha) atomically; returns the path.

    ITK's writers report a short write (a full disk, a file-size limit) only on stderr and return normally,
    so the temporary file is checked to hold all the voxel data before it is renamed; a short file raises
    ``OSError`` (ENOSPC) and nothing is left at ``path``.
    """
    path = Path(path)
    nbytes = int(np.prod(volume.shape)) * np.dtype(dtype).itemsize
    with atomic_path(path) as tmp:
        sitk.WriteImage(to_sitk(volume, dtype), str(tmp), compress)
        check_written(tmp, nbytes, compressed=compress and path.name.lower().endswith((".gz", ".nrrd", ".mha")))
    return path


def check_written(path: Path, data_bytes: int, compressed: bool) -> None:
    """Raise ``OSError`` unless ``path`` holds at least ``data_bytes`` bytes of data: the file itself, or
    what it decompresses to (a gzip stream — ``.nii.gz`` — read through; a compressed NRRD/MHA is read back
    by ITK, whose zlib reader fails on a cut stream)."""
    import errno

    if not compressed:
        size = path.stat().st_size
    elif path.name.lower().endswith(".gz"):
        from .checksum import GZIP_ERRORS, gzip_content

        try:
            size, _ = gzip_content(path)
        except GZIP_ERRORS:
            size = -1
    else:
        try:
            image = sitk.ReadImage(str(path))
            size = image.GetNumberOfPixels() * image.GetSizeOfPixelComponent() * image.GetNumberOfComponentsPerPixel()
        except RuntimeError:
            size = -1
    if size < data_bytes:
        raise OSError(
            errno.ENOSPC, "the file was cut short while writing (a full disk or a file-size limit?)", str(path)
        )
