"""Typed errors a user can cause. The CLI turns every ``MedvitInputError`` into one line and exit code 2."""

from __future__ import annotations

import errno


class MedvitInputError(Exception):
    """Base of every error caused by the user's input (files, options, checkpoints)."""


class InputNotFoundError(MedvitInputError):
    """The given path does not exist or holds nothing readable."""


class UnreadableImageError(MedvitInputError):
    """The file exists but is not an image we can read (corrupt, truncated, unknown format)."""


class UnsupportedImageError(MedvitInputError):
    """The image was read but cannot be used: wrong dimensionality, RGB, bad values or geometry."""


class SeriesSelectionError(MedvitInputError):
    """A DICOM folder holds several series (or not the one asked for)."""


class ModalityError(MedvitInputError):
    """The image is not CT and the user did not allow other modalities."""


class CheckpointError(MedvitInputError):
    """A model checkpoint or its config is missing, unsafe or does not match."""


class TargetError(MedvitInputError):
    """An unknown target name or index."""


class MethodError(MedvitInputError):
    """An unknown explanation method, or options it does not accept."""


class ModelNotSupportedError(MedvitInputError):
    """The model is not a timm VisionTransformer wrapped as the explainers need."""


class DeviceError(MedvitInputError):
    """An unknown or unavailable device string."""


class OutputError(MedvitInputError):
    """An output location that cannot be written (read-only, no permission, full disk, a quota)."""


class MedvitWarning(UserWarning):
    """Something a user should know that does not stop the run; the CLI prints it as one ``warning:`` line."""


_CONTROL = {c: " " for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))}


def printable(text: object) -> str:
    """``text`` safe to echo to a terminal: control characters (escape sequences, new lines, carriage
    returns, C1 codes) become spaces, so a file name or a DICOM field cannot move the cursor, recolour
    the terminal or forge a second line."""
    return str(text).translate(_CONTROL)


# what to do about an OSError a disk or a file system raised, by errno
OS_ADVICE = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another --out",
    errno.EFBIG: "a file-size limit (ulimit -f or a quota) stopped the write; raise it or choose another --out",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.EACCES: "no permission; choose a folder you can write to",
    errno.EPERM: "the operation is not permitted; choose a folder you can write to",
    errno.ENAMETOOLONG: "the name is too long for the file system; use a shorter name or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "check the path",
    errno.EIO: "the disk reported an input/output error",
    errno.EEXIST: "something is in the way; choose another --out",
    errno.EISDIR: "a folder is in the way; choose another path",
}


def os_error_message(exc: OSError, where: object = None) -> str:
    """One line for an ``OSError``: what failed (``where``, else the error's own file name), the system's
    words and what to do, e.g. ``"/out: No space left on device (free some space or choose another --out)"``."""
    place = where if where is not None else exc.filename
    head = f"{printable(place)}: " if place else ""
    advice = OS_ADVICE.get(exc.errno, "check the path")
    return f"{head}{exc.strerror or type(exc).__name__} ({advice})"
