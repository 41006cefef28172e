"""AttnLRP (Achtibat et al., ICML 2024) for timm ViTs, in the gradient × input form of the reference
implementation ``lxt`` (``lxt.efficient``; Arras et al., arXiv:2502.15886).

LRP with relevance R = activation ⊙ gradient, where the backward pass of each operation is changed so that
this product follows the AttnLRP rule of that operation; the forward values are left exactly as the model
computes them. With the one-hot seed on output c, the seed relevance is f_c (the raw output, never a
probability). Rules, per operation of a timm VisionTransformer and its head:

* Linear layers and the patch-embedding convolution: ε-rule, R_in = x ⊙ Wᵀ (R_out / (z + ε·sign z)).
  ``epsilon`` = 0 (the default) is lxt's efficient implementation (the plain gradient is the rule); with
  ε > 0 the gradient at the layer's output is multiplied by z / (z + ε·sign z) (sign 0 = +1). Applies to
  ``nn.Linear`` / ``nn.Conv2d`` modules with torch's own forward (a head subclass with its own forward,
  such as one that appends task scores, is differentiated as it is: ε = 0 there).
* Additions (residuals, position embedding, biases): LRP-0 (the plain gradient; biases, the position
  embedding and the prefix tokens keep the relevance they absorb).
* LayerNorm / RMSNorm (the blocks' norms, q/k norms, the final norm, norms in the head): identity rule on
  the normalisation, the standard deviation (RMS) detached: y = (x − mean x) / sd(x)|detached · w + b.
* Element-wise activations (GELU, SiLU, ReLU, tanh, …): identity rule, ∂ replaced by act(x) / x
  (x stabilised by 1e-10·sign x, as lxt).
* Softmax: the AttnLRP softmax rule R_in = s_in ⊙ (R_out − softmax ⊙ Σ R_out) (a Taylor expansion at the
  input with the bias term dropped). In the gradient × input form this is the plain softmax gradient, so
  fused attention (``scaled_dot_product_attention``) is kept where the module uses it.
* Q Kᵀ and A·V: uniform rule with ε = 0, each factor gets half: the gradient reaching v is halved and the
  gradient reaching q and k is quartered (A's half of A·V, then q's or k's half of Q Kᵀ), as lxt does.
* Attention scale, LayerScale, dropout (eval), reshapes, concatenation and pooling selections: the plain
  gradient (linear and conservative, or one-input products: the identity rule).

Relevance is read at the input image, as lxt does for ViTs (``(x * x.grad).sum(1)``), summed over channels
and over each patch's pixels. The patch convolution is linear and its patches do not overlap, so that sum is
Σ_d (z − b)_d u_d per token, with z the convolution's output, b its bias and u the (ε-rule) gradient at z:
computed so, without a backward pass through the convolution. Prefix tokens take no pixels: they drop out.
Not conservative: biases, the position embedding, the prefix tokens and the softmax's bias term absorb
relevance (the paper says as much); with those zero and no softmax relevance, Σ map = f_c.

All targets in one backward: ``torch.autograd.grad(is_grads_batched=True)`` over one-hot seeds (the modified
backward is still linear in the seed, so this equals one backward per target). The rules are put in place
by swapping module forwards for the call only (restored in ``finally``): timm is not edited.
"""

from __future__ import annotations

import contextlib
import functools
import re
import types
from collections.abc import Callable, Iterable, Iterator
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, RmsNorm, SwiGLU
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import activations as timm_act
from torch import Tensor, nn

from medvit_explain.errors import MethodError, ModelNotSupportedError
from medvit_explain.explainers.base import Explainer, HookSet, attention_output, split_qkv, target_grads
from medvit_explain.registry import register

__all__ = ["AttnLRP", "attnlrp_forwards", "check_lrp_blocks", "patch_convolution", "swapped_forwards"]

ATTNLRP_PAPER = (
    "Achtibat et al., 'AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers', ICML 2024"
)

ELEMENTWISE = (
    nn.GELU,
    nn.SiLU,
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Mish,
    nn.ELU,
    nn.LeakyReLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    timm_act.GELU,
    timm_act.GELUTanh,
    timm_act.QuickGELU,
    timm_act.Swish,
    timm_act.Mish,
    timm_act.Sigmoid,
    timm_act.Tanh,
    timm_act.HardSwish,
    timm_act.HardSigmoid,
    timm_act.HardMish,
)
_RMS_NORMS = (RmsNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
_LINEAR_MAPS = (nn.BatchNorm1d, nn.BatchNorm2d)  # eval mode: affine maps, the plain gradient is LRP-0
_NORM_NAME = re.compile(r"norm\d*d?$")  # LayerNorm2d, GroupNorm1, InstanceNorm2d, SimpleNorm … (not "NormBlock")
_MISSING = object()
_IDENTITY_EPS = 1e-10


# --------------------------------------------------------------------------- gradient-modifying helpers


def with_gradient_of(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward pass, ``surrogate``'s gradient in the backward pass (both the same shape)."""
    return value.detach() + (surrogate - surrogate.detach())


def scale_gradient(x: Tensor, factor: float | Tensor) -> Tensor:
    """``x`` unchanged in the forward pass (bit for bit), its gradient multiplied by ``factor``."""
    d = x.detach()
    return d + (x - d) * factor


def signed_stabilise(x: Tensor, eps: float) -> Tensor:
    """x + ε·sign(x) with sign(0) = +1: a denominator that never crosses zero."""
    return x + eps * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@contextlib.contextmanager
def swapped_forwards(pairs: Iterable[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Give each module the forward ``fn(module, *args)`` for the duration of the block; whatever the
    instance had before (normally nothing: the class's forward) is put back in ``finally``."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module, fn in pairs:
            saved.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = types.MethodType(fn, module)
        yield
    finally:
        for module, old in reversed(saved):
            if old is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = old


# ----------------------------------------------------------------------------------- the rules, as forwards


def _norm_dims(module: nn.Module) -> tuple[int, ...]:
    return tuple(range(-len(module.normalized_shape), 0))


def layer_norm_identity(module: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm, identity rule on the normalisation: the gradient of (x − mean) / sd|detached · w."""
    y = F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    dims = _norm_dims(module)
    centred = x - x.mean(dims, keepdim=True)
    with torch.no_grad():
        sd = (centred.pow(2).mean(dims, keepdim=True) + module.eps).sqrt()
    lin = centred / sd
    if module.weight is not None:
        lin = lin * module.weight
    return with_gradient_of(y, lin)


def rms_norm_identity(module: nn.Module, x: Tensor) -> Tensor:
    """RMSNorm, identity rule on the normalisation: the gradient of x / rms|detached · w."""
    y = type(module).forward(module, x)
    dims = _norm_dims(module)
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    with torch.no_grad():
        rms = (x.pow(2).mean(dims, keepdim=True) + eps).sqrt()
    lin = x / rms
    if getattr(module, "weight", None) is not None:
        lin = lin * module.weight
    return with_gradient_of(y, lin)


def elementwise_identity(module: nn.Module, x: Tensor) -> Tensor:
    """An element-wise activation with the identity rule: its Jacobian replaced by act(x) / x."""
    y = type(module).forward(module, x)
    return with_gradient_of(y, x * (y / signed_stabilise(x, _IDENTITY_EPS)).detach())


def epsilon_layer(module: nn.Module, x: Tensor, *, eps: float) -> Tensor:
    """nn.Linear / nn.Conv2d with the ε-rule: the gradient at the output z times z / (z + ε·sign z)."""
    z = type(module).forward(module, x)
    return scale_gradient(z, (z / signed_stabilise(z, eps)).detach())


def attention_rules(attn: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """timm ``Attention.forward`` with AttnLRP's matmul rules: ∂v halved, ∂q and ∂k quartered; softmax as is."""
    if attn_mask is not None or is_causal:
        raise ModelNotSupportedError("attnlrp: expected attention without a mask, got attn_mask / is_causal")
    q, k, v = split_qkv(attn, attn.qkv(x))
    q, k, v = scale_gradient(q, 0.25), scale_gradient(k, 0.25), scale_gradient(v, 0.5)
    if attn.fused_attn:
        heads = F.scaled_dot_product_attention(q, k, v)  # as timm's fused path (its default scale)
    else:
        heads = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
    return attention_output(attn, heads)


# ---------------------------------------------------------------------------------------- model checks


def check_lrp_blocks(backbone: nn.Module, method: str) -> None:
    """``ModelNotSupportedError`` unless every block is norm → timm Attention (no gate) and a timm ``Mlp``,
    and the pooling is not an attention pool: the operations the LRP rules here are written for."""
    if getattr(backbone, "attn_pool", None) is not None:
        raise ModelNotSupportedError(f"{method}: expected token or average pooling, got an attention pool (MAP)")
    for i, blk in enumerate(backbone.blocks):
        mlp = getattr(blk, "mlp", None)
        if not isinstance(mlp, Mlp) or isinstance(mlp, (GluMlp, SwiGLU)):
            raise ModelNotSupportedError(
                f"{method}: expected block {i} to use timm's Mlp (fc1 → activation → fc2), got {type(mlp).__name__}"
            )
        if getattr(blk.attn, "gate", None) is not None:
            raise ModelNotSupportedError(f"{method}: expected attention without an output gate (block {i})")


def attnlrp_forwards(
    model: nn.Module, epsilon: float, skip: tuple[nn.Module, ...] = ()
) -> list[tuple[nn.Module, Callable[..., Any]]]:
    """(module, forward) pairs that put AttnLRP's rules into ``model`` (backbone and head); modules in
    ``skip`` are left alone (the patch convolution, whose ε-rule is applied where relevance is read).

    ``ModelNotSupportedError`` for a normalisation layer it has no rule for (its Jacobian would pass as is)."""
    blocks_attn = {id(blk.attn) for blk in model.backbone.blocks}
    pairs: list[tuple[nn.Module, Callable[..., Any]]] = []
    for name, m in model.named_modules():
        if any(m is k for k in skip):
            continue
        if id(m) in blocks_attn:
            pairs.append((m, attention_rules))
        elif isinstance(m, nn.LayerNorm) and type(m).forward in (nn.LayerNorm.forward, TimmLayerNorm.forward):
            pairs.append((m, layer_norm_identity))
        elif isinstance(m, _RMS_NORMS):
            pairs.append((m, rms_norm_identity))
        elif isinstance(m, ELEMENTWISE):
            pairs.append((m, elementwise_identity))
        elif epsilon > 0 and _stock_forward(m, (nn.Linear, nn.Conv2d)):
            pairs.append((m, functools.partial(epsilon_layer, eps=epsilon)))
        elif _NORM_NAME.search(type(m).__name__.lower()) and not isinstance(m, (nn.Identity, *_LINEAR_MAPS)):
            raise ModelNotSupportedError(
                f"attnlrp: no rule for the normalisation {name} ({type(m).__name__}); "
                "expected LayerNorm, RMSNorm or BatchNorm"
            )
    return pairs


def _stock_forward(m: nn.Module, classes: tuple[type, ...]) -> bool:
    return any(isinstance(m, c) and type(m).forward is c.forward for c in classes)


def patch_convolution(backbone: nn.Module) -> nn.Conv2d | nn.Conv3d:
    """The patch embedding's convolution; ``ModelNotSupportedError`` unless its patches do not overlap
    (stride = kernel, no padding), so that a token's relevance is that of its own pixels. A convolutional
    stem's is its final 1×1 projection: the relevance then stops at the stem's output (one feature vector
    per token), as no attention-aware rule covers the stem's overlapping 3×3 convolutions."""
    conv = getattr(backbone.patch_embed, "proj", None)
    ok = (
        isinstance(conv, (nn.Conv2d, nn.Conv3d))
        and tuple(conv.stride) == tuple(conv.kernel_size)
        and (conv.padding == "valid" or not any(conv.padding))
        and conv.groups == 1
    )
    if not ok:
        raise ModelNotSupportedError(
            f"attnlrp: expected a patch embedding Conv2d/Conv3d with stride = kernel and no padding, got {conv!r}"
        )
    return conv


# ----------------------------------------------------------------------------------------------- method


@register
class AttnLRP(Explainer):
    """AttnLRP relevance [B, T, gh, gw] (signed; the seed relevance is the raw output f_c)."""

    name = "attnlrp"
    title = "AttnLRP: layer-wise relevance propagation with attention-aware rules (gradient x input form)"
    citation = ATTNLRP_PAPER
    kind, space, rank = "gradient", "pixel", 36
    defaults = MappingProxyType({"epsilon": 0.0})

    @classmethod
    def validate(cls, options: dict[str, Any]) -> None:
        eps = options["epsilon"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise MethodError(f"option epsilon expected a number in [0, 1), got {eps!r}")

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        check_lrp_blocks(self.backbone, self.name)
        conv = patch_convolution(self.backbone)
        eps = float(self.options["epsilon"])
        embedded: list[Tensor] = []
        x = images.detach().requires_grad_(True)  # a graph even when every weight is frozen
        with HookSet() as hooks, swapped_forwards(attnlrp_forwards(self.model, eps, skip=(conv,))):
            hooks.forward(conv, lambda module, args, out: embedded.append(out))
            pooled = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
            scores = self.scorer(pooled)
        z = embedded[-1]
        (grad,) = target_grads(scores, [z], target_idx)  # [T, B, D, gh, gw] (3D: gd, gh, gw), one backward
        z = z.detach()
        if eps > 0:
            grad = grad * z / signed_stabilise(z, eps)
        bias = conv.bias.detach().reshape(-1, *([1] * (z.ndim - 2))) if conv.bias is not None else 0.0
        # Σ over a patch's pixels and channels of x ⊙ Wᵀu = Σ_d (z − b)_d u_d: the input relevance per patch
        return ((z - bias).unsqueeze(0) * grad).sum(2).transpose(0, 1)
