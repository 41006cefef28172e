"""The capture base every explainer shares.

It owns everything that touches the model's state: checking the model and the images, resolving
targets, hooks that live one call (``HookSet``), the grad mode and module flags restored afterwards
(``captured``), the target scorer (class outputs or a concept vector) and gradients batched over targets
(``target_grads``). Methods subclass :class:`Explainer` and only do their maths in ``attribute``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from medvit_explain import vocabulary
from medvit_explain.errors import MethodError, ModelNotSupportedError, UnsupportedImageError

__all__ = [
    "Explainer",
    "HookSet",
    "ImageShapeError",
    "Scorer",
    "ViTSpec",
    "captured",
    "inspect_model",
    "resolve_targets",
    "target_grads",
    "tokens_to_grid",
]


class ImageShapeError(UnsupportedImageError, ValueError):
    """The image batch does not have the shape the model expects."""


# --------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ViTSpec:
    """Geometry read from the model (never assumed).

    ``num_prefix``: class + register (+ distillation) tokens before the patch tokens;
    ``grid``: patch grid (gh, gw), or (gd, gh, gw) for a volumetric ViT; ``read_rows``: token rows the
    pooling reads when it reads prefix tokens only (``(0,)`` for class-token pooling, ``(0, 1)`` for DeiT
    distillation), else ``None``.
    """

    num_prefix: int
    grid: tuple[int, ...]
    in_chans: int
    img_size: tuple[int, ...] | None
    depth: int
    read_rows: tuple[int, ...] | None

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def spatial_dims(self) -> int:
        return len(self.grid)


_ATTN_ATTRS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "proj")


def inspect_model(model: nn.Module) -> ViTSpec:
    """Check the model contract and read its geometry; ``ModelNotSupportedError`` says what is missing."""
    from timm.models.vision_transformer import VisionTransformer

    need = (
        "expected a module with .backbone (a timm VisionTransformer with a class token and num_classes=0), "
        ".head (pooled pre-logits [B, D] -> [B, K]) and .targets (K names)"
    )
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, VisionTransformer):
        raise ModelNotSupportedError(f"{need}; got .backbone of type {type(backbone).__name__}")
    if getattr(backbone, "cls_token", None) is None:
        raise ModelNotSupportedError(f"{need}; got a VisionTransformer without a class token")
    targets = getattr(model, "targets", None)
    if not callable(getattr(model, "head", None)) or not isinstance(targets, Sequence):
        raise ModelNotSupportedError(f"{need}; .head or .targets is missing")
    for i, blk in enumerate(backbone.blocks):
        attn = getattr(blk, "attn", None)
        if not hasattr(blk, "norm1") or attn is None or not all(hasattr(attn, a) for a in _ATTN_ATTRS):
            raise ModelNotSupportedError(
                f"{need}; block {i} ({type(blk).__name__}) has no norm1 + timm Attention (qkv, q_norm, k_norm, proj)"
            )
    pe = backbone.patch_embed
    grid = tuple(int(g) for g in pe.grid_size)
    in_chans = int(getattr(pe, "in_chans", None) or pe.proj.in_channels)  # a stem's, else the patch conv's
    dynamic = bool(getattr(pe, "dynamic_img_size", False) or getattr(backbone, "dynamic_img_size", False))
    img_size = None if dynamic or pe.img_size is None else tuple(int(s) for s in pe.img_size)
    read_rows: tuple[int, ...] | None = None
    if getattr(backbone, "attn_pool", None) is None:
        if getattr(backbone, "dist_token", None) is not None:
            read_rows = (0, 1)
        elif backbone.global_pool == "token":
            read_rows = (0,)
    return ViTSpec(int(backbone.num_prefix_tokens), grid, in_chans, img_size, len(backbone.blocks), read_rows)


def check_images(images: Any, spec: ViTSpec) -> None:
    """``ImageShapeError`` ("expected ..., got ...") unless ``images`` is [B, C, H, W] as the model needs
    ([B, C, D, H, W] for a volumetric model)."""
    layout = "[B, C, D, H, W]" if spec.spatial_dims == 3 else "[B, C, H, W]"
    if not isinstance(images, Tensor):
        raise ImageShapeError(f"expected a torch.Tensor {layout}, got {type(images).__name__}")
    if images.ndim != 2 + spec.spatial_dims:
        raise ImageShapeError(
            f"expected {'volumes' if spec.spatial_dims == 3 else 'images'} of shape {layout} "
            f"({2 + spec.spatial_dims}D), got {tuple(images.shape)}"
        )
    b, c, *size = images.shape
    if b == 0:
        raise ImageShapeError("expected at least one image, got an empty batch")
    if c != spec.in_chans:
        raise ImageShapeError(f"expected {spec.in_chans} channel(s), got {c} (shape {tuple(images.shape)})")
    if spec.img_size is not None and tuple(size) != spec.img_size:
        raise ImageShapeError(f"expected images of size {spec.img_size}, got {tuple(size)}")
    if not images.is_floating_point():
        raise ImageShapeError(f"expected a floating point tensor, got {images.dtype}")


def resolve_targets(names: Sequence[str], targets: Any) -> list[int]:
    """Target names or indices (or ``None`` = all) → indices, in the order given (the one rule,
    :func:`medvit_explain.vocabulary.resolve_targets`)."""
    return vocabulary.resolve_targets(names, targets)


# ------------------------------------------------------------------------------------- state & hooks


class HookSet:
    """Hooks registered for one call and removed together (use as a context manager)."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def forward(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def pre(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@contextlib.contextmanager
def captured(model: nn.Module) -> Iterator[None]:
    """Eval mode and grad enabled for the call; every flag it could touch is restored afterwards.

    Restores each module's ``training`` flag, each parameter's ``requires_grad`` and each attention's
    ``fused_attn`` even when the body raises.
    """
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in requires:
            p.requires_grad_(flag)
        for m, flag in fused:
            m.fused_attn = flag


# ------------------------------------------------------------------------------------------- scoring


class Scorer:
    """Maps pooled pre-logits [B, D] to the scores explained, [B, K'] (class outputs or a concept score)."""

    def __init__(self, model: nn.Module, concept_vector: Tensor | None = None) -> None:
        self.model = model
        self.concept = concept_vector

    def __call__(self, pooled: Tensor) -> Tensor:
        if self.concept is None:
            return self.model.head(pooled)
        return (pooled * self.concept).sum(-1, keepdim=True)


def pooled_from_tokens(backbone: nn.Module, tokens: Tensor) -> Tensor:
    """Final norm + pooling: tokens after the last block (pre-norm) [B, N, D] → pooled pre-logits."""
    return backbone.forward_head(backbone.norm(tokens), pre_logits=True)


def target_grads(outputs: Tensor, inputs: Sequence[Tensor], target_idx: Sequence[int]) -> list[Tensor]:
    """∂ outputs[:, c] / ∂ input for every target c, batched over targets in one backward.

    outputs [B, K]; returns one tensor [T, *input.shape] per input (zeros where unused). Uses
    ``torch.autograd.grad`` (never ``.backward``) so parameters' ``.grad`` stay untouched.
    """
    t = len(target_idx)
    idx = torch.as_tensor(list(target_idx), device=outputs.device)
    seeds = torch.zeros((t, *outputs.shape), dtype=outputs.dtype, device=outputs.device)
    seeds[torch.arange(t, device=outputs.device), :, idx] = 1.0
    if t == 1:
        grads = torch.autograd.grad(outputs, list(inputs), seeds[0], allow_unused=True)
        grads = [None if g is None else g.unsqueeze(0) for g in grads]
    else:
        grads = torch.autograd.grad(outputs, list(inputs), seeds, is_grads_batched=True, allow_unused=True)
    return [
        torch.zeros((t, *x.shape), dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, inputs, strict=True)
    ]


def tokens_to_grid(values: Tensor, spec: ViTSpec) -> Tensor:
    """[..., P+N] or [..., N] token values → [..., gh, gw] ([..., gd, gh, gw] in 3D; prefix tokens dropped)."""
    if values.shape[-1] == spec.num_prefix + spec.num_patches:
        values = values[..., spec.num_prefix :]
    return values.reshape(*values.shape[:-1], *spec.grid)


# -------------------------------------------------------------------------------- timm attention maths


def split_qkv(attn: nn.Module, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """qkv projection output [B, N, 3·H·dh] → q, k, v [B, H, N, dh], q_norm / k_norm applied (no scale)."""
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_output(attn: nn.Module, heads: Tensor, gate: Tensor | None = None) -> Tensor:
    """Per-head attention outputs [B, H, R, dh] → the module's output [B, R, D] (norm, gate, proj)."""
    b, h, r, d = heads.shape
    x = heads.transpose(1, 2).reshape(b, r, h * d)
    x = getattr(attn, "norm", nn.Identity())(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x)) if hasattr(attn, "proj_drop") else attn.proj(x)


def attention_gate(attn: nn.Module, x: Tensor) -> Tensor | None:
    """timm's optional sigmoid output gate (newer timm), computed from the attention input."""
    gate = getattr(attn, "gate", None)
    return None if gate is None else gate(x).sigmoid()


def explicit_attention(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm Attention forward with the attention matrix materialised: (output [B,N,D], A [B,H,N,N])."""
    q, k, v = split_qkv(attn, attn.qkv(x))
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    return attention_output(attn, a @ v, attention_gate(attn, x)), a


class BlockTap:
    """Records, during one forward, each chosen block's input, attention input and q, k, v.

    ``on_block(index, record)`` is called from the qkv hook with ``record`` holding ``x`` (block input,
    [B, N, D]), ``t`` (attention input = norm1 output) and ``q``, ``k``, ``v`` (+ ``qkv``), so a method
    can reduce them at once instead of holding every layer's tensors.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], indices: Sequence[int], on_block: Callable[[int, dict[str, Tensor]], None]
    ) -> None:
        self.blocks, self.indices, self.on_block = blocks, list(indices), on_block
        self._hooks = HookSet()
        self._current: dict[int, dict[str, Tensor]] = {}

    def __enter__(self) -> BlockTap:
        try:
            for i in self.indices:
                blk = self.blocks[i]
                self._hooks.pre(blk, self._make_block_pre(i))
                self._hooks.pre(blk.attn, self._make_attn_pre(i))
                self._hooks.forward(blk.attn.qkv, self._make_qkv(i))
        except BaseException:
            self._hooks.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.remove()
        self._current.clear()

    def _make_block_pre(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._current[i] = {"x": args[0]}

        return hook

    def _make_attn_pre(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._current.setdefault(i, {})["t"] = args[0]

        return hook

    def _make_qkv(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            rec = self._current.pop(i, {})
            q, k, v = split_qkv(self.blocks[i].attn, out)
            rec.update(qkv=out, q=q, k=k, v=v)
            self.on_block(i, rec)

        return hook


def replace_attention_output(hooks: HookSet, blk: nn.Module, output: Tensor) -> None:
    """Make ``blk.attn`` return ``output`` (its own computation is discarded → no gradient through it)."""
    hooks.forward(blk.attn, lambda module, args, out: output)


def run_prefix_chain(
    backbone: nn.Module,
    start: int,
    rows_in: Tensor,
    attn_outputs: Sequence[Tensor],
    final_tokens: Tensor,
    rows: Sequence[int],
    read_rows: Sequence[int] | None = None,
) -> Tensor:
    """Re-run blocks ``start..L-1`` on the token rows ``rows`` only, each attention replaced by the given
    output (constants or graph leaves): the residual stream and MLPs of those rows, nothing else.

    rows_in [B, R, D] (block ``start`` input at those rows); attn_outputs[j] [B, R, D] for block
    ``start + j``; final_tokens [B, P+N, D] the last block's output (pre-norm) for the other rows.
    Returns pooled pre-logits computed with the chained rows put back into the final tokens.
    ``read_rows`` (``ViTSpec.read_rows``): when the pooling reads only these leading rows, the final norm
    and pooling run on rows ``0..max(read_rows)`` alone (the norm is per token; the rest is never read),
    which keeps the batched backward from touching every patch token.
    """
    x = rows_in
    for j, k in enumerate(range(start, len(backbone.blocks))):
        blk = backbone.blocks[k]
        with HookSet() as hooks:
            replace_attention_output(hooks, blk, attn_outputs[j])
            x = blk(x)
    r = len(rows)
    assert tuple(rows) == tuple(range(r)), "prefix chain rows must be the leading rows"
    keep = final_tokens.shape[1] if read_rows is None else max(max(read_rows) + 1, r)
    tokens = torch.cat([x, final_tokens[:, r:keep]], dim=1) if keep > r else x
    return pooled_from_tokens(backbone, tokens)


# ------------------------------------------------------------------------------------------ explainer


KINDS = ("attention", "attention-gradient", "gradient")
SPACES = ("token", "pixel")
COMMON_OPTIONS = MappingProxyType({"autocast_dtype": None})  # every method accepts these (the base handles them)
_POSITIVE_INT = {"n_samples": 1, "n_steps": 1, "internal_batch_size": 1}


class Explainer:
    """Base of every method: validation, targets, state capture; subclasses implement ``attribute``.

    ``attribute(images, target_idx) -> [B, T, gh, gw]`` (``[B, T, gd, gh, gw]`` for a volumetric model) runs
    inside :func:`captured` (eval, grad on) and
    may use ``self.spec``, ``self.backbone``, ``self.scorer``, ``self.options``.

    A method is one class in one file: it declares what it is as class attributes (read by the registry,
    ``list-methods``, the CLI and the viewers) and is registered with
    :func:`medvit_explain.registry.register` (built-in) or the ``medvit_explain.explainers`` entry point
    (a package of yours). ``defaults`` are its options and their default values; ``validate`` checks
    method-specific rules; ``joint_with`` names methods it can share a forward pass with
    (:meth:`explain_jointly`, used by :func:`medvit_explain.explainers.explain_many`).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    class_sensitive: ClassVar[bool] = True
    kind: ClassVar[str] = "gradient"  # one of KINDS
    space: ClassVar[str] = "token"  # where the raw attribution lives before the token grid (SPACES)
    defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    joint_with: ClassVar[tuple[str, ...]] = ()
    rank: ClassVar[int] = 1000  # position in list-methods (built-ins first)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options of one call, defaults filled in; ``MethodError`` ("expected X, got Y") otherwise."""
        accepted = {**COMMON_OPTIONS, **cls.defaults}
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise MethodError(
                f"method {cls.name!r} does not accept option(s) {', '.join(unknown)}; "
                f"expected one of: {', '.join(sorted(accepted)) or '(none)'}"
            )
        opts = {**accepted, **options}
        for key, low in _POSITIVE_INT.items():
            value = options.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise MethodError(f"option {key} expected an integer >= {low}, got {value!r}")
        if "pool" in opts and opts["pool"] not in ("sum", "mean"):
            raise MethodError(f"option pool expected 'sum' or 'mean', got {opts['pool']!r}")
        if "noise_level" in opts and (not isinstance(opts["noise_level"], (int, float)) or opts["noise_level"] < 0):
            raise MethodError(f"option noise_level expected a number >= 0, got {opts['noise_level']!r}")
        cls.validate(opts)
        return opts

    @classmethod
    def validate(cls, options: dict[str, Any]) -> None:
        """Method-specific option rules (raise ``MethodError``); the base checks the common ones."""

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The row ``list-methods`` prints: name, title, citation, class_sensitive, kind, space, options."""
        return {
            "name": cls.name,
            "title": cls.title,
            "citation": cls.citation,
            "class_sensitive": cls.class_sensitive,
            "kind": cls.kind,
            "space": cls.space,
            "options": dict(cls.defaults),
            "joint_with": list(cls.joint_with),
        }

    @classmethod
    def can_join(cls, own: Mapping[str, Any], partner: Mapping[str, Any]) -> bool:
        """Whether a call with options ``own`` can share its forward pass with a partner's call (the same
        scorer and the same autocast): neither explains a concept."""
        return (
            own.get("concept") is None
            and partner.get("concept") is None
            and own.get("autocast_dtype") == partner.get("autocast_dtype")
        )

    def explain_jointly(self, partners: Mapping[str, Explainer], images: Tensor, targets: Any) -> dict[str, Tensor]:
        """This method and its ``joint_with`` partners on one forward pass: ``{name: [B, T, gh, gw]}``, each
        equal to the partner's own call. Only methods that declare ``joint_with`` implement it."""
        raise NotImplementedError(f"{self.name} declares no joint forward")

    def __init__(self, model: nn.Module, spec: ViTSpec, options: dict[str, Any]) -> None:
        self.model = model
        self.backbone = model.backbone
        self.spec = spec
        self.options = options
        self.scorer = Scorer(model)

    def __call__(self, images: Tensor, targets: Any = None) -> Tensor:
        with self.session(images, targets) as (images, target_idx):
            maps = self.attribute(images, target_idx)
        return maps.detach().to(images.dtype)

    @contextlib.contextmanager
    def session(self, images: Tensor, targets: Any = None) -> Iterator[tuple[Tensor, list[int]]]:
        """The state one call runs in: yields (images on the model's device and dtype, target indices)
        inside :func:`captured` and the autocast asked for, with the scorer set (class or concept)."""
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else images.device
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        images = images.to(device=device, dtype=dtype)
        with captured(self.model), self._autocast(device):
            concept = self.options.get("concept")
            if concept is not None:
                self.scorer = Scorer(self.model, self._concept_vector(concept, device, dtype))
                target_idx = resolve_targets(["concept"], targets if targets is not None else None)
            else:
                target_idx = resolve_targets(list(self.model.targets), targets)
            yield images, target_idx

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = self.options.get("autocast_dtype")
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def _concept_vector(self, examples: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        """c̄ = mean over the example images of the pooled pre-logits (final-norm class embedding)."""
        check_images(examples, self.spec)
        with torch.no_grad():
            x = examples.to(device=device, dtype=dtype)
            pooled = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return pooled.mean(0)

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        raise NotImplementedError

    # helpers shared by several methods -----------------------------------------------------------

    def _chunks(self, total: int, per_item: int = 1) -> list[slice]:
        """Slices over ``total`` items so that at most ``internal_batch_size`` inputs go through at once."""
        ibs = self.options.get("internal_batch_size")
        step = total if not ibs else max(1, int(ibs) // max(1, per_item))
        return [slice(i, min(total, i + step)) for i in range(0, total, step)]
