"""``wrap_model``: a ViT that is not a timm-built :class:`MedViT` becomes one the explainers accept.

Accepted modules (each with its own classification head of K outputs):

* a timm ``VisionTransformer`` (``num_classes=K``): described by its timm name and constructor kwargs;
* a torchvision ``VisionTransformer``: the same maths as timm's ViT (class token with a position
  embedding, q/k/v with biases stacked as timm stacks them, LayerNorm eps taken from the module, exact GELU);
* MONAI's ``ViT`` (``spatial_dims=2`` or ``3``, ``classification=True``; a 3D one becomes a volumetric
  ViT, ``architecture.patch_embed: conv3d``, inputs ``[B, C, D, H, W]``): position embeddings on the patch tokens
  only and the class token prepended afterwards (timm ``no_embed_class=True``), LayerNorm eps 1e-5
  (``architecture.norm_eps``), qkv rows already in timm's ``(q|k|v, head, head_dim)`` order
  (``Rearrange("b h (qkv l d) -> qkv b l h d")`` = ``reshape(B, N, 3, heads, head_dim)``), exact GELU.

What comes back is built from its config exactly as :func:`medvit_explain.model.load_model` builds it
(``build_backbone`` + ``MedViT``), the weights copied in, then checked: every key and shape, and the
outputs on a random batch against the original module's own forward. The user's module is never
changed (its train/eval flags are restored after the check). ``save_checkpoint(wrap_model(m), dir)``
then ``load_model(dir)`` gives the same outputs.

:func:`monai_vit_keys` maps a MONAI ViT state dict onto timm's names (what ``checkpoint: {source:
monai}`` uses), as :func:`medvit_explain.model.checkpoint.torchvision_vit_keys` does for torchvision.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from medvit_explain.errors import CheckpointError, ModelNotSupportedError
from medvit_explain.model.checkpoint import state_mismatch
from medvit_explain.model.keymaps import monai_vit_keys, pair, torchvision_vit_keys
from medvit_explain.model.network import MedViT, build_backbone
from medvit_explain.model.patch_embed import ConvStem, PatchEmbed3d, input_channels, triple
from medvit_explain.model.task import TaskSpec, load_task_spec

__all__ = ["monai_vit_keys", "wrap_model"]

EXPECTED = (
    "expected a timm VisionTransformer, a torchvision VisionTransformer or MONAI's ViT (2D or 3D, classification=True)"
)
GENERIC_TIMM_NAME = "vit_base_patch16_224"  # every size kwarg is given, so any plain ViT entry point works
TIMM_EPS = 1e-6  # timm's ViT LayerNorm eps; anything else goes to architecture.norm_eps
# How far the wrapped model's outputs may be from the original's on the check batch, relative to
# max(1, max |output|): the same maths in another op order differs by ~1e-6 in float32 (more with TF32
# convolutions on a GPU); a wrong mapping differs by orders of magnitude more.
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_LOW_PRECISION_TOLERANCE = 5e-2


@dataclass
class _Description:
    """A module described as a timm architecture + a state dict under timm names (head as ``head.*``)."""

    kind: str  # "timm" | "torchvision" | "monai"
    architecture: dict[str, Any]
    state: dict[str, Tensor]
    num_outputs: int
    reference_head: nn.Module  # the original's Linear whose output our head reproduces
    provenance: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- public


def wrap_model(
    module: nn.Module,
    targets: Sequence[str] | None = None,
    *,
    task_spec: Any = None,
    preprocessing: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> MedViT:
    """A :class:`MedViT` computing what ``module`` computes, in eval mode on ``module``'s device.

    ``module``: a timm ``VisionTransformer`` with its head (``num_classes=K``), a torchvision
    ``VisionTransformer`` (no ``representation_size``), MONAI's ``ViT`` (``spatial_dims=2`` or ``3``,
    ``classification=True``) or a :class:`MedViT` (returned as it is).

    MONAI's ``classification_head`` is ``Sequential(Linear, Tanh)`` by default (``post_activation="Tanh"``):
    the wrapped model's head is that Linear, so its outputs -- and every explanation -- are the
    **pre-Tanh** logits (tanh is monotone; the Tanh would squash the gradients the methods use). MONAI's
    ``hidden_states_out`` are not returned (``model.backbone.forward_intermediates`` gives them),
    ``save_attn`` has no effect on the outputs and is dropped (the explainers capture attention
    themselves), dropout rates are kept for training and are inactive in eval mode, and fixed
    (``sincos``/``fourier``) position embeddings are copied as values into timm's ``pos_embed`` (identical
    outputs; freeze ``backbone.pos_embed`` if you fine-tune). MONAI records no image size: it is the patch
    grid (a square one, or a cube in 3D, from the number of patches) times the patch size unless
    ``preprocessing["image_size"]`` (``[D, H, W]`` in 3D) says otherwise.

    ``targets``: names for the K outputs (binary targets), or ``task_spec``: anything
    :func:`~medvit_explain.model.task.load_task_spec` takes (``"lidc"``, a path, a dict) whose head has K
    outputs (a softmax target counts one per class: a ``num_classes=2`` classifier trained with cross
    entropy is ``{"targets": [{"name": "malignancy", "kind": "softmax", "classes": ["benign", "malignant"],
    "positive": "malignant"}]}``, explained by z_malignant − z_benign); neither → binary targets
    ``output_0 … output_{K-1}``. ``preprocessing``: the dict
    :func:`~medvit_explain.model.preprocessing.validate_preprocessing` takes (``image_size``/``in_chans``
    from the module when not given). ``name``: the config's name (default ``<library>-<class>``).

    Raises :class:`ModelNotSupportedError` naming the part of the module that cannot be expressed, and
    :class:`CheckpointError` for a task spec or preprocessing that does not fit the module.
    """
    if targets is not None and task_spec is not None:
        raise TypeError("wrap_model: pass targets (names) or task_spec, not both")
    if preprocessing is not None and not isinstance(preprocessing, Mapping):
        raise CheckpointError(f"preprocessing: expected a mapping, got {type(preprocessing).__name__}")
    if isinstance(module, MedViT):
        return _as_is(module, targets, task_spec, preprocessing, name)
    description = _describe(module, preprocessing)
    spec = _task_spec(targets, task_spec, description.num_outputs)
    arch = description.architecture
    backbone = build_backbone(
        arch["timm_name"],
        arch["kwargs"],
        arch.get("norm_eps"),
        arch.get("patch_embed", "conv2d"),
        arch.get("stem_widths"),
    )
    if description.kind == "timm":
        _compare_structure(backbone, module, arch)
    config = {
        "name": name or f"{type(module).__module__.split('.')[0]}-{type(module).__name__}",
        "architecture": arch,
        "provenance": description.provenance,
    }
    model = MedViT(backbone, spec, preprocessing=preprocessing, config=config)
    _load(model, description.state, arch)
    reference = next(module.parameters())
    model = model.to(device=reference.device, dtype=reference.dtype).eval()
    _check_outputs(module, model, description)
    return model


# ---------------------------------------------------------------------------------------- describing


def _loaded_class(module_name: str, class_name: str) -> type | None:
    """The class if its library is already imported (an instance of it can only exist then)."""
    mod = sys.modules.get(module_name)
    return getattr(mod, class_name, None) if mod is not None else None


def _describe(module: Any, preprocessing: Mapping[str, Any] | None) -> _Description:
    tv_vit = _loaded_class("torchvision.models.vision_transformer", "VisionTransformer")
    monai_vit = _loaded_class("monai.networks.nets.vit", "ViT")
    try:
        if isinstance(module, VisionTransformer):
            return _describe_timm(module)
        if tv_vit is not None and isinstance(module, tv_vit):
            return _describe_torchvision(module)
        if monai_vit is not None and isinstance(module, monai_vit):
            return _describe_monai(module, preprocessing)
    except AttributeError as exc:  # a subclass or a swapped sub-module without the usual attributes
        raise ModelNotSupportedError(
            f"{type(module).__name__} does not have the layout its library builds ({exc}); {EXPECTED}"
        ) from None
    raise ModelNotSupportedError(f"{EXPECTED}; got {type(module).__name__}")


def _provenance(module: nn.Module, **notes: Any) -> dict[str, Any]:
    cls = type(module)
    return {"wrapped_from": f"{cls.__module__}.{cls.__qualname__}", **notes}


def _layer_norm_eps(modules: Sequence[nn.Module], where: str) -> float:
    """The one eps of ``modules`` (each must be an ``nn.LayerNorm``)."""
    for m in modules:
        if not isinstance(m, nn.LayerNorm):
            raise ModelNotSupportedError(f"{where}: expected LayerNorm layers, got {type(m).__name__}")
    eps = {float(m.eps) for m in modules}
    if len(eps) != 1:
        raise ModelNotSupportedError(f"{where}: LayerNorms with different eps {sorted(eps)} cannot be expressed")
    return eps.pop()


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio for which timm's ``int(width * ratio)`` gives back ``hidden``."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _drop_rates(**rates: float) -> dict[str, float]:
    return {k: float(v) for k, v in rates.items() if v}


def _architecture(timm_name: str, kwargs: dict[str, Any], eps: float) -> dict[str, Any]:
    arch: dict[str, Any] = {"timm_name": timm_name, "kwargs": kwargs}
    if not math.isclose(eps, TIMM_EPS, rel_tol=0, abs_tol=1e-12):
        arch["norm_eps"] = eps
    return arch


# -- timm -------------------------------------------------------------------------------------------
_ACT_NAMES = {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "ReLU": "relu"}


def _describe_timm(vit: VisionTransformer) -> _Description:
    if getattr(vit, "dist_token", None) is not None:
        raise ModelNotSupportedError(
            f"{type(vit).__name__} has a distillation token and a second head (head_dist); "
            "one linear head cannot express the average of two"
        )
    if getattr(vit, "cls_token", None) is None:
        raise ModelNotSupportedError(
            "timm VisionTransformer without a class token (class_token=False): the explainers need one"
        )
    if not isinstance(vit.head, nn.Linear):
        what = (
            "no head (num_classes=0): build it with num_classes=K"
            if isinstance(vit.head, nn.Identity)
            else (f"a {type(vit.head).__name__} head; expected an nn.Linear")
        )
        raise ModelNotSupportedError(f"timm VisionTransformer has {what}")
    if not len(vit.blocks):
        raise ModelNotSupportedError("timm VisionTransformer has no blocks")
    pe, blk = vit.patch_embed, vit.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    if pe.img_size is None:
        raise ModelNotSupportedError("timm VisionTransformer without a fixed img_size cannot be described")
    kwargs: dict[str, Any] = {
        "img_size": [int(s) for s in pe.img_size],
        "patch_size": [int(s) for s in pe.patch_size],
        "in_chans": input_channels(pe),
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
        "num_heads": int(attn.num_heads),
        "mlp_ratio": _mlp_ratio(int(mlp.fc1.out_features), int(vit.embed_dim)),
        "qkv_bias": attn.qkv.bias is not None,
        "class_token": True,
        "no_embed_class": bool(vit.no_embed_class),
        "reg_tokens": int(vit.num_reg_tokens),
        "global_pool": vit.global_pool,
    }
    identity = nn.Identity
    has_fc_norm = not isinstance(vit.fc_norm, identity)
    has_norm = not isinstance(vit.norm, identity)
    extra: dict[str, Any] = {
        "qk_norm": not isinstance(attn.q_norm, identity),
        "scale_attn_norm": not isinstance(getattr(attn, "norm", identity()), identity),
        "scale_mlp_norm": not isinstance(getattr(mlp, "norm", identity()), identity),
        "proj_bias": attn.proj.bias is not None,
        # LayerScale keeps its init value (the gammas themselves come with the weights)
        "init_values": None if isinstance(blk.ls1, identity) else float(getattr(blk.ls1, "init_values", 1e-5)),
        "pos_embed": "learn" if vit.pos_embed is not None else "none",
        "pre_norm": not isinstance(vit.norm_pre, identity),
        "final_norm": has_norm or has_fc_norm,
        "fc_norm": has_fc_norm,
        "pool_include_prefix": bool(getattr(vit, "pool_include_prefix", False)),
        "dynamic_img_size": bool(vit.dynamic_img_size),
        "dynamic_img_pad": bool(getattr(pe, "dynamic_img_pad", False)),
    }
    defaults = {
        "qk_norm": False,
        "scale_attn_norm": False,
        "scale_mlp_norm": False,
        "proj_bias": True,
        "init_values": None,
        "pos_embed": "learn",
        "pre_norm": False,
        "final_norm": True,
        "fc_norm": vit.global_pool in ("avg", "avgmax", "max"),
        "pool_include_prefix": vit.global_pool == "prr",
        "dynamic_img_size": False,
        "dynamic_img_pad": False,
    }
    kwargs.update({k: v for k, v in extra.items() if v != defaults[k]})
    act = _ACT_NAMES.get(type(mlp.act).__name__)
    if act is not None:
        kwargs["act_layer"] = act
    if not isinstance(pe.norm, identity):
        kwargs["embed_norm_layer"] = "layernorm"
    patch_drop = getattr(vit.patch_drop, "prob", 0.0)
    last = vit.blocks[-1].drop_path1
    kwargs.update(
        _drop_rates(
            drop_rate=vit.head_drop.p,
            pos_drop_rate=vit.pos_drop.p,
            patch_drop_rate=patch_drop,
            proj_drop_rate=attn.proj_drop.p,
            attn_drop_rate=attn.attn_drop.p,
            drop_path_rate=getattr(last, "drop_prob", 0.0),
        )
    )
    norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    eps = _layer_norm_eps(norms, "timm VisionTransformer") if norms else TIMM_EPS
    timm_name = _timm_name(vit)
    state = {k: v for k, v in vit.state_dict().items()}
    arch = _architecture(timm_name, kwargs, eps)
    if isinstance(pe, PatchEmbed3d):  # a timm ViT given our volumetric patch embedding
        arch["patch_embed"] = "conv3d"
    elif isinstance(pe, ConvStem):  # or our convolutional stem
        arch["patch_embed"] = "convstem"
        arch["stem_widths"] = [int(m.out_channels) for m in pe.stem if isinstance(m, nn.Conv2d)]
    return _Description(
        "timm",
        arch,
        state,
        int(vit.head.out_features),
        vit.head,
        _provenance(vit),
    )


def _timm_name(vit: VisionTransformer) -> str:
    import timm

    cfg = getattr(vit, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    return name if isinstance(name, str) and timm.is_model(name) else GENERIC_TIMM_NAME


_IGNORED_ATTRS = {"training", "fused_attn", "num_classes", "weight_init_mode", "fix_init", "grad_checkpointing"}


def _simple_attrs(module: nn.Module) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and k not in _IGNORED_ATTRS and isinstance(v, (bool, int, float, str, tuple))
    }


def _compare_structure(built: nn.Module, original: nn.Module, arch: Mapping[str, Any]) -> None:
    """``ModelNotSupportedError`` naming the first part where ``built`` (from ``arch``) and ``original``
    differ: a sub-module's type or settings, a tensor's name or shape, or a plain attribute."""
    what = f"its description (timm_name {arch['timm_name']!r} + kwargs)"
    ours = {n: m for n, m in built.named_modules() if n != "head"}
    theirs = {n: m for n, m in original.named_modules() if n != "head"}
    for name in theirs:
        if name not in ours:
            raise ModelNotSupportedError(
                f"timm VisionTransformer part {name!r} ({type(theirs[name]).__name__}) cannot be described: "
                f"{what} does not build it"
            )
    for name, mine in ours.items():
        other = theirs.get(name)
        label = name or "(the model)"
        if other is None:
            raise ModelNotSupportedError(f"timm VisionTransformer has no {label!r}, which {what} builds")
        if type(other) is not type(mine) or other.extra_repr() != mine.extra_repr():
            raise ModelNotSupportedError(
                f"timm VisionTransformer part {label!r} is {type(other).__name__}({other.extra_repr()}); "
                f"{what} builds {type(mine).__name__}({mine.extra_repr()})"
            )
        a, b = _simple_attrs(other), _simple_attrs(mine)
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                raise ModelNotSupportedError(
                    f"timm VisionTransformer part {label!r} has {key}={a.get(key)!r}; {what} gives {b.get(key)!r}"
                )


# -- torchvision ------------------------------------------------------------------------------------
def _describe_torchvision(tv: nn.Module) -> _Description:
    heads = tv.heads
    if getattr(tv, "representation_size", None) is not None or hasattr(heads, "pre_logits"):
        raise ModelNotSupportedError(
            f"torchvision VisionTransformer with representation_size={tv.representation_size} has a pre-logits "
            "layer (heads.pre_logits + Tanh) before its head; only one linear head is supported: "
            "build it with representation_size=None"
        )
    if not isinstance(getattr(heads, "head", None), nn.Linear) or len(heads) != 1:
        raise ModelNotSupportedError("torchvision VisionTransformer: expected heads to hold one Linear 'head'")
    conv = tv.conv_proj
    p = int(tv.patch_size)
    if not isinstance(conv, nn.Conv2d):
        raise ModelNotSupportedError(
            "torchvision VisionTransformer with conv_stem_configs (a convolutional stem) is not supported: "
            "timm's ViT embeds patches with one convolution"
        )
    if tuple(conv.kernel_size) != (p, p) or tuple(conv.stride) != (p, p) or conv.bias is None:
        raise ModelNotSupportedError(
            f"torchvision VisionTransformer conv_proj {conv}: expected a Conv2d with kernel = stride = "
            f"patch_size {p} and a bias"
        )
    layers = list(tv.encoder.layers)
    if not layers:
        raise ModelNotSupportedError("torchvision VisionTransformer has no encoder layers")
    for i, layer in enumerate(layers):
        mha = layer.self_attention
        if (
            mha.in_proj_weight is None
            or mha.in_proj_bias is None
            or mha.bias_k is not None
            or mha.add_zero_attn
            or mha.out_proj.bias is None
        ):
            raise ModelNotSupportedError(
                f"torchvision encoder_layer_{i}.self_attention: expected nn.MultiheadAttention with one in_proj "
                "(q, k, v of equal size) with biases, no bias_k/bias_v and no add_zero_attn"
            )
        act = layer.mlp[1]
        if not isinstance(act, nn.GELU) or act.approximate != "none":
            raise ModelNotSupportedError(f"torchvision encoder_layer_{i}.mlp: expected an exact GELU, got {act}")
    norms = [m for layer in layers for m in (layer.ln_1, layer.ln_2)] + [tv.encoder.ln]
    eps = _layer_norm_eps(norms, "torchvision VisionTransformer norm_layer")
    width = int(tv.hidden_dim)
    kwargs: dict[str, Any] = {
        "img_size": [int(tv.image_size)] * 2,
        "patch_size": [p, p],
        "in_chans": int(conv.in_channels),
        "embed_dim": width,
        "depth": len(layers),
        "num_heads": int(layers[0].self_attention.num_heads),
        "mlp_ratio": _mlp_ratio(int(tv.mlp_dim), width),
        "qkv_bias": True,
        "class_token": True,
        "no_embed_class": False,
        "reg_tokens": 0,
        "global_pool": "token",
    }
    # torchvision drops after the position embedding, the attention output and both MLP layers (= timm's
    # pos_drop, attn.proj_drop, mlp.drop1/drop2) and inside the attention weights (= attn.attn_drop)
    kwargs.update(_drop_rates(pos_drop_rate=tv.dropout, proj_drop_rate=tv.dropout, attn_drop_rate=tv.attention_dropout))
    state = torchvision_vit_keys(dict(tv.state_dict()))
    return _Description(
        "torchvision",
        _architecture(GENERIC_TIMM_NAME, kwargs, eps),
        state,
        int(heads.head.out_features),
        heads.head,
        _provenance(tv),
    )


# -- MONAI ------------------------------------------------------------------------------------------
def _describe_monai(vit: nn.Module, preprocessing: Mapping[str, Any] | None) -> _Description:
    pe = vit.patch_embedding
    embed = pe.patch_embeddings
    if isinstance(embed, (nn.Conv2d, nn.Conv3d)):
        proj_type = "conv"
        patch = tuple(int(k) for k in embed.kernel_size)
        in_chans = int(embed.in_channels)
        if tuple(embed.stride) != patch:
            raise ModelNotSupportedError(f"MONAI ViT patch embedding {embed}: expected stride = kernel size")
    elif isinstance(embed, nn.Sequential) and len(embed) == 2 and isinstance(embed[1], nn.Linear):
        proj_type = "perceptron"
        lengths = dict(getattr(embed[0], "axes_lengths", {}) or {})
        patch = tuple(int(lengths.get(f"p{i + 1}", 0)) for i in range(len(lengths)))
        in_chans = int(embed[1].in_features) // max(1, math.prod(patch))
    else:
        raise ModelNotSupportedError(
            f"MONAI ViT patch embedding {type(embed).__name__}: expected proj_type 'conv' or 'perceptron'"
        )
    spatial_dims = len(patch)
    if spatial_dims not in (2, 3) or not all(patch):
        raise ModelNotSupportedError(f"MONAI ViT with a {spatial_dims}D patch embedding {patch} is not supported")
    if not getattr(vit, "classification", False) or not hasattr(vit, "classification_head"):
        raise ModelNotSupportedError(
            "MONAI ViT with classification=False has no head: pass classification=True (and num_classes=K)"
        )
    head, provenance = _monai_head(vit.classification_head)
    blocks = list(vit.blocks)
    if not blocks:
        raise ModelNotSupportedError("MONAI ViT has no blocks")
    width = int(vit.norm.normalized_shape[0])
    act_layer = None
    for i, blk in enumerate(blocks):
        act_layer = _check_monai_block(i, blk, width)
    num_heads = int(blocks[0].attn.num_heads)
    mlp_dim = int(blocks[0].mlp.linear1.out_features)
    if pe.pos_embed_type != "learnable":
        provenance["position_embeddings"] = f"{pe.pos_embed_type} (copied as values into pos_embed)"
    n_patches = int(pe.position_embeddings.shape[1])
    img_size = _monai_image_size(n_patches, patch, preprocessing)
    norms = [m for blk in blocks for m in (blk.norm1, blk.norm2)] + [vit.norm]
    eps = _layer_norm_eps(norms, "MONAI ViT")
    kwargs: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": list(patch),
        "in_chans": in_chans,
        "embed_dim": width,
        "depth": len(blocks),
        "num_heads": num_heads,
        "mlp_ratio": _mlp_ratio(mlp_dim, width),
        "qkv_bias": _monai_qkv_bias(blocks[0].attn),
        "class_token": True,
        "no_embed_class": True,  # MONAI adds position embeddings to the patches, then prepends the class token
        "reg_tokens": 0,
        "global_pool": "token",
    }
    if act_layer is not None:
        kwargs["act_layer"] = act_layer
    # MONAI's one dropout_rate drops after the position embedding, in the attention weights, after the
    # attention output and after both MLP layers: timm's pos_drop, attn_drop, proj_drop (attn and mlp)
    p = float(pe.dropout.p)
    kwargs.update(_drop_rates(pos_drop_rate=p, proj_drop_rate=p, attn_drop_rate=p))
    state = monai_vit_keys(vit.state_dict(), num_heads, patch, in_chans, proj_type)
    arch = _architecture(GENERIC_TIMM_NAME, kwargs, eps)
    if spatial_dims == 3:
        arch["patch_embed"] = "conv3d"
    return _Description(
        "monai",
        arch,
        state,
        int(head.out_features),
        head,
        _provenance(vit, **provenance),
    )


def _monai_head(head: nn.Module) -> tuple[nn.Linear, dict[str, Any]]:
    if isinstance(head, nn.Linear):
        return head, {}
    if (
        isinstance(head, nn.Sequential)
        and len(head) == 2
        and isinstance(head[0], nn.Linear)
        and isinstance(head[1], nn.Tanh)
    ):
        return head[0], {"head": "classification_head[0]: the pre-Tanh logits (post_activation='Tanh' dropped)"}
    raise ModelNotSupportedError(
        f"MONAI ViT classification_head {head}: expected a Linear, or Linear + Tanh (post_activation='Tanh')"
    )


def _monai_qkv_bias(attn: nn.Module) -> bool:
    linear = attn.qkv if attn.use_combined_linear else attn.to_q
    return linear.bias is not None


def _check_monai_block(i: int, blk: nn.Module, width: int) -> str | None:
    """Refuse what timm's Block cannot compute; returns the timm act_layer name (None = exact GELU)."""
    where = f"MONAI ViT blocks[{i}]"
    if getattr(blk, "with_cross_attention", False):
        raise ModelNotSupportedError(f"{where}: with_cross_attention=True is not supported (no context in a ViT)")
    attn, mlp = blk.attn, blk.mlp
    if getattr(attn, "causal", False):
        raise ModelNotSupportedError(f"{where}.attn: causal=True (masked attention) is not supported")
    if getattr(attn, "rel_positional_embedding", None) is not None:
        raise ModelNotSupportedError(f"{where}.attn: rel_pos_embedding is not supported by timm's Attention")
    if getattr(attn, "attention_dtype", None) is not None:
        raise ModelNotSupportedError(
            f"{where}.attn: attention_dtype={attn.attention_dtype} (attention in another dtype) is not supported"
        )
    if int(attn.inner_dim) != width or int(attn.hidden_input_size) != width:
        raise ModelNotSupportedError(
            f"{where}.attn: dim_head / hidden_input_size giving an inner width {attn.inner_dim} ≠ hidden_size "
            f"{width} is not supported (timm's Attention has head_dim = hidden_size / num_heads)"
        )
    if attn.use_combined_linear:
        if not isinstance(attn.qkv, nn.Linear):
            raise ModelNotSupportedError(f"{where}.attn.qkv: expected a Linear, got {type(attn.qkv).__name__}")
    else:
        biases = {m.bias is not None for m in (attn.to_q, attn.to_k, attn.to_v)}
        if len(biases) != 1:
            raise ModelNotSupportedError(f"{where}.attn: to_q/to_k/to_v with and without biases mixed")
    if attn.use_flash_attention and float(attn.dropout_rate) > 0:
        raise ModelNotSupportedError(
            f"{where}.attn: use_flash_attention=True with dropout_rate={attn.dropout_rate}: MONAI then drops "
            "attention weights even in eval mode, so the module's outputs are random; set dropout_rate=0"
        )
    act = mlp.fn
    if not isinstance(act, nn.GELU) or mlp.linear1.out_features != mlp.linear2.in_features:
        raise ModelNotSupportedError(f"{where}.mlp: activation {act} is not supported; expected GELU")
    return None if act.approximate == "none" else "gelu_tanh"


def _monai_image_size(n_patches: int, patch: tuple[int, ...], preprocessing: Mapping[str, Any] | None) -> list[int]:
    """The input size: ``preprocessing["image_size"]`` when given (checked against the position
    embeddings), else a square (2D) or cubic (3D) grid of ``n_patches`` times the patch size."""
    dims = len(patch)
    layout = "[D, H, W]" if dims == 3 else "[H, W]"
    given = (preprocessing or {}).get("image_size")
    if given is not None:
        size = triple(given, "preprocessing image_size") if dims == 3 else pair(given, "preprocessing image_size")
        grid = [s // p for s, p in zip(size, patch)]
        if math.prod(grid) != n_patches:
            raise CheckpointError(
                f"preprocessing image_size {list(size)} with patch {'×'.join(map(str, patch))} gives "
                f"{math.prod(grid)} patches; the MONAI ViT has position embeddings for {n_patches}"
            )
        return list(size)
    side = round(n_patches ** (1 / dims))
    if side**dims != n_patches:
        raise ModelNotSupportedError(
            f"MONAI's ViT does not record its image size and its {n_patches} patches are not a "
            f"{'cubic' if dims == 3 else 'square'} grid: pass preprocessing={{'image_size': {layout}}}"
        )
    return [side * p for p in patch]


# ------------------------------------------------------------------------------------------ building


def _task_spec(targets: Sequence[str] | None, task_spec: Any, k: int) -> TaskSpec:
    if task_spec is not None:
        spec = load_task_spec(task_spec)
        width = int(getattr(spec, "output_width", len(spec)))
        if width != k:
            raise CheckpointError(
                f"task spec has {width} outputs ({', '.join(spec.names)}) but the module has {k}; "
                f"expected a task spec with {k}"
            )
        return spec
    if targets is None:
        names = [f"output_{i}" for i in range(k)]
    else:
        if isinstance(targets, str) or not isinstance(targets, Sequence):
            raise CheckpointError(f"targets: expected a list of {k} names, got {targets!r}")
        names = list(targets)
        if len(names) != k:
            raise CheckpointError(f"targets: expected {k} names (one per module output), got {len(names)}: {names}")
    return TaskSpec.from_dict([{"name": n, "kind": "binary"} for n in names])


def _as_is(
    model: MedViT, targets: Sequence[str] | None, task_spec: Any, preprocessing: Any, name: str | None
) -> MedViT:
    if preprocessing is not None or name is not None:
        raise TypeError("wrap_model: a MedViT carries its own preprocessing and name; build it with them instead")
    k = int(getattr(model.task_spec, "output_width", len(model.task_spec)))
    if targets is not None or task_spec is not None:
        spec = _task_spec(targets, task_spec, k)
        if spec.to_dict()["targets"] != model.task_spec.to_dict()["targets"]:
            raise CheckpointError(
                f"the MedViT's targets are {model.targets}; got a different task spec ({spec.names}): "
                "wrap_model does not relabel a MedViT"
            )
    return model


def _load(model: MedViT, state: Mapping[str, Tensor], arch: Mapping[str, Any]) -> None:
    """Copy ``state`` (timm names, head as ``head.*``) into ``model``; every key and shape must match."""
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    parts = state_mismatch(body, model.backbone.state_dict())
    if parts:
        raise ModelNotSupportedError(
            f"the module's weights do not fit the described backbone ({arch['timm_name']}, "
            f"{dict(arch['kwargs'])}): " + "; ".join(parts)
        )
    model.backbone.load_state_dict(body, strict=True)
    model.head.load_state_dict(head, strict=True)


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode, no grad, for the call; every module's training flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _check_outputs(module: nn.Module, model: MedViT, description: _Description) -> None:
    """The wrapped model's outputs must be the original's (its head Linear's output) on a random batch."""
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)  # never touches the global RNG
    x = torch.randn(2, *model.input_size, generator=generator).to(device=param.device, dtype=param.dtype)
    captured: list[Tensor] = []
    handle = description.reference_head.register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        with _evaluating(module):
            module(x)
    finally:
        handle.remove()
    with _evaluating(model):
        pooled = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
        raw = getattr(model.head, "raw", None)  # the head's outputs before a softmax target's scores
        ours = raw(pooled) if callable(raw) else model.head(pooled)
    if len(captured) != 1:
        raise ModelNotSupportedError(
            f"{type(module).__name__}'s forward ran its head {len(captured)} times; expected once"
        )
    want = captured[0]
    diff = float((ours.float() - want.float()).abs().max())
    tol = _TOLERANCE.get(param.dtype, _LOW_PRECISION_TOLERANCE) * max(1.0, float(want.float().abs().max()))
    if not diff <= tol:
        raise ModelNotSupportedError(
            f"the wrapped model's outputs differ from the {type(module).__name__}'s by {diff:.3g} (tolerance "
            f"{tol:.3g}): the module computes something its layout does not show (e.g. a changed forward)"
        )
