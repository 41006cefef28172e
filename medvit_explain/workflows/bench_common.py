"""The bench's workload and clock: the model, the slices, the machine, and paired timing.

Timings are wall-clock (``torch.cuda.synchronize`` around each on a GPU); see :mod:`.bench`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["bench_model", "machine_info", "model_info", "time_call", "time_paired"]


def bench_model(
    model_path: str | None = None,
    arch: str | None = None,
    device: str = "auto",
    image_size: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """The model to benchmark: a checkpoint (default: the shipped sample model) or a timm architecture
    with random weights (``in_chans=1``, the 9 LIDC targets, ``image_size`` or the variant's default)."""
    from ..model import build_model, load_model, resolve_device

    if arch is None:
        return load_model(model_path, device=device)
    kwargs: dict[str, Any] = {"in_chans": 1}
    if image_size:
        kwargs["img_size"] = [int(image_size), int(image_size)]
    config = {"name": f"{arch}-random", "architecture": {"timm_name": arch, "kwargs": kwargs}, "task_spec": "lidc"}
    torch.manual_seed(seed)
    model = build_model(config)
    return model.to(resolve_device(device)).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, long_s: float) -> dict[str, Any]:
    """Median wall time of ``fn`` after one warm-up call; a call longer than ``long_s`` is timed once
    more only if that fits in ``long_s`` again (the warm-up run is then kept as the one measurement)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    warm = time.perf_counter() - t0
    if warm > long_s:
        return {"seconds": warm, "runs": 1, "note": "single run (includes warm-up)"}
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if sum(times) > 2 * long_s:
            break
    return {"seconds": statistics.median(times), "runs": len(times)}


def time_paired(
    fn: Callable[[], Any], forward: Callable[[], Any], device: torch.device, repeats: int, long_s: float
) -> dict[str, Any]:
    """``fn`` timed as :func:`time_call`, each run right after a plain forward on the same slices;
    ``ratio_to_forward`` is the median of the per-run ratios, so a load change on a shared machine
    between the measurements does not skew it."""

    def timed(f: Callable[[], Any]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        f()
        _sync(device)
        return time.perf_counter() - t0

    forward()
    warm = timed(fn)
    if warm > long_s:
        runs = [(timed(forward), warm)]
        note = "single run (includes warm-up)"
    else:
        runs, note = [], None
        for _ in range(max(1, repeats)):
            runs.append((timed(forward), timed(fn)))
            if sum(t for _, t in runs) > 2 * long_s:
                break
    out = {
        "seconds": statistics.median(t for _, t in runs),
        "ratio_to_forward": statistics.median(t / f for f, t in runs),
        "runs": len(runs),
        "best_ratio_to_forward": min(t for _, t in runs) / min(f for f, _ in runs),
    }
    return {**out, "note": note} if note else out


def machine_info(device: torch.device) -> dict[str, Any]:
    import timm

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def model_info(model: nn.Module) -> dict[str, Any]:
    from ..explainers import inspect_model

    spec = inspect_model(model)
    bb = model.backbone
    return {
        "name": (getattr(model, "config", {}) or {}).get("name", type(model).__name__),
        "image_size": list(spec.img_size) if spec.img_size else None,
        "patch_grid": list(spec.grid),
        "depth": spec.depth,
        "embed_dim": int(bb.embed_dim),
        "num_heads": int(bb.blocks[0].attn.num_heads),
        "prefix_tokens": spec.num_prefix,
        "targets": len(model.targets),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _images(model: nn.Module, n: int, seed: int = 0) -> Tensor:
    """``n`` model inputs made from phantom slices (realistic content, not noise)."""
    from ..phantom import generate_phantom
    from ..prediction import model_inputs

    size = model.preprocessing["image_size"]
    phantom = generate_phantom(seed, size=(max(64, size[1]), max(64, size[0]), n), n_nodules=3)
    inputs = model_inputs(model, phantom.ct, None, None)
    images = inputs.images(np.arange(n)).as_subclass(Tensor)  # a plain tensor, not MONAI's MetaTensor
    return images.to(next(model.parameters()).device)
