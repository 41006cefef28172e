"""The papers' execution pattern for CDAM and AG-CAM (one slice and one target per call, a fresh forward
+ backward each) and pytorch-grad-cam's Grad-CAM: what the bench compares the batched explainers with."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["LOOPS", "gradcam_available", "loop_agcam", "loop_cdam", "run_pytorch_gradcam"]


@contextlib.contextmanager
def _param_grads_restored(model: nn.Module):
    """The papers' loops call ``.backward()`` (which fills every parameter's ``.grad``); put them back."""
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.grad = None
        yield
    finally:
        for p, g in saved:
            p.grad = g


def loop_cdam(model: nn.Module, images: Tensor, target_idx: Sequence[int]) -> Tensor:
    """CDAM the way the paper's code runs it: per image and per target a fresh forward with a hook on the
    last block's norm1 output T, ``.backward()`` on that target's output (a full backward, every
    parameter's gradient included), S_i = Σ_j T_ij ∂f/∂T_ij. Returns [B, T, gh, gw], the same maps as
    ``explain(model, images, "cdam")``."""
    from ..explainers.base import HookSet, captured, inspect_model, tokens_to_grid

    spec = inspect_model(model)
    norm1 = model.backbone.blocks[-1].norm1
    out = torch.zeros((images.shape[0], len(target_idx), *spec.grid), device=images.device)
    with captured(model), _param_grads_restored(model):
        for b in range(images.shape[0]):
            for j, c in enumerate(target_idx):
                store: dict[str, Tensor] = {}

                def keep(module, args, output, store=store):
                    store["t"] = output
                    output.register_hook(lambda grad: store.update(grad=grad))

                with HookSet() as hooks:
                    hooks.forward(norm1, keep)
                    score = model(images[b : b + 1].detach().requires_grad_(True))[0, c]
                model.zero_grad(set_to_none=True)
                score.backward()
                out[b, j] = tokens_to_grid((store["t"] * store["grad"]).sum(-1)[0].detach(), spec)
    return out


def loop_agcam(model: nn.Module, images: Tensor, target_idx: Sequence[int]) -> Tensor:
    """AG-CAM the way the paper's code runs it: per image and per target a fresh forward with explicit
    attention matrices (fused attention off; every attention input detached, as the definition needs),
    ``.backward()`` on that target's output with hooks collecting ∂f/∂A; L = Σ_k Σ_h ReLU(∂f/∂A[CLS]) ⊙
    sigmoid(S[CLS]). Returns [B, T, gh, gw], the same maps as ``explain(model, images, "agcam")``."""
    from ..explainers.base import HookSet, captured, inspect_model, split_qkv, tokens_to_grid

    spec = inspect_model(model)
    blocks = model.backbone.blocks
    out = torch.zeros((images.shape[0], len(target_idx), *spec.grid), device=images.device)
    with captured(model), _param_grads_restored(model):
        for blk in blocks:
            blk.attn.fused_attn = False
        for b in range(images.shape[0]):
            for j, c in enumerate(target_idx):
                grads: dict[int, Tensor] = {}
                scores: list[Tensor] = []
                with HookSet() as hooks:
                    for i, blk in enumerate(blocks):
                        attn = blk.attn
                        # detached attention input, made a leaf so A is in the graph even with frozen weights
                        hooks.pre(attn, lambda module, args: (args[0].detach().requires_grad_(True), *args[1:]))

                        def grab(module, args, output, i=i, grads=grads):
                            output.register_hook(lambda grad: grads.update({i: grad}))

                        def s_cls(module, args, output, attn=attn, scores=scores):
                            with torch.no_grad():
                                q, k, _ = split_qkv(attn, output)
                                scores.append(((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1))[:, :, 0])

                        hooks.forward(attn.attn_drop, grab)
                        hooks.forward(attn.qkv, s_cls)
                    score = model(images[b : b + 1].detach())[0, c]
                model.zero_grad(set_to_none=True)
                score.backward()
                total = sum((grads[i][:, :, 0].clamp_min(0) * s.sigmoid()).sum(1) for i, s in enumerate(scores))
                out[b, j] = tokens_to_grid(total[0].detach(), spec)
    return out


LOOPS = {"cdam": loop_cdam, "agcam": loop_agcam}


def gradcam_available() -> bool:
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        return False
    return True


def run_pytorch_gradcam(model: nn.Module, images: Tensor, target_idx: Sequence[int]) -> np.ndarray:
    """pytorch-grad-cam's GradCAM on the last block's norm1 tokens (prefix tokens dropped, reshaped to
    [B, D, gh, gw]), one call per target on the whole batch (that is how the library works): [B, T, H, W].
    The library calls ``.backward()``; the parameters' ``.grad`` it leaves are cleared afterwards."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from ..explainers.base import inspect_model

    spec = inspect_model(model)
    gh, gw = spec.grid

    def reshape_transform(tokens: Tensor) -> Tensor:
        t = tokens[:, spec.num_prefix :]
        return t.reshape(t.shape[0], gh, gw, t.shape[-1]).permute(0, 3, 1, 2)

    maps = []
    try:
        with GradCAM(
            model=model, target_layers=[model.backbone.blocks[-1].norm1], reshape_transform=reshape_transform
        ) as cam:
            for c in target_idx:
                maps.append(cam(input_tensor=images, targets=[ClassifierOutputTarget(c)] * images.shape[0]))
    finally:
        model.zero_grad(set_to_none=True)
    return np.stack(maps, 1)
