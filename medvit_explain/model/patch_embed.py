"""``PatchEmbed3d``: the volumetric patch embedding a timm ``VisionTransformer`` takes as ``embed_layer``.

timm's ViT is dimension-agnostic after its patch embedding: the blocks, the class token, the position
embedding (one vector per patch token, ``[1, N, D]``) and the pooling see a token sequence. Giving it a
``Conv3d`` patch embedding (kernel = stride = the patch size, tokens flattened in ``(d, h, w)`` row-major
order -- the order of ``Conv3d(...).flatten(2)`` and of MONAI's ``PatchEmbeddingBlock`` with
``spatial_dims=3``) makes it a volumetric ViT with every hook point the explainers use unchanged.

A checkpoint asks for it with ``architecture: {patch_embed: conv3d, kwargs: {img_size: [D, H, W],
patch_size: [pd, ph, pw], ...}}`` (see :func:`medvit_explain.model.network.build_backbone`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from medvit_explain.errors import CheckpointError

__all__ = ["PATCH_EMBEDS", "PatchEmbed3d", "triple"]

PATCH_EMBEDS = ("conv2d", "conv3d")  # architecture.patch_embed: timm's own (2D) or ours (3D)


def triple(value: Any, what: str) -> tuple[int, int, int]:
    """An int (a cube) or three positive ints ``[D, H, W]``; :class:`CheckpointError` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value, value)
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise CheckpointError(f"{what}: expected a positive integer or three of them [D, H, W], got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])


class PatchEmbed3d(nn.Module):
    """``[B, C, D, H, W]`` → ``[B, gd·gh·gw, embed_dim]``: a ``Conv3d`` with kernel = stride = patch size.

    Attributes timm's ``VisionTransformer`` and the explainers read: ``img_size`` ``(D, H, W)``,
    ``patch_size`` ``(pd, ph, pw)``, ``grid_size`` ``(gd, gh, gw)``, ``num_patches``, ``proj`` (the conv;
    ``proj.in_channels`` is the channel count), ``dynamic_img_size = False``. The input size is fixed:
    another size is refused (the position embedding has one vector per patch of this grid)."""

    dynamic_img_size = False

    def __init__(
        self,
        img_size: Any = 32,
        patch_size: Any = 8,
        in_chans: int = 1,
        embed_dim: int = 768,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        norm_layer: Any = None,
        device: Any = None,
        dtype: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            raise CheckpointError(f"PatchEmbed3d: options {sorted(unused)} are not supported (fixed-size volumes only)")
        if dynamic_img_pad:
            raise CheckpointError("PatchEmbed3d: dynamic_img_pad is not supported: the volume must tile into patches")
        self.img_size = triple(img_size, "img_size")
        self.patch_size = triple(patch_size, "patch_size")
        rest = [s % p for s, p in zip(self.img_size, self.patch_size)]
        if any(rest):
            raise CheckpointError(
                f"img_size {list(self.img_size)} is not a whole number of patches {list(self.patch_size)}"
            )
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.proj = nn.Conv3d(
            in_chans,
            embed_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def feat_ratio(self, as_scalar: bool = True) -> Any:
        return max(self.patch_size) if as_scalar else self.patch_size

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected volumes [B, C, {', '.join(map(str, self.img_size))}], got {tuple(x.shape)}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))
