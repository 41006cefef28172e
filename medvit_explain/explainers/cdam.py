"""CDAM and its smooth / integrated variants (Brocki, Binda & Chung, arXiv:2312.02364).

T = output of the last block's norm1 (the tokens entering the last attention), [B, P+N, D].
S_{i,c} = Σ_j T_ij ∂f_c/∂T_ij for each patch token i; signed, not normalised.

Fast path (pooling reads prefix rows only, e.g. class-token pooling): f depends on T only through the
last attention's rows R that the pooling reads, so with o_R the per-head attention outputs at R,
  ∂f/∂v_j = Σ_r A_rj g_r,  ∂f/∂k_j = scale Σ_r dS_rj q_r,  dS = A ⊙ (g·Vᵀ − Σ A (g·Vᵀ)),
where g = ∂f/∂o_R comes from re-running only rows R through the rest of the block, final norm, pooling
and head. Since k = W_k T + b_k and v = W_v T + b_v, Σ_j T_ij ∂f/∂T_ij = (k_i − b_k)·∂f/∂k_i +
(v_i − b_v)·∂f/∂v_i for patch tokens i: no backward through the qkv projection, all targets at once;
without a k norm the head dimension is contracted first, so nothing of size targets × tokens × dim is formed.
General path (any other pooling, gated attention): autograd on the last block, batched over targets.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor, nn

from medvit_explain.errors import MethodError
from medvit_explain.explainers.base import (
    BlockTap,
    Explainer,
    HookSet,
    attention_output,
    pooled_from_tokens,
    run_prefix_chain,
    target_grads,
    tokens_to_grid,
)
from medvit_explain.registry import register

CDAM_PAPER = (
    "Brocki, Binda & Chung, 'Class-Discriminative Attention Maps for Vision Transformers', arXiv:2312.02364 (2023)"
)
STOCHASTIC = {"internal_batch_size": None, "seed": 0}

__all__ = ["CDAM", "IntegratedCDAM", "SmoothCDAM", "last_block_token_grads"]


def last_block_token_grads(explainer: Explainer, x_in: Tensor, target_idx: list[int]) -> tuple[Tensor, Tensor]:
    """Run the last block from its input x_in [B, N, D] with grad; return T [B, N, D] (norm1 output) and
    ∂f_c/∂T [T, B, N, D] for every target (one batched backward)."""
    backbone = explainer.backbone
    blk = backbone.blocks[-1]
    leaf: list[Tensor] = []

    def make_leaf(module: nn.Module, args: tuple) -> tuple:
        t = args[0].detach().requires_grad_(True)
        leaf.append(t)
        return (t, *args[1:])

    with HookSet() as hooks:
        hooks.pre(blk.attn, make_leaf)
        out = blk(x_in.detach())
    scores = explainer.scorer(pooled_from_tokens(backbone, out))
    (grad,) = target_grads(scores, leaf, target_idx)
    return leaf[0].detach(), grad


@register
class CDAM(Explainer):
    """Class CDAM (or concept CDAM with ``concept=example_images``): [B, T, gh, gw], signed."""

    name = "cdam"
    title = "Class-discriminative attention map (token × gradient at the last attention input)"
    citation = CDAM_PAPER
    kind, space, rank = "gradient", "token", 10
    defaults = MappingProxyType({"concept": None})
    fast_path = True  # tests switch this off to check the general path against the same reference

    def _use_fast_path(self) -> bool:
        attn = self.backbone.blocks[-1].attn
        return (
            self.fast_path
            and self.spec.read_rows is not None
            and isinstance(attn.qkv, nn.Linear)
            and getattr(attn, "gate", None) is None
        )

    # forward passes ------------------------------------------------------------------------------

    def _capture(self, run) -> tuple[dict[str, Tensor], Tensor]:
        """Run ``run()`` under no_grad with a tap on the last block; return its record and output."""
        blocks = self.backbone.blocks
        rec: dict[str, Tensor] = {}
        out: list[Tensor] = []
        with torch.no_grad(), BlockTap(blocks, [len(blocks) - 1], lambda i, r: rec.update(r)), HookSet() as h:
            h.forward(blocks[-1], lambda module, args, output: out.append(output))
            run()
        return rec, out[-1]

    def _cdam_from_input(self, x_in: Tensor, target_idx: list[int]) -> Tensor:
        """CDAM scores [T, B, P+N] with the last block's input set to x_in [B, P+N, D]."""
        if not self._use_fast_path():
            t, grad = last_block_token_grads(self, x_in, target_idx)
            return (t.unsqueeze(0) * grad).sum(-1)
        rec, out = self._capture(lambda: self.backbone.blocks[-1](x_in))
        return self._cdam_fast(rec, out, target_idx)

    def _cdam_fast(self, rec: dict[str, Tensor], final_tokens: Tensor, target_idx: list[int]) -> Tensor:
        backbone = self.backbone
        attn = backbone.blocks[-1].attn
        rows = self.spec.read_rows
        r = len(rows)
        q, k, v, qkv = rec["q"], rec["k"], rec["v"], rec["qkv"]
        q_r = q[:, :, :r] * attn.scale  # [B, H, R, dh]
        logits = q_r @ k.transpose(-2, -1)  # [B, H, R, N]
        a = logits.softmax(-1)
        heads = (a @ v).requires_grad_(True)  # [B, H, R, dh], graph leaf
        with torch.enable_grad():
            pooled = run_prefix_chain(
                backbone,
                len(backbone.blocks) - 1,
                rec["x"][:, :r],
                [attention_output(attn, heads)],
                final_tokens,
                rows,
                rows,
            )
            scores = self.scorer(pooled)
        (g,) = target_grads(scores, [heads], target_idx)  # [T, B, H, R, dh]
        if isinstance(attn.k_norm, nn.Identity):
            return self._contracted(attn, g, a, logits, q_r, v)
        d_a = torch.einsum("tbhrd,bhnd->tbhrn", g, v)
        d_s = a * (d_a - (a * d_a).sum(-1, keepdim=True))
        d_v = torch.einsum("bhrn,tbhrd->tbhnd", a, g)
        d_k = torch.einsum("tbhrn,bhrd->tbhnd", d_s, q_r)
        b, n, _ = qkv.shape
        raw = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        k_raw, v_raw = raw[1], raw[2]
        if not isinstance(attn.k_norm, nn.Identity):
            with torch.enable_grad():
                k_leaf = k_raw.detach().requires_grad_(True)
                k_normed = attn.k_norm(k_leaf)
                (d_k,) = torch.autograd.grad(
                    k_normed,
                    k_leaf,
                    d_k if len(target_idx) > 1 else d_k[0],
                    is_grads_batched=len(target_idx) > 1,
                )
            if len(target_idx) == 1:
                d_k = d_k.unsqueeze(0)
        bias = attn.qkv.bias
        if bias is not None:
            bias = bias.detach().reshape(3, attn.num_heads, 1, attn.head_dim)
            k_raw, v_raw = k_raw - bias[1], v_raw - bias[2]
        return torch.einsum("bhnd,tbhnd->tbn", k_raw, d_k) + torch.einsum("bhnd,tbhnd->tbn", v_raw, d_v)

    @staticmethod
    def _contracted(attn: nn.Module, g: Tensor, a: Tensor, logits: Tensor, q_r: Tensor, v: Tensor) -> Tensor:
        """The fast path's last step with the head dimension contracted first (k not normalised).

        With k = W_k T + b_k: Σ_d (k_i − b_k)_d ∂f/∂k_id = Σ_r dS_ri (L_ri − q_r·b_k), L = q_r·kᵀ (scaled
        logits); and Σ_d (v_i − b_v)_d ∂f/∂v_id = Σ_r A_ri (g_r·v_i − g_r·b_v). So S_i = Σ_h Σ_r [dS ⊙ (L −
        q·b_k) + A ⊙ (g·Vᵀ − g·b_v)]: only [T, B, H, R, N] tensors, never [T, B, H, N, dh]. Returns [T, B, N].
        """
        t, b, h, r, d = g.shape
        g_bh = g.permute(1, 2, 0, 3, 4).reshape(b, h, t * r, d)  # [B, H, T·R, dh]
        d_a = (g_bh @ v.transpose(-2, -1)).reshape(b, h, t, r, -1)  # g·Vᵀ  [B, H, T, R, N]
        a_t = a.unsqueeze(2)  # [B, H, 1, R, N]
        d_s = a_t * (d_a - (a_t * d_a).sum(-1, keepdim=True))
        bias = attn.qkv.bias
        if bias is not None:
            bias = bias.detach().reshape(3, h, 1, d)
            logits = logits - (q_r * bias[1]).sum(-1, keepdim=True)
            d_a = d_a - (g_bh * bias[2]).sum(-1).reshape(b, h, t, r, 1)
        scores = (d_s * logits.unsqueeze(2) + a_t * d_a).sum((1, 3))  # [B, T, N]
        return scores.transpose(0, 1)

    # method ----------------------------------------------------------------------------------------

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        rec, out = self._capture(lambda: self.backbone.forward_features(images))
        return self.from_record(rec, out, target_idx)

    def from_record(self, rec: dict[str, Tensor], final_tokens: Tensor, target_idx: list[int]) -> Tensor:
        """CDAM [B, T, gh, gw] from a no-grad forward's last-block record (``BlockTap``: x, t, qkv, q, k, v)
        and the last block's output [B, P+N, D]; lets another method share that forward."""
        if self._use_fast_path():
            scores = self._cdam_fast(rec, final_tokens, target_idx)
        else:
            t, grad = last_block_token_grads(self, rec["x"], target_idx)
            scores = (t.unsqueeze(0) * grad).sum(-1)
        return tokens_to_grid(scores.transpose(0, 1), self.spec)

    def _last_block_input(self, images: Tensor) -> Tensor:
        rec: dict[str, Tensor] = {}
        blocks = self.backbone.blocks
        with torch.no_grad(), HookSet() as h:
            h.pre(blocks[-1], lambda module, args: rec.update(x=args[0]))
            # stop after capturing the input of the last block: run the stem and blocks[:-1] only
            self._run_until_last_block(images, h, rec)
        return rec["x"]

    def _run_until_last_block(self, images: Tensor, hooks: HookSet, rec: dict) -> None:
        class _Stop(Exception):
            pass

        def stop(module: nn.Module, args: tuple) -> None:
            raise _Stop

        hooks.pre(self.backbone.blocks[-1], stop)
        try:
            self.backbone.forward_features(images)
        except _Stop:
            pass

    def _averaged(self, images: Tensor, target_idx: list[int], scales: list[float], noise_level: float) -> Tensor:
        """Mean CDAM over last-block inputs s·x + ε_s, ε_s ~ N(0, σ²), σ = noise_level·(max x − min x)."""
        x = self._last_block_input(images)
        b = x.shape[0]
        sigma = noise_level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))  # per image
        gen = torch.Generator(device=x.device).manual_seed(int(self.options.get("seed") or 0))
        total = torch.zeros((len(target_idx), b, x.shape[1]), dtype=x.dtype, device=x.device)
        for sl in self._chunks(len(scales), per_item=b):
            parts = []
            for s in scales[sl]:
                xs = x * s
                if noise_level:
                    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                    xs = xs + sigma[:, None, None] * noise
                parts.append(xs)
            m = len(parts)
            scores = self._cdam_from_input(torch.cat(parts, 0), target_idx)  # [T, m·B, N]
            total += scores.reshape(len(target_idx), m, b, -1).sum(1)
        return tokens_to_grid((total / len(scales)).transpose(0, 1), self.spec)


@register
class SmoothCDAM(CDAM):
    """Smooth CDAM: mean CDAM over ``n_samples`` noisy copies of the last block's input (λ = noise_level)."""

    name = "cdam-smooth"
    title = "Smooth CDAM (average CDAM over noise added to the last block's input)"
    rank = 11
    defaults = MappingProxyType({"concept": None, "noise_level": 0.05, "n_samples": 50, **STOCHASTIC})

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        n = int(self.options["n_samples"])
        return self._averaged(images, target_idx, [1.0] * n, float(self.options["noise_level"]))


@register
class IntegratedCDAM(CDAM):
    """Integrated CDAM: mean CDAM at last-block inputs (k/m)·x, k = 1 … m−1 (zero baseline)."""

    name = "cdam-integrated"
    title = "Integrated CDAM (average CDAM along a path from a zero last-block input)"
    rank = 12
    defaults = MappingProxyType({"concept": None, "n_steps": 50, "noise_level": 0.0, **STOCHASTIC})

    @classmethod
    def validate(cls, options) -> None:
        if options["n_steps"] < 2:
            raise MethodError(f"option n_steps expected an integer >= 2 for cdam-integrated, got {options['n_steps']}")

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        m = int(self.options["n_steps"])
        scales = [k / m for k in range(1, m)]
        return self._averaged(images, target_idx, scales, float(self.options["noise_level"]))
