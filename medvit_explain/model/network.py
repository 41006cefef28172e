"""``MedViT``: a timm VisionTransformer backbone plus the head its config describes; ``build_model``."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medvit_explain.errors import CheckpointError, ModelNotSupportedError
from medvit_explain.model.heads import build_head, head_config
from medvit_explain.model.patch_embed import PATCH_EMBEDS, ConvStem, PatchEmbed3d, input_channels, triple
from medvit_explain.model.preprocessing import defaults_used, validate_preprocessing
from medvit_explain.model.task import TaskSpec, load_task_spec
from medvit_explain.vocabulary import jsonable

FORMAT = "medvit-explain/1"
CONFIG_KEYS = ("format", "name", "architecture", "head", "task_spec", "preprocessing", "provenance")
# Keys that would make timm download or read files, or that we set ourselves.
_FORBIDDEN_KWARGS = (
    "pretrained",
    "num_classes",
    "checkpoint_path",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "pretrained_strict",
    "features_only",
    "cache_dir",
)


class MedViT(nn.Module):
    """A timm ``VisionTransformer`` (``.backbone``, built with ``num_classes=0``) and a ``.head`` (the
    config's ``head``: a Linear by default, an MLP or several heads side by side, see
    :mod:`medvit_explain.model.heads`) that ends with one score per target of ``.task_spec``.

    Contract the explainers rely on:

    * ``forward(x)``: ``x`` is ``[B, C, H, W]`` with ``(C, H, W) == model.input_size`` (a volumetric
      model, ``architecture.patch_embed: conv3d``: ``[B, C, D, H, W]``, ``model.spatial_dims == 3``); returns raw
      outputs ``[B, K]``, K = ``len(model.targets)``, column ``k`` = target ``model.targets[k]``:
      the logit for a binary target, the normalised value for a regression target, the log-odds of the
      positive class for a softmax target (``model.head.raw`` gives the class logits).
    * ``forward(x)`` is exactly
      ``model.head(model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True))``
      -- nothing else happens between the timm backbone and the head, so hooks on the backbone's
      blocks, norms and attention see the whole computation.
    * The backbone pools with its class token (``global_pool='token'``) unless the config says
      otherwise; ``model.num_prefix_tokens`` (CLS first, then register/distillation tokens),
      ``model.grid_size`` ``(gh, gw)`` (3D: ``(gd, gh, gw)``) and ``model.input_size`` come from the backbone,
      never constants.
    * ``predict_values(x)`` turns outputs into probabilities (binary) and LIDC-scale values (regression).

    Attributes: ``backbone``, ``head``, ``task_spec``, ``targets`` (names in output order),
    ``preprocessing`` (validated dict, see :mod:`medvit_explain.model.preprocessing`; every value used),
    ``preprocessing_defaults`` (the settings the given preprocessing left to the defaults) and ``config``
    (the whole checkpoint config: format, name, architecture, task_spec, preprocessing, provenance).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        task_spec: TaskSpec,
        preprocessing: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        config = copy.deepcopy(dict(config or {}))
        if not isinstance(backbone, VisionTransformer):
            raise ModelNotSupportedError(f"expected a timm VisionTransformer backbone, got {type(backbone).__name__}")
        if not isinstance(backbone.head, nn.Identity):
            raise ModelNotSupportedError("expected a backbone built with num_classes=0 (its own head is unused)")
        self.backbone = backbone
        self.task_spec = task_spec
        self.targets: list[str] = task_spec.names
        width = getattr(backbone, "head_hidden_size", backbone.num_features)
        scores = task_spec.scores if task_spec.output_width != len(task_spec) else None
        self.head = build_head(config.get("head"), width, task_spec.output_width, scores)
        self.preprocessing = validate_preprocessing(preprocessing, self.input_size)
        self.preprocessing_defaults: list[str] = defaults_used(preprocessing)  # what the config left out
        config.update(
            head=head_config(config.get("head")),
            format=FORMAT,
            name=config.get("name") or "medvit",
            task_spec=task_spec.to_dict(),
            preprocessing=copy.deepcopy(self.preprocessing),
            provenance=dict(config.get("provenance") or {}),
        )
        config.setdefault("architecture", None)
        self.config: dict[str, Any] = jsonable(
            {k: config[k] for k in CONFIG_KEYS} | {k: v for k, v in config.items() if k not in CONFIG_KEYS}
        )

    # -- geometry (from the backbone, never constants) ----------------------------------------------
    @property
    def input_size(self) -> tuple[int, ...]:
        """``(C, H, W)`` the backbone expects (``(C, D, H, W)`` for a volumetric model)."""
        pe = self.backbone.patch_embed
        return (input_channels(pe), *(int(s) for s in pe.img_size))

    @property
    def patch_size(self) -> tuple[int, ...]:
        """``(ph, pw)`` pixels (``(pd, ph, pw)`` voxels) per patch."""
        return tuple(int(p) for p in self.backbone.patch_embed.patch_size)

    @property
    def grid_size(self) -> tuple[int, ...]:
        """``(gh, gw)`` patch-token grid (``(gd, gh, gw)`` for a volumetric model)."""
        return tuple(int(g) for g in self.backbone.patch_embed.grid_size)

    @property
    def spatial_dims(self) -> int:
        """2 for a slice/view model, 3 for a volumetric one."""
        return len(self.grid_size)

    @property
    def num_prefix_tokens(self) -> int:
        """Class + register (+ distillation) tokens before the patch tokens."""
        return int(self.backbone.num_prefix_tokens)

    @property
    def num_targets(self) -> int:
        return len(self.targets)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` (3D: ``[B, C, D, H, W]``) → raw outputs ``[B, K]`` (logits / normalised values)."""
        return self.head(self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True))

    @torch.no_grad()
    def predict_values(self, x: torch.Tensor, as_dict: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """``[B, C, H, W]`` → ``[B, K]`` probabilities (binary) and LIDC-scale values (regression), or
        ``{target name: [B]}`` with ``as_dict=True``. No gradients; for differentiable values use
        ``model.task_spec.to_values(model(x))``."""
        values = self.task_spec.to_values(self(x))
        if as_dict:
            return {name: values[:, i] for i, name in enumerate(self.targets)}
        return values


def _architecture(config: Mapping[str, Any]) -> tuple[str, dict[str, Any], float | None, str, list[int] | None]:
    """(timm name, kwargs, LayerNorm eps or None, patch embedding, stem widths or None) from the config's
    ``architecture``."""
    arch = config.get("architecture")
    if not isinstance(arch, Mapping):
        raise CheckpointError(
            "config: expected 'architecture: {timm_name: vit_base_patch16_224, "
            f"kwargs: {{img_size: ..., in_chans: ...}}}}', got {arch!r}"
        )
    unknown = sorted(set(arch) - {"timm_name", "kwargs", "norm_eps", "patch_embed", "stem_widths"})
    if unknown:
        raise CheckpointError(
            f"config: unknown architecture key(s) {unknown}; expected timm_name, kwargs, norm_eps, patch_embed, "
            "stem_widths"
        )
    patch_embed = arch.get("patch_embed", "conv2d")
    if patch_embed not in PATCH_EMBEDS:
        raise CheckpointError(
            "config: expected architecture.patch_embed conv2d, conv3d (3D volumes) or convstem (a convolutional "
            f"stem), got {patch_embed!r}"
        )
    stem_widths = _stem_widths(arch.get("stem_widths"), patch_embed)
    name = arch.get("timm_name")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"config: expected architecture.timm_name (a timm model name), got {name!r}")
    check_not_remote(name, "config: architecture.timm_name")
    eps = arch.get("norm_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
        raise CheckpointError(f"config: expected architecture.norm_eps a small positive number (1e-5), got {eps!r}")
    kwargs = arch.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"config: expected architecture.kwargs to be a mapping, got {kwargs!r}")
    bad = sorted(set(kwargs) & set(_FORBIDDEN_KWARGS))
    if "num_classes" in bad:
        raise CheckpointError(
            "config: remove num_classes from architecture.kwargs: the outputs come from task_spec "
            "(one per target; a softmax target has one per class) and the head from 'head'"
        )
    if bad:
        raise CheckpointError(
            f"config: remove {bad} from architecture.kwargs: weights come from the checkpoint, never a download"
        )
    if "embed_layer" in kwargs:
        raise CheckpointError("config: remove embed_layer from architecture.kwargs; set architecture.patch_embed")
    kwargs = jsonable(kwargs)
    kwargs.setdefault("global_pool", "token")
    return name, kwargs, None if eps is None else float(eps), patch_embed, stem_widths


def _stem_widths(widths: Any, patch_embed: str) -> list[int] | None:
    """``architecture.stem_widths``: the 3×3 convolutions' channel counts, given with (and only with)
    ``patch_embed: convstem``."""
    if patch_embed != "convstem":
        if widths is not None:
            raise CheckpointError("config: architecture.stem_widths is for patch_embed convstem; remove it or set that")
        return None
    if (
        not isinstance(widths, Sequence)
        or isinstance(widths, str)
        or not widths
        or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)
    ):
        raise CheckpointError(
            f"config: patch_embed convstem needs architecture.stem_widths, channel counts like [32, 32, 64, 96]; "
            f"got {widths!r}"
        )
    return [int(w) for w in widths]


REMOTE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:", "http://", "https://")


def check_not_remote(name: str, where: str, advice: str = "") -> None:
    """Refuse a timm model name that would fetch or read a model elsewhere (``hf-hub:``, ``local-dir:``, a
    URL): timm would make network requests (an offline machine hangs, then fails) or read a config we did not
    check. Weights come from the checkpoint only."""
    if str(name).strip().lower().startswith(REMOTE_PREFIXES):
        raise CheckpointError(
            f"{where} {name!r} names a hub or remote model; medvit-explain never downloads or reads models from "
            + (advice or "there: give the timm architecture name (e.g. vit_small_patch16_224) and a local checkpoint")
        )


def build_backbone(
    timm_name: str,
    kwargs: Mapping[str, Any],
    norm_eps: float | None = None,
    patch_embed: str = "conv2d",
    stem_widths: Sequence[int] | None = None,
) -> VisionTransformer:
    """``timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)``, checked to be a ViT.
    ``norm_eps`` sets every LayerNorm's epsilon afterwards (timm's ViT uses 1e-6; MONAI's and PyTorch's
    default is 1e-5), so a converted model computes exactly what the original did. ``patch_embed="conv3d"``
    gives it a :class:`~medvit_explain.model.patch_embed.PatchEmbed3d` (``img_size``/``patch_size`` then
    ``[D, H, W]``): a volumetric ViT (:func:`_volumetric_backbone`); ``patch_embed="convstem"`` a
    :class:`~medvit_explain.model.patch_embed.ConvStem` with ``stem_widths`` (a 2D ViT whose tokens see their
    pixels through convolutions)."""
    check_not_remote(timm_name, "timm model")
    try:
        if patch_embed == "conv3d":
            backbone = _volumetric_backbone(timm_name, kwargs)
        elif patch_embed == "convstem":
            stem = partial(ConvStem, widths=list(stem_widths or ()))
            backbone = timm.create_model(timm_name, pretrained=False, num_classes=0, embed_layer=stem, **kwargs)
        else:
            backbone = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot build timm model {timm_name!r} with kwargs {dict(kwargs)}: {msg}") from exc
    if not isinstance(backbone, VisionTransformer):
        raise ModelNotSupportedError(
            f"expected a timm VisionTransformer (ViT/DeiT/DINO-style), got {type(backbone).__name__} from {timm_name!r}"
        )
    if norm_eps is not None:
        for module in backbone.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = norm_eps
    return backbone


VOLUMETRIC_REQUIRED = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def _volumetric_backbone(timm_name: str, kwargs: Mapping[str, Any]) -> VisionTransformer:
    """timm's ``VisionTransformer`` with a :class:`PatchEmbed3d`. timm's model factory only takes 2D image
    sizes, so the class is built directly: the kwargs must give the whole size (``img_size``, ``patch_size``
    ``[D, H, W]``, ``embed_dim``, ``depth``, ``num_heads``); ``timm_name`` must still name a plain ViT."""
    missing = [k for k in VOLUMETRIC_REQUIRED if k not in kwargs]
    if missing:
        raise CheckpointError(
            f"config: a volumetric model (architecture.patch_embed conv3d) needs architecture.kwargs {missing}: "
            "timm's model factory cannot build it from a name"
        )
    if not timm_name.startswith(("vit_", "deit")):
        raise CheckpointError(f"config: patch_embed conv3d needs a plain ViT timm_name (vit_*), got {timm_name!r}")
    triple(kwargs["img_size"], "architecture.kwargs.img_size (patch_embed conv3d)")
    triple(kwargs["patch_size"], "architecture.kwargs.patch_size (patch_embed conv3d)")
    return VisionTransformer(num_classes=0, embed_layer=PatchEmbed3d, **kwargs)


def build_model(config: Mapping[str, Any], base_dir: str | Path | None = None) -> MedViT:
    """A randomly initialised :class:`MedViT` from a config dict.

    ``config = {"name", "architecture": {"timm_name", "kwargs"}, "task_spec": dict | "lidc" | path,
    "preprocessing": dict, "provenance": dict, ...}``; other top-level keys (e.g. ``training``) are kept
    in ``model.config``. A task spec given as a path is read relative to ``base_dir``. The backbone is
    built with ``pretrained=False, num_classes=0`` and ``global_pool='token'`` unless kwargs say otherwise.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"config: expected a mapping, got {type(config).__name__}")
    fmt = config.get("format", FORMAT)
    if fmt != FORMAT:
        raise CheckpointError(f"config: expected format {FORMAT!r}, got {fmt!r}")
    name, kwargs, eps, patch_embed, stem_widths = _architecture(config)
    task_spec = load_task_spec(config.get("task_spec"), base_dir=base_dir)
    backbone = build_backbone(name, kwargs, eps, patch_embed, stem_widths)
    full = dict(config)
    full["architecture"] = (
        {"timm_name": name, "kwargs": kwargs}
        | ({} if eps is None else {"norm_eps": eps})
        | ({} if patch_embed == "conv2d" else {"patch_embed": patch_embed})
        | ({} if stem_widths is None else {"stem_widths": stem_widths})
    )
    full.setdefault("name", name)
    return MedViT(backbone, task_spec, preprocessing=config.get("preprocessing"), config=full)
