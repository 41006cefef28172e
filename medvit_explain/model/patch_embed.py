"""``PatchEmbed3d``: the volumetric patch embedding a timm ``VisionTransformer`` takes as ``embed_layer``.

timm's ViT is dimension-agnostic after its patch embedding: the blocks, the class token, the position
embedding (one vector per patch token, ``[1, N, D]``) and the pooling see a token sequence. Giving it a
``Conv3d`` patch embedding (kernel = stride = the patch size, tokens flattened in ``(d, h, w)`` row-major
order -- the order of ``Conv3d(...).flatten(2)`` and of MONAI's ``PatchEmbeddingBlock`` with
``spatial_dims=3``) makes it a volumetric ViT with every hook point the explainers use unchanged.

A checkpoint asks for it with ``architecture: {patch_embed: conv3d, kwargs: {img_size: [D, H, W],
patch_size: [pd, ph, pw], ...}}`` (see :func:`medvit_explain.model.network.build_backbone`).

``ConvStem``: a convolutional stem in place of the patchify convolution (Xiao et al. 2021, "Early
convolutions help transformers see better"): a few 3×3 convolutions with batch norm and ReLU, the last
``log2(patch)`` of them with stride 2, then a 1×1 convolution ``proj`` to the embedding. Each token still
stands for its ``patch × patch`` pixels (same grid, same ``patch_size``), but sees them through
convolutions, which gives a small ViT trained from scratch the locality prior it lacks. A checkpoint asks
for it with ``architecture: {patch_embed: convstem, stem_widths: [32, 32, 64, 96], kwargs: {...}}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from medvit_explain.errors import CheckpointError

__all__ = ["PATCH_EMBEDS", "ConvStem", "PatchEmbed3d", "input_channels", "triple"]

# architecture.patch_embed: timm's own (2D), ours for volumes (3D), or a convolutional stem (2D)
PATCH_EMBEDS = ("conv2d", "conv3d", "convstem")


def input_channels(patch_embed: nn.Module) -> int:
    """The image channels a patch embedding takes: its ``in_chans`` (a stem), else its ``proj`` conv's."""
    chans = getattr(patch_embed, "in_chans", None)
    return int(chans if chans is not None else patch_embed.proj.in_channels)


def triple(value: Any, what: str) -> tuple[int, int, int]:
    """An int (a cube) or three positive ints ``[D, H, W]``; :class:`CheckpointError` otherwise."""
    return _sizes(value, ("D", "H", "W"), what)


def _sizes(value: Any, axes: tuple[str, ...], what: str) -> tuple[int, ...]:
    """An int (the same along every axis) or one positive int per axis; :class:`CheckpointError` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * len(axes)
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != len(axes)
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        count = {2: "two", 3: "three"}[len(axes)]
        raise CheckpointError(
            f"{what}: expected a positive integer or {count} of them [{', '.join(axes)}], got {value!r}"
        )
    return tuple(int(v) for v in value)


def _fixed_size_only(layer: str, unused: dict[str, Any], dynamic_img_pad: bool) -> None:
    """Refuse the timm patch-embedding options a fixed-size embedding does not have."""
    if unused:
        raise CheckpointError(f"{layer}: options {sorted(unused)} are not supported (fixed-size inputs only)")
    if dynamic_img_pad:
        raise CheckpointError(f"{layer}: dynamic_img_pad is not supported: the input must tile into patches")


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
        _fixed_size_only("PatchEmbed3d", unused, dynamic_img_pad)
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


class ConvStem(nn.Module):
    """``[B, C, H, W]`` → ``[B, gh·gw, embed_dim]``: 3×3 convolutions (``widths`` output channels each,
    batch norm, ReLU; the last ``log2(patch)`` with stride 2, the others stride 1), then a 1×1 ``proj``.

    ``patch_size`` must be a power of two (the same along both axes) no larger than ``2 ** len(widths)``
    and tile ``img_size``; the attributes are those of timm's ``PatchEmbed`` (``img_size``, ``patch_size``,
    ``grid_size``, ``num_patches``, ``proj``, ``in_chans``). Fixed input size, as :class:`PatchEmbed3d`."""

    dynamic_img_size = False

    def __init__(
        self,
        img_size: Any = 224,
        patch_size: Any = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        norm_layer: Any = None,
        widths: Sequence[int] = (),
        device: Any = None,
        dtype: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        _fixed_size_only("ConvStem", unused, dynamic_img_pad)
        self.img_size = _sizes(img_size, ("H", "W"), "img_size")
        self.patch_size = _sizes(patch_size, ("H", "W"), "patch_size")
        p = self.patch_size[0]
        halvings = p.bit_length() - 1
        if self.patch_size[1] != p or p != 1 << halvings:
            raise CheckpointError(
                f"ConvStem: patch_size must be one power of two (4, 8, 16), got {list(self.patch_size)}"
            )
        widths = [int(w) for w in widths]
        if len(widths) < halvings or any(w < 1 for w in widths):
            raise CheckpointError(
                f"ConvStem: stem_widths needs at least {halvings} positive channel counts (one per halving of "
                f"patch {p}), got {widths}"
            )
        if any(s % p for s in self.img_size):
            raise CheckpointError(f"img_size {list(self.img_size)} is not a whole number of patches {[p, p]}")
        self.in_chans = int(in_chans)
        self.grid_size = tuple(s // p for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        c_in = self.in_chans
        for i, width in enumerate(widths):
            stride = 2 if i >= len(widths) - halvings else 1
            layers += [
                nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False, device=device, dtype=dtype),
                nn.BatchNorm2d(width, device=device, dtype=dtype),
                nn.ReLU(),
            ]
            c_in = width
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, embed_dim, 1, bias=bias, device=device, dtype=dtype)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def feat_ratio(self, as_scalar: bool = True) -> Any:
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected images [B, C, {', '.join(map(str, self.img_size))}], got {tuple(x.shape)}")
        return self.norm(self.proj(self.stem(x)).flatten(2).transpose(1, 2))
