"""Device strings: ``auto | cpu | cuda | cuda:N``."""

from __future__ import annotations

import torch

from medvit_explain.errors import DeviceError
from medvit_explain.vocabulary import DEVICE_PATTERN, EXPECTED_DEVICES


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a user's device string into a ``torch.device`` that exists on this machine.

    ``auto`` is the first CUDA device when one is available, else the CPU. An unknown string or a CUDA
    device that is not there raises :class:`DeviceError` with one line naming the expected values.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise DeviceError(f"expected a device string ({EXPECTED_DEVICES}), got {device!r}")
    match = DEVICE_PATTERN.match(device.strip().lower())
    if match is None:
        raise DeviceError(f"unknown device {device!r}; expected {EXPECTED_DEVICES}")
    if match.group(1) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if match.group(1) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} is not available (no CUDA device found); expected {EXPECTED_DEVICES}")
    if match.group(2) is None:
        return torch.device("cuda")
    index = int(match.group(2))
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"device {device!r} is not available ({count} CUDA device(s): cuda:0..cuda:{count - 1}); "
            f"expected {EXPECTED_DEVICES}"
        )
    return torch.device("cuda", index)
