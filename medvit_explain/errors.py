"""Typed errors a user can cause. The CLI turns every ``MedvitInputError`` into one line and exit code 2."""

from __future__ import annotations


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
