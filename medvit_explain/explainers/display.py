"""Putting token-grid maps on the image: upsampling and per-map min-max for display."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["normalize_for_display", "upsample"]


def upsample(maps: Tensor, size: tuple[int, ...], mode: str = "bilinear") -> Tensor:
    """[B, T, gh, gw] → [B, T, H, W] (``mode`` "bilinear" (align_corners=False) or "nearest"); a volumetric
    model's [B, T, gd, gh, gw] → [B, T, D, H, W] with ``size = (D, H, W)`` ("bilinear" is then trilinear)."""
    if maps.ndim not in (4, 5) or maps.ndim != len(size) + 2:
        raise ValueError(
            f"expected maps of shape [B, T, gh, gw] or [B, T, gd, gh, gw] for size {size}, got {tuple(maps.shape)}"
        )
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"expected mode 'bilinear' or 'nearest', got {mode!r}")
    size = tuple(int(s) for s in size)
    if mode == "bilinear":
        return F.interpolate(maps, size=size, mode="bilinear" if len(size) == 2 else "trilinear", align_corners=False)
    return F.interpolate(maps, size=size, mode="nearest")


def normalize_for_display(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-map min-max to [0, 1] over the last two dims: (m − min) / (max − min + eps).

    A constant map becomes zeros (never NaN).
    """
    if maps.ndim < 2:
        raise ValueError(f"expected maps with at least 2 dims [..., H, W], got {tuple(maps.shape)}")
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True).unsqueeze(-1)
    hi = flat.amax(-1, keepdim=True).unsqueeze(-1)
    return (maps - lo) / (hi - lo + eps)
