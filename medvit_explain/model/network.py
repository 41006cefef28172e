"""``MedViT``: a timm VisionTransformer backbone plus the head its config describes; ``build_model``."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medvit_explain.errors import CheckpointError, ModelNotSupportedError
from medvit_explain.model.heads import build_head, head_config
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

    * ``forward(x)``: ``x`` is ``[B, C, H, W]`` with ``(C, H, W) == model.input_size``; returns raw
      outputs ``[B, K]``, K = ``len(model.targets)``, column ``k`` = target ``model.targets[k]``:
      the logit for a binary target, the normalised value for a regression target, the log-odds of the
      positive class for a softmax target (``model.head.raw`` gives the class logits).
    * ``forward(x)`` is exactly
      ``model.head(model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True))``
      -- nothing else happens between the timm backbone and the head, so hooks on the backbone's
      blocks, norms and attention see the whole computation.
    * The backbone pools with its class token (``global_pool='token'``) unless the config says
      otherwise; ``model.num_prefix_tokens`` (CLS first, then register/distillation tokens),
      ``model.grid_size`` ``(gh, gw)`` and ``model.input_size`` come from the backbone, never constants.
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
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` the backbone expects."""
        pe = self.backbone.patch_embed
        h, w = pe.img_size
        return int(pe.proj.in_channels), int(h), int(w)

    @property
    def patch_size(self) -> tuple[int, int]:
        ph, pw = self.backbone.patch_embed.patch_size
        return int(ph), int(pw)

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(gh, gw)`` patch-token grid."""
        gh, gw = self.backbone.patch_embed.grid_size
        return int(gh), int(gw)

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
        """``[B, C, H, W]`` → raw outputs ``[B, K]`` (logits / normalised values)."""
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


def _architecture(config: Mapping[str, Any]) -> tuple[str, dict[str, Any], float | None]:
    """(timm name, kwargs, LayerNorm eps or None) from the config's ``architecture``."""
    arch = config.get("architecture")
    if not isinstance(arch, Mapping):
        raise CheckpointError(
            "config: expected 'architecture: {timm_name: vit_base_patch16_224, "
            f"kwargs: {{img_size: ..., in_chans: ...}}}}', got {arch!r}"
        )
    unknown = sorted(set(arch) - {"timm_name", "kwargs", "norm_eps"})
    if unknown:
        raise CheckpointError(f"config: unknown architecture key(s) {unknown}; expected timm_name, kwargs, norm_eps")
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
    kwargs = jsonable(kwargs)
    kwargs.setdefault("global_pool", "token")
    return name, kwargs, None if eps is None else float(eps)


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


def build_backbone(timm_name: str, kwargs: Mapping[str, Any], norm_eps: float | None = None) -> VisionTransformer:
    """``timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)``, checked to be a ViT.
    ``norm_eps`` sets every LayerNorm's epsilon afterwards (timm's ViT uses 1e-6; MONAI's and PyTorch's
    default is 1e-5), so a converted model computes exactly what the original did."""
    check_not_remote(timm_name, "timm model")
    try:
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
    name, kwargs, eps = _architecture(config)
    task_spec = load_task_spec(config.get("task_spec"), base_dir=base_dir)
    backbone = build_backbone(name, kwargs, eps)
    full = dict(config)
    full["architecture"] = {"timm_name": name, "kwargs": kwargs} | ({} if eps is None else {"norm_eps": eps})
    full.setdefault("name", name)
    return MedViT(backbone, task_spec, preprocessing=config.get("preprocessing"), config=full)
