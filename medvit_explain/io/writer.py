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

from ..volume import Volume


def usual_mode(directory: bool = False) -> int:
    """The permissions a new file (or folder) gets under the process umask. ``mkstemp`` / ``mkdtemp``
    make private 0600 / 0700 files; results are meant to be read by others."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
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
        for path in Path(final).parent.glob(f".{glob.escape(Path(final).name)}.*"):
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
    """Write ``volume`` to ``path`` (.nii.gz, .nii, .nrrd, .mha) atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(to_sitk(volume, dtype), str(tmp), compress)
    return path
