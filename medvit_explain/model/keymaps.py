"""Key maps from other ViT implementations' state dicts onto timm's ``VisionTransformer`` names (and our
``head.*``): torchvision's ``VisionTransformer`` and MONAI's ``ViT``. The same maths under other names, so
a checkpoint saved by either loads by config (``checkpoint: {source: torchvision | monai}``) and
:func:`medvit_explain.wrap_model` converts a live module."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from medvit_explain.errors import CheckpointError
from medvit_explain.model.patch_embed import triple

_TORCHVISION_VIT = [  # torchvision.models.VisionTransformer → timm VisionTransformer (+ our head)
    (r"^class_token$", "cls_token"),
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
]


def torchvision_vit_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ``VisionTransformer`` state dict under timm's names (the same maths: q, k, v stacked in
    ``in_proj`` in timm's qkv order, LayerNorm and GELU as timm's ViT). A key it does not know (e.g. the
    ``heads.pre_logits`` layer of a representation-size model) is an error naming it."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in _TORCHVISION_VIT:
            new, n = re.subn(pattern, replacement, key)
            if n:
                out[new] = value
                break
        else:
            raise CheckpointError(
                f"checkpoint key {key!r} is not part of a torchvision VisionTransformer this tool maps "
                "(class token, conv_proj, encoder, heads.head); use source: timm with strip_prefix/rename"
            )
    return out


def monai_vit_keys(
    state: Mapping[str, Tensor],
    num_heads: int,
    patch_size: int | Sequence[int],
    in_chans: int,
    proj_type: str | None = "conv",
) -> dict[str, Tensor]:
    """A MONAI ``ViT`` state dict (2D or 3D, ``classification=True``) under timm's names, head as ``head.*``.

    * ``patch_embedding.patch_embeddings.*``: the Conv2d/Conv3d as is (``proj_type="conv"``); for
      ``"perceptron"`` (``Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)")`` + Linear) the Linear's
      weight ``[D, p1·p2·C]`` becomes the conv's ``[D, C, p1, p2]`` (3D: ``[D, p1·p2·p3·C]`` →
      ``[D, C, p1, p2, p3]``). ``patch_size``: 2 (or 3) ints. ``proj_type=None``: read it from the keys.
    * ``patch_embedding.position_embeddings`` → ``pos_embed`` (patch tokens only: timm ``no_embed_class``).
    * ``blocks.N.attn.qkv`` → ``blocks.N.attn.qkv`` unchanged: MONAI's rows are ordered (q|k|v, head,
      head_dim) exactly as timm's ``reshape(B, N, 3, num_heads, head_dim)`` reads them; separate
      ``to_q``/``to_k``/``to_v`` (``use_combined_linear=False``) are stacked in that order.
    * ``blocks.N.attn.out_proj`` → ``attn.proj``; a block with attention weights but no ``out_proj``
      (``include_fc=False``) gets an identity projection with zero bias.
    * ``mlp.linear1/linear2`` → ``mlp.fc1/fc2``; ``norm1``, ``norm2``, ``norm``, ``cls_token`` keep their names.
    * ``blocks.N.norm_cross_attn.*`` / ``cross_attn.*`` are dropped: the ViT never uses cross attention
      (old MONAI versions saved an unused cross-attention block).
    * ``classification_head.0.*`` (Linear before Tanh) or ``classification_head.*`` → ``head.*``.

    A key it does not know, or a shape that does not fit ``num_heads``/``patch_size``/``in_chans``, is a
    :class:`CheckpointError` naming it.
    """
    patch = patch_dims(patch_size, "patch_size")
    if proj_type is None:
        proj_type = "perceptron" if "patch_embedding.patch_embeddings.1.weight" in state else "conv"
    if proj_type not in ("conv", "perceptron"):
        raise CheckpointError(f"MONAI ViT proj_type: expected 'conv' or 'perceptron', got {proj_type!r}")
    out: dict[str, Tensor] = {}
    separate: dict[str, dict[str, Tensor]] = {}  # blocks.N.attn. → {"q.weight": ...}
    attention_blocks: set[str] = set()
    projected_blocks: set[str] = set()
    for key, value in state.items():
        if re.match(r"^blocks\.\d+\.(?:norm_cross_attn|cross_attn)\.", key):
            continue  # unused by the ViT (see the docstring)
        if key.startswith("patch_embedding.patch_embeddings."):
            out.update(_monai_patch_embedding(key, value, proj_type, patch, in_chans))
            continue
        block = re.match(r"^(blocks\.\d+\.attn\.)(to_q|to_k|to_v)\.(weight|bias)$", key)
        if block:
            separate.setdefault(block.group(1), {})[f"{block.group(2)[-1]}.{block.group(3)}"] = value
            attention_blocks.add(block.group(1))
            continue
        for pattern, replacement in _MONAI_VIT:
            new, n = re.subn(pattern, replacement, key)
            if n:
                out[new] = value
                break
        else:
            raise CheckpointError(
                f"checkpoint key {key!r} is not part of a MONAI ViT this tool maps (cls_token, patch_embedding, "
                "blocks.N.{norm1, attn.qkv/to_q/to_k/to_v/out_proj, norm2, mlp.linear1/linear2}, norm, "
                "classification_head); a causal mask, relative position embedding or cross attention is not supported"
            )
        attn = re.match(r"^(blocks\.\d+\.attn\.)(qkv|proj)\.", new)
        if attn:
            (attention_blocks if attn.group(2) == "qkv" else projected_blocks).add(attn.group(1))
    for prefix, parts in separate.items():
        for kind in ("weight", "bias"):
            found = [parts.get(f"{c}.{kind}") for c in "qkv"]
            if all(t is None for t in found):
                continue
            if any(t is None for t in found):
                raise CheckpointError(f"checkpoint has only some of {prefix}to_q/to_k/to_v.{kind}; expected all three")
            out[f"{prefix}qkv.{kind}"] = torch.cat(found, 0)
    for prefix in sorted(attention_blocks - projected_blocks):  # include_fc=False: out_proj is Identity
        qkv = out.get(f"{prefix}qkv.weight")
        if qkv is None:
            raise CheckpointError(f"checkpoint has {prefix}qkv.bias but no {prefix}qkv.weight")
        width = qkv.shape[1]
        out[f"{prefix}proj.weight"] = torch.eye(width, dtype=qkv.dtype, device=qkv.device)
        out[f"{prefix}proj.bias"] = torch.zeros(width, dtype=qkv.dtype, device=qkv.device)
    for prefix in sorted(attention_blocks):
        rows, width = out[f"{prefix}qkv.weight"].shape
        if rows != 3 * width or width % num_heads:
            raise CheckpointError(
                f"{prefix}qkv.weight has shape [{rows}, {width}]; expected [3·D, D] with D divisible by "
                f"num_heads={num_heads} (MONAI's dim_head/hidden_input_size variants are not supported)"
            )
    return out


_MONAI_VIT = [  # MONAI ViT → timm VisionTransformer (+ our head); the patch embedding is handled apart
    (r"^cls_token$", "cls_token"),
    (r"^patch_embedding\.position_embeddings$", "pos_embed"),
    (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^blocks\.(\d+)\.attn\.out_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^blocks\.(\d+)\.mlp\.linear1\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (r"^blocks\.(\d+)\.mlp\.linear2\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
    (r"^classification_head\.(?:0\.)?(weight|bias)$", r"head.\1"),
]


def _monai_patch_embedding(
    key: str, value: Tensor, proj_type: str, patch: tuple[int, ...], in_chans: int
) -> dict[str, Tensor]:
    suffix = key.removeprefix("patch_embedding.patch_embeddings.")
    shown = "×".join(map(str, patch))
    if proj_type == "conv":
        if suffix not in ("weight", "bias"):
            raise CheckpointError(
                f"checkpoint key {key!r} does not belong to a conv patch embedding (proj_type='conv')"
            )
        if suffix == "weight" and tuple(value.shape[1:]) != (in_chans, *patch):
            raise CheckpointError(
                f"{key} has shape {list(value.shape)}; expected [D, {in_chans}, {', '.join(map(str, patch))}] "
                f"(a {len(patch)}D conv patch embedding, patch {shown})"
            )
        return {f"patch_embed.proj.{suffix}": value}
    if suffix not in ("1.weight", "1.bias"):
        raise CheckpointError(
            f"checkpoint key {key!r} does not belong to a perceptron patch embedding (proj_type='perceptron')"
        )
    if suffix == "1.bias":
        return {"patch_embed.proj.bias": value}
    n = math.prod(patch) * in_chans
    if value.ndim != 2 or value.shape[1] != n:
        raise CheckpointError(
            f"{key} has shape {list(value.shape)}; expected [D, {n}] (patch {shown} × {in_chans} channel(s))"
        )
    # the Linear reads each patch flattened as (p1, p2[, p3], c); the conv's weight is [D, c, p1, p2[, p3]]
    conv = value.reshape(value.shape[0], *patch, in_chans)
    return {"patch_embed.proj.weight": conv.movedim(-1, 1).contiguous()}


def monai_key_name(key: str) -> str:
    """Where one MONAI ViT key lands among ours, for listing (``to_q``/``to_k``/``to_v`` are merged into
    ``qkv`` and cross-attention keys dropped by :func:`monai_vit_keys`; they are named as they come)."""
    if key.startswith("patch_embedding.patch_embeddings."):
        suffix = key.removeprefix("patch_embedding.patch_embeddings.").removeprefix("1.")
        return f"backbone.patch_embed.proj.{suffix}"
    for pattern, replacement in _MONAI_VIT:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new if new.startswith("head.") else f"backbone.{new}"
    return f"backbone.{key}"


def patch_dims(value: Any, what: str) -> tuple[int, ...]:
    """A 2D ``pair`` or three ints (a 3D patch, :func:`~medvit_explain.model.patch_embed.triple`)."""
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3:
        return triple(value, what)
    return pair(value, what)


def pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise CheckpointError(f"{what}: expected an integer or [H, W], got {value!r}")
