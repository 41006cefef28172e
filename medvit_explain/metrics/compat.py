"""An explain function in the shape Quantus and Captum-style evaluation code expect.

    import quantus
    from medvit_explain.metrics import explain_func
    metric = quantus.FaithfulnessCorrelation(nr_runs=10, subset_size=64)
    scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func,
                    explain_func_kwargs={"method": "cdam"})

``y`` holds, per image, the index of the model output (target) to explain.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

__all__ = ["explain_func"]

# module → (its parameters' versions, its wrapped copy): Quantus calls explain_func once per batch with
# the same module; a parameter changed in place (e.g. a randomisation test) bumps its version
_WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _explainable(model):
    """``model`` itself if it follows the explainers' contract (``.backbone``, ``.head``, ``.targets``);
    else a timm / torchvision / MONAI ViT wrapped by :func:`medvit_explain.wrap_model`, re-wrapped
    whenever one of its parameters has changed since."""
    if hasattr(model, "backbone") and hasattr(model, "head") and hasattr(model, "targets"):
        return model
    from ..model import wrap_model

    versions = tuple(p._version for p in model.parameters())
    cached = _WRAPPED.get(model)
    if cached is None or cached[0] != versions:
        device = next(model.parameters()).device
        cached = (versions, wrap_model(model).to(device))
        _WRAPPED[model] = cached
    return cached[1]


def explain_func(model, inputs, targets, method: str = "cdam", **options: Any) -> np.ndarray:
    """Maps at input resolution ``[B, 1, H, W]`` (float32 numpy) for ``inputs`` ``[B, C, H, W]``.

    Args:
        model: a medvit-explain model, or a timm ``VisionTransformer`` with its head, a torchvision
            ``VisionTransformer`` or MONAI's ``ViT`` (wrapped with :func:`medvit_explain.wrap_model`;
            output ``k`` is target ``k``).
        inputs: images (numpy or torch), moved to the model's device.
        targets: per image, the output index (or name) to explain: an int / name for all images, or a
            sequence of ``B`` of them (Quantus passes ``y_batch``).
        method: any name from :func:`medvit_explain.registry.method_names`.
        **options: method options (``n_steps``, ``n_samples``, ...). Unknown keyword arguments that
            Quantus adds (``device``, ``softmax``, ...) are ignored.

    The raw signed token-grid map is upsampled bilinearly to ``H × W``; no normalisation.
    """
    from ..explainers import COMMON_OPTIONS, explain, upsample
    from ..registry import explainer_class

    model = _explainable(model)
    accepted = set(explainer_class(method).defaults) | set(COMMON_OPTIONS)
    options = {k: v for k, v in options.items() if k in accepted}
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
    x = x.float().to(device)
    b = x.shape[0]
    if isinstance(targets, (int, str, np.integer)):
        per_image = [targets] * b
    else:
        per_image = [t.item() if isinstance(t, (np.generic, torch.Tensor)) else t for t in list(targets)]
        if len(per_image) != b:
            raise ValueError(f"expected {b} targets (one per image), got {len(per_image)}")
    per_image = [int(t) if isinstance(t, (int, np.integer, float)) else t for t in per_image]
    spec = getattr(model, "task_spec", None)
    wanted = [spec.resolve([t])[0] for t in per_image] if spec is not None else per_image
    out = torch.zeros((b, 1, *x.shape[-2:]), dtype=torch.float32)
    for target in sorted(set(wanted)):
        rows = [i for i, t in enumerate(wanted) if t == target]
        maps = explain(model, x[rows], method, targets=[target], **options)  # [b', 1, gh, gw]
        out[rows] = upsample(maps.float(), tuple(x.shape[-2:])).cpu()
    return out.numpy()
