"""Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021), for timm ViTs, batched over images and targets.

For every block l: A_l the attention [B, H, N, N], ∇A_l = ∂f_c/∂A_l (the ordinary gradient through the whole
network), R^(A_l) the LRP relevance that reaches A_l; Ā_l = mean_h[(∇A_l ⊙ R^(A_l))⁺];
C = (I + Ā_L)(I + Ā_{L-1}) ⋯ (I + Ā_1) (R ← R + Ā_l·R from R = I, no row normalisation); the map is C's
class-token row with the prefix columns dropped.

The LRP pass follows the authors' code (``baselines/ViT/ViT_LRP.py``, ``modules/layers_ours.py``,
``generate_LRP`` with ``alpha=1``), with ``sd(a, b)`` their ``safe_divide`` (a / (b + 1e-9), 0 where b = 0):

* seed: the one-hot vector at the target's output (value 1, not f_c);
* Linear layers (qkv, proj, fc1, fc2, head): LRP-αβ with α = 1, β = 0 (z⁺), biases ignored:
  Z = x⁺W⁺ᵀ + x⁻W⁻ᵀ, R_in = x⁺ ⊙ (sd(R, Z) W⁺) + x⁻ ⊙ (sd(R, Z) W⁻);
* LayerNorm (norm1, norm2, the final norm), GELU, softmax, dropout: identity (R passes unchanged);
* residual additions z = a + b: a' = a ⊙ sd(R, z), b' = b ⊙ sd(R, z), then rescaled so that the two parts
  share Σ R in the ratio |Σ a'| : |Σ b'|; the copy that feeds a block and its residual: R = x ⊙ (sd(R₁, x) +
  sd(R₂, x));
* A·V: R^(A) = A ⊙ (sd(R_O, O) Vᵀ) / 2, R^(V) = V ⊙ (Aᵀ sd(R_O, O)) / 2; Q Kᵀ (unscaled, the scale is outside):
  R^(Q) = Q ⊙ (sd(R^(A), QKᵀ) K) / 2, R^(K) = K ⊙ (sd(R^(A), QKᵀ)ᵀ Q) / 2;
* class-token pooling (index select): R_0 = X_0 ⊙ sd(R, X_0).

Deviations, all forced by generality or batching (none changes a map the authors' code can produce):
the authors' Add sums Σ a', Σ b' over the whole batch and read batch item 0 only; here the sums run per
image and target, every item and target is explained at once. timm parts their ViT lacks get the rule their
code gives the nearest part: LayerScale, q/k norms and the attention's output norm pass R unchanged
(identity, like their LayerNorm); average pooling and DeiT's two-token mean are LRP-0 on the mean (their
``RelPropSimple``, as their AvgPool); a head that is a Sequential of Linear / activation / LayerNorm /
Dropout layers gets α1β0 on each Linear and identity elsewhere (task scores must be the identity).
Register tokens are prefix tokens like the class token.

The attention matrix is materialised (the method is defined on A and R^(A)), so timm's fused attention is
bypassed inside the call; ∇A_l is not formed by autograd over N×N leaves but as ∂f/∂O_l · V_lᵀ from the
per-head attention outputs O_l = A_l V_l (one batched backward for all targets), and the rollout keeps
only the class-token row, r ← r + r Ā_l from the last block down, consuming each layer as the LRP pass
reaches it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvit_explain.errors import ModelNotSupportedError
from medvit_explain.explainers.attnlrp import ELEMENTWISE, check_lrp_blocks, swapped_forwards
from medvit_explain.explainers.base import Explainer, HookSet, split_qkv, target_grads
from medvit_explain.registry import register

__all__ = ["TransformerAttribution", "alpha1_beta0", "inverse_or_zero", "safe_divide"]

CHEFER_CVPR = "Chefer, Gur & Wolf, 'Transformer Interpretability Beyond Attention Visualization', CVPR 2021"
_PASS_THROUGH = (nn.LayerNorm, nn.Dropout, nn.Identity, *ELEMENTWISE)


# ------------------------------------------------------------------------------------------ the rules


def safe_divide(a: Tensor, b: Tensor) -> Tensor:
    """The authors' ``safe_divide``: a / (b + 1e-9) (their clamp(min=1e-9) + clamp(max=1e-9) is b + 1e-9),
    a / 1e-9 where b = −1e-9, 0 wherever b == 0. The denominator and mask are formed on b alone, which is
    broadcast against a (a has the extra target dimension)."""
    return a * inverse_or_zero(b)


def inverse_or_zero(b: Tensor) -> Tensor:
    """1 / (b + 1e-9) (1e9 where that sum is 0), 0 where b == 0: ``safe_divide(a, b) = a · inverse_or_zero(b)``."""
    den = b + 1e-9
    den = torch.where(den == 0, 1e-9, den)
    return torch.where(b == 0, 0.0, 1.0 / den)


def alpha1_beta0(relevance: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """LRP-α1β0 for a linear layer (bias ignored): relevance [T, B, ..., out], x [B, ..., in] → [T, B, ..., in]."""
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    px, nx = x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(relevance, F.linear(px, pw) + F.linear(nx, nw))
    return px * (s @ pw) + nx * (s @ nw)


def residual_split(relevance: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The authors' ``Add.relprop`` per image and target: relevance [T, B, N, D], a and b [B, N, D]."""
    s = safe_divide(relevance, a + b)
    ra, rb = a * s, b * s
    a_sum, b_sum = ra.sum((-2, -1), keepdim=True), rb.sum((-2, -1), keepdim=True)
    total = relevance.sum((-2, -1), keepdim=True)
    a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * total
    b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * total
    return ra * safe_divide(a_fact, a_sum), rb * safe_divide(b_fact, b_sum)


def copy_merge(r1: Tensor, r2: Tensor, x: Tensor) -> Tensor:
    """The authors' ``Clone.relprop``: x ⊙ (sd(r1, x) + sd(r2, x))."""
    return x * safe_divide(r1 + r2, x)  # sd is linear in its first argument


# ------------------------------------------------------------------------------------------ the method


@register
class TransformerAttribution(Explainer):
    """Transformer Attribution maps [B, T, gh, gw] (non-negative: a rollout of clamped relevance × gradient)."""

    name = "transformer-attribution"
    title = "Transformer Attribution (LRP relevance x gradient of each attention map, rolled out)"
    citation = CHEFER_CVPR
    kind, space, rank = "attention-gradient", "token", 33

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        backbone = self.backbone
        rows = self._pool_rows()
        check_lrp_blocks(backbone, self.name)
        self._check_block_layout()
        recs: list[dict[str, Tensor]] = [{} for _ in backbone.blocks]
        final: dict[str, Tensor] = {}

        x = images.detach().requires_grad_(True)  # a graph even when every weight is frozen
        with (
            HookSet() as hooks,
            swapped_forwards((blk.attn, _recording_attention(recs[i])) for i, blk in enumerate(backbone.blocks)),
        ):
            for i, blk in enumerate(backbone.blocks):
                rec = recs[i]
                hooks.pre(blk, _store_input(rec, "x"))
                hooks.forward(blk.ls1, _store_output(rec, "a1"))
                hooks.forward(blk.ls2, _store_output(rec, "a2"))
                hooks.pre(blk.mlp.fc1, _store_input(rec, "fc1"))
                hooks.pre(blk.mlp.fc2, _store_input(rec, "fc2"))
            hooks.forward(backbone.norm, _store_output(final, "tokens"))
            pooled = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
        scores = self.scorer(pooled)
        head_layers = self._head_layers()  # checked after the forward: a head that fails says so first
        grads = target_grads(scores, [r["o"] for r in recs], target_idx)  # ∂f/∂O_l, each [T, B, H, N, dh]

        relevance = self._head_relevance(head_layers, pooled.detach(), scores.detach(), target_idx)
        r = self._pool_relevance(relevance, final["tokens"].detach(), rows)  # [T, B, N, D] at the last block
        n = r.shape[-2]
        cls_row = torch.zeros(r.shape[:2] + (1, n), dtype=r.dtype, device=r.device)
        cls_row[..., 0, 0] = 1.0
        for i in reversed(range(len(recs))):
            rec = {k: v.detach() for k, v in recs[i].items()}
            r, r_heads = self._block_to_attention(backbone.blocks[i], rec, r)
            rel_a, s = _attention_relevance(rec, r_heads)
            grad_a = grads[i] @ rec["v"].transpose(-2, -1).unsqueeze(0)  # ∇A = ∂f/∂O · Vᵀ, [T, B, H, N, N]
            a_bar = (grad_a * rel_a).clamp_min(0).mean(2)  # [T, B, N, N]
            cls_row = cls_row + cls_row @ a_bar
            if i > 0:
                r = self._attention_to_input(backbone.blocks[i], rec, r, rel_a, s)
        return cls_row[..., 0, self.spec.num_prefix :].reshape(*cls_row.shape[:2], *self.spec.grid).transpose(0, 1)

    # model structure ------------------------------------------------------------------------------

    def _pool_rows(self) -> list[int]:
        spec, backbone = self.spec, self.backbone
        if spec.read_rows is not None:
            return list(spec.read_rows)
        if backbone.global_pool == "avg":
            start = 0 if getattr(backbone, "pool_include_prefix", False) else spec.num_prefix
            return list(range(start, spec.num_prefix + spec.num_patches))
        raise ModelNotSupportedError(
            f"{self.name}: expected class-token or average pooling, got global_pool={backbone.global_pool!r}"
        )

    def _check_block_layout(self) -> None:
        """The LRP pass mirrors timm's pre-norm ``Block.forward``; any other block layout is refused."""
        from timm.models.vision_transformer import Block

        for i, blk in enumerate(self.backbone.blocks):
            if type(blk).forward is not Block.forward:
                raise ModelNotSupportedError(
                    f"{self.name}: expected timm's pre-norm Block (x + ls1(attn(norm1(x))), then "
                    f"x + ls2(mlp(norm2(x)))) in block {i}, got {type(blk).__name__}"
                )

    def _head_layers(self) -> list[nn.Module]:
        head = self.model.head
        layers = [head] if isinstance(head, nn.Linear) else list(head) if isinstance(head, nn.Sequential) else None
        if layers is None or not all(isinstance(m, (nn.Linear, *_PASS_THROUGH)) for m in layers):
            raise ModelNotSupportedError(
                f"{self.name}: expected a Linear head or a Sequential of Linear / activation / LayerNorm / Dropout "
                f"layers, got {type(head).__name__}"
            )
        return layers

    # the LRP pass ---------------------------------------------------------------------------------

    def _head_relevance(
        self, layers: Sequence[nn.Module], pooled: Tensor, scores: Tensor, target_idx: list[int]
    ) -> Tensor:
        """One-hot seed at the outputs → relevance at the pooled features [T, B, D]."""
        inputs, h = [], pooled
        with torch.no_grad():
            for m in layers:
                inputs.append(h)
                h = F.linear(h, m.weight, m.bias) if isinstance(m, nn.Linear) else m(h)
        if h.shape != scores.shape or not torch.allclose(h, scores, rtol=1e-5, atol=1e-6):
            raise ModelNotSupportedError(
                f"{self.name}: expected the head's task scores to be its raw outputs (no multiclass target)"
            )
        t, idx = len(target_idx), torch.as_tensor(target_idx, device=scores.device)
        r = torch.zeros((t, *scores.shape), dtype=scores.dtype, device=scores.device)
        r[torch.arange(t, device=scores.device), :, idx] = 1.0
        for m, inp in zip(reversed(layers), reversed(inputs), strict=True):
            if isinstance(m, nn.Linear):
                r = alpha1_beta0(r, inp, m.weight.detach())
        return r

    def _pool_relevance(self, r: Tensor, tokens: Tensor, rows: list[int]) -> Tensor:
        """Relevance at the pooled features [T, B, D] → at the final norm's input [T, B, N, D] (fc_norm and
        the final norm: identity; the pooling: LRP-0 on the mean of the rows it reads)."""
        picked = tokens[:, rows]  # [B, R, D]
        z = picked.mean(1, keepdim=True)
        out = torch.zeros((r.shape[0], *tokens.shape), dtype=r.dtype, device=r.device)
        out[:, :, rows] = picked * safe_divide(r.unsqueeze(2), z) / len(rows)
        return out

    def _block_to_attention(self, blk: nn.Module, rec: dict[str, Tensor], r: Tensor) -> tuple[Tensor, Tensor]:
        """Relevance at a block's output → (residual share at its input, relevance at the heads' outputs
        [T, B, H, N, dh])."""
        x_mid = rec["x"] + rec["a1"]
        r_mid, r_mlp = residual_split(r, x_mid, rec["a2"])
        r_mlp = alpha1_beta0(r_mlp, rec["fc2"], blk.mlp.fc2.weight.detach())
        r_mlp = alpha1_beta0(r_mlp, rec["fc1"], blk.mlp.fc1.weight.detach())  # act, norm2: identity
        r_mid = copy_merge(r_mid, r_mlp, x_mid)
        r_res, r_attn = residual_split(r_mid, rec["x"], rec["a1"])
        r_attn = alpha1_beta0(r_attn, rec["proj"], blk.attn.proj.weight.detach())
        t, b, n, _ = r_attn.shape
        heads = r_attn.reshape(t, b, n, blk.attn.num_heads, -1).transpose(2, 3)
        return r_res, heads

    def _attention_to_input(
        self, blk: nn.Module, rec: dict[str, Tensor], r_res: Tensor, rel_a: Tensor, s: Tensor
    ) -> Tensor:
        """The rest of the block's attention branch (V's half, Q Kᵀ, qkv) and the merge with the residual."""
        q, k, v = rec["q"], rec["k"], rec["v"]
        rel_v = v * torch.einsum("bhij,tbhid->tbhjd", rec["a"], s)  # s carries the 1/2; A is not copied T times
        s1 = safe_divide(rel_a, q @ k.transpose(-2, -1))  # softmax: identity
        rel_q = q * (s1 @ k) / 2
        rel_k = k * (s1.transpose(-2, -1) @ q) / 2
        t, b, _, n, _ = rel_q.shape
        rel_qkv = torch.stack([rel_q, rel_k, rel_v], 2).permute(0, 1, 4, 2, 3, 5).reshape(t, b, n, -1)
        r_t = alpha1_beta0(rel_qkv, rec["t"], blk.attn.qkv.weight.detach())  # norm1: identity
        return copy_merge(r_res, r_t, rec["x"])


def _attention_relevance(rec: dict[str, Tensor], r_heads: Tensor) -> tuple[Tensor, Tensor]:
    """A·V relprop: R^(A) = A ⊙ (sd(R_O, O) Vᵀ) / 2, [T, B, H, N, N]; also returns sd(R_O, O) / 2."""
    s = r_heads * (inverse_or_zero(rec["o"]) / 2)
    return rec["a"] * (s @ rec["v"].transpose(-2, -1)), s


# ------------------------------------------------------------------------------------------- capture


def _recording_attention(rec: dict[str, Tensor]):
    """A timm Attention forward with A materialised, recording t (its input), q, k, v (q/k norms applied),
    A, O = A·V (per head, in the graph: ∂f/∂O gives ∇A) and the projection's input."""

    def forward(attn: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ModelNotSupportedError("transformer-attribution: expected attention without a mask")
        q, k, v = split_qkv(attn, attn.qkv(x))
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        o = a @ v
        b, h, n, d = o.shape
        p = getattr(attn, "norm", nn.Identity())(o.transpose(1, 2).reshape(b, n, h * d))
        rec.update(t=x, q=q, k=k, v=v, a=a, o=o, proj=p)
        return attn.proj_drop(attn.proj(p))

    return forward


def _store_input(rec: dict[str, Tensor], key: str):
    def hook(module: nn.Module, args: tuple) -> None:
        rec[key] = args[0]

    return hook


def _store_output(rec: dict[str, Any], key: str):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        rec[key] = output

    return hook
