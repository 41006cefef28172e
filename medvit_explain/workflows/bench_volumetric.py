"""Benchmark of a volumetric (3D) ViT: what an explanation costs next to a plain forward pass, and its memory.

``run_bench_volumetric(model, ...)`` (``medvit-explain bench`` picks it for a model whose
``spatial_dims == 3``) measures, warm, on the same inputs, with repeats and the median reported:

* the workload: ``items`` model inputs ``[C, D, H, W]`` made from a phantom CT through
  :func:`~medvit_explain.prediction.model_inputs` (real content, not noise): in ROI mode the cubes around
  the phantom's nodule centres (repeated to fill the batch), in volume mode the whole phantom resampled into
  the model box (the one input repeated);
* ``forward``: plain batched inference (no explanation), the unit everything else is divided by;
* each method (default :data:`VOLUMETRIC_METHODS`), all targets at once, batched; and CDAM + AG-CAM
  together (``explain_many``, one shared forward);
* ``loop``: the papers' execution pattern for CDAM and AG-CAM (one input and one target per call, a fresh
  forward + backward each), measured on ``loop_items`` inputs and scaled to the batch, as a speed-up;
* memory, each run in a fresh subprocess (``python -m medvit_explain.bench --volumetric-memory-worker JSON``),
  a plain forward and CDAM + AG-CAM for all the model's targets: peak RSS above the process's level after
  the model is built (and ``torch.cuda.max_memory_allocated`` on a GPU), for two cases built with the given
  model's width (embed_dim, depth, heads) and targets and random, seeded weights:

  - ``crop_batch``: a batch of 8 crops of 64 × 64 × 64 voxels, patch 8 (an 8 × 8 × 8 token grid);
  - ``whole_volume``: a phantom CT (default 512 × 512 × 300 at 0.7 × 0.7 × 1.0 mm) through a volume-mode
    ViT with a 128³ box and patch 16: ``predict`` (forward) vs ``explain_volume(["cdam", "agcam"])`` and
    one map projected onto the CT's grid (``map_array``); the CT's bytes are reported beside the peak, so
    the memory beyond the CT itself is explicit.

Timings are as in :mod:`.bench` (each ratio the median over runs of time / a plain forward timed just
before it). The tests check that this runs and returns positive finite numbers, never the numbers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .bench import _time_loops, _time_methods, forward_clock
from .bench_common import machine_info, model_info
from .bench_workers import (
    CLINICAL_SPACING,
    MEMORY_METHODS,
    _subprocess_worker,
    _write_phantom,
    volumetric_memory_worker,
)

__all__ = [
    "DEFAULT_ITEMS",
    "DEFAULT_PHANTOM",
    "DEFAULT_WHOLE_VOLUME",
    "VOLUMETRIC_METHODS",
    "VolumetricBenchResult",
    "is_volumetric",
    "run_bench_volumetric",
    "volumetric_memory_worker",
]

VOLUMETRIC_METHODS = ("cdam", "agcam", "attention", "rollout", "gradcam")
DEFAULT_ITEMS = 8
DEFAULT_PHANTOM = (256, 256, 64)  # the phantom generator's default grid (1.4 x 1.4 x 2.5 mm, a 358 mm field)
DEFAULT_WHOLE_VOLUME = (512, 512, 300)  # at CLINICAL_SPACING: a chest CT as scanned
CROP_ITEMS, CROP_SIZE, CROP_PATCH = 8, 64, 8
VOLUME_BOX, VOLUME_PATCH = 128, 16
WORKER_FLAG = "--volumetric-memory-worker"


def is_volumetric(model: nn.Module) -> bool:
    """Whether ``model`` takes ``[B, C, D, H, W]`` inputs (a 3D token grid)."""
    return int(getattr(model, "spatial_dims", 2)) == 3


@dataclass
class VolumetricBenchResult:
    """One volumetric bench run. :meth:`to_dict` is the JSON ``--json`` prints (``"kind": "volumetric"``;
    ``memory`` is ``null`` when skipped); :func:`medvit_explain.report.bench.format_table` renders it."""

    machine: dict[str, Any]
    model: dict[str, Any]
    workload: dict[str, Any]
    forward_s: float
    forward_runs: int
    methods: dict[str, Any]
    together: dict[str, Any] | None = None
    loop: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None

    ORDER = ("machine", "model", "workload", "forward_s", "forward_runs", "methods", "together", "loop", "memory")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "volumetric"}
        for key in self.ORDER:
            value = getattr(self, key)
            if value is not None or key == "memory":
                out[key] = value
        return out


# -------------------------------------------------------------------------------------- workload


def _workload_inputs(model: nn.Module, items: int, phantom_size: Sequence[int], seed: int = 0):
    """``items`` model inputs [items, C, D, H, W] from a phantom, and what they are (for the JSON)."""
    from ..phantom import generate_phantom
    from ..prediction import model_inputs
    from ..transforms import Preprocessing

    size = tuple(int(s) for s in phantom_size)
    phantom = generate_phantom(seed, size=size, n_nodules=3)
    ct = phantom.ct
    info: dict[str, Any] = {"phantom": list(size), "phantom_spacing_mm": [float(s) for s in ct.spacing]}
    if Preprocessing.from_config(model.preprocessing).mode == "roi":
        centres = np.array([n["center_mm"] for n in phantom.nodules], dtype=np.float64).reshape(-1, 3)
        if len(centres) == 0:  # a grid too small for a nodule: the middle of the CT
            middle = (np.asarray(ct.shape, dtype=np.float64) - 1) / 2
            centres = ct.index_to_physical(middle[None])
        inputs = model_inputs(model, ct, roi_centers=centres)
        images = inputs.images(np.arange(items) % len(centres))
        info.update(mode="roi", rois=len(centres), nodules=len(phantom.nodules))
    else:
        inputs = model_inputs(model, ct)
        images = inputs.images([0]).repeat(items, 1, 1, 1, 1)  # a real batch (a copy, not a broadcast view)
        info.update(mode="volume")
    images = images.as_subclass(Tensor).contiguous()  # a plain tensor, not MONAI's MetaTensor
    return images.to(next(model.parameters()).device), info


# ------------------------------------------------------------------------------------------ timing


def run_bench_volumetric(
    model: nn.Module,
    *,
    items: int = DEFAULT_ITEMS,
    repeats: int = 5,
    methods: Sequence[str] | None = None,
    loop_items: int = 2,
    phantom_size: Sequence[int] = DEFAULT_PHANTOM,
    memory: bool = True,
    whole_volume: Sequence[int] = DEFAULT_WHOLE_VOLUME,
    precision: str = "fp32",
    long_s: float = 20.0,
    progress: Callable[[str], None] | None = None,
) -> VolumetricBenchResult:
    """Run the volumetric benchmark on ``model`` (on its device); returns a :class:`VolumetricBenchResult`.

    ``methods``: default :data:`VOLUMETRIC_METHODS`. ``phantom_size`` ([X, Y, Z] voxels at the phantom's
    default spacing): the CT the timed inputs come from. ``whole_volume`` ([X, Y, Z] at
    :data:`~.bench_workers.CLINICAL_SPACING`): the memory case's CT; ``precision`` applies to it
    (``explain_volume``'s autocast). ``memory=False`` skips the memory subprocesses.
    """
    if not is_volumetric(model):
        raise ValueError("run_bench_volumetric needs a volumetric model (spatial_dims 3); use run_bench")
    say = progress or (lambda msg: None)
    device = next(model.parameters()).device
    model.eval()
    methods = list(methods) if methods else list(VOLUMETRIC_METHODS)
    targets = list(range(len(model.targets)))
    say("workload: phantom inputs")
    images, inputs_info = _workload_inputs(model, items, phantom_size)
    n_loop = min(loop_items, items)
    workload = {
        "items": items,
        "input_shape": list(images.shape[1:]),
        **inputs_info,
        "targets": len(targets),
        "repeats": repeats,
        "loop_items": n_loop,
    }
    result: dict[str, Any] = {"machine": machine_info(device), "model": model_info(model), "workload": workload}

    say("forward")
    fwd, paired = forward_clock(model, images, device, repeats, long_s)
    result["forward_s"], result["forward_runs"] = fwd["seconds"], fwd["runs"]

    result.update(_time_methods(model, images, methods, targets, paired, say))
    result["loop"] = _time_loops(model, images, targets, n_loop, result["methods"], paired, say, unit="items")
    if memory:
        result["memory"] = _memory(model, str(device), whole_volume, precision, say)
    return VolumetricBenchResult(**result)


# ------------------------------------------------------------------------------------------ memory


def _memory_config(model: nn.Module, mode: str, size: int, patch: int, name: str) -> dict[str, Any]:
    """A volumetric ViT config with ``model``'s width, depth, heads, head and targets, a ``size``³ input
    and patch ``patch`` (random weights: built by the worker under a fixed seed)."""
    from ..model.network import FORMAT

    config = dict(getattr(model, "config", None) or {})
    info = model_info(model)
    arch = dict(config.get("architecture") or {})
    kwargs = dict(arch.get("kwargs") or {}) if arch.get("patch_embed") == "conv3d" else {}
    kwargs.update(
        img_size=[size] * 3,
        patch_size=[patch] * 3,
        in_chans=int(model.input_size[0]),
        embed_dim=info["embed_dim"],
        depth=info["depth"],
        num_heads=info["num_heads"],
    )
    pre = dict(model.preprocessing)
    pre.update(mode=mode, image_size=[size] * 3)
    if mode == "volume":
        pre["crop_body"] = True  # a whole-CT model sees the body, not the air around it
    out = {
        "format": FORMAT,
        "name": name,
        "architecture": {"timm_name": arch.get("timm_name", "vit_tiny_patch16_224"), "patch_embed": "conv3d"}
        | ({"norm_eps": arch["norm_eps"]} if "norm_eps" in arch else {})
        | {"kwargs": kwargs},
        "task_spec": config.get("task_spec", "lidc"),
        "preprocessing": pre,
    }
    if "head" in config:
        out["head"] = config["head"]
    return out


def _memory(model: nn.Module, device: str, whole_volume: Sequence[int], precision: str, say) -> dict[str, Any]:
    """The two memory cases, forward and CDAM + AG-CAM each in a fresh subprocess."""
    info = model_info(model)
    threads = torch.get_num_threads()
    crop_grid = [CROP_SIZE // CROP_PATCH] * 3
    box_grid = [VOLUME_BOX // VOLUME_PATCH] * 3
    cases: dict[str, Any] = {
        "crop_batch": {
            "label": f"crop batch {CROP_SIZE}³",
            "items": CROP_ITEMS,
            "input_size": [CROP_SIZE] * 3,
            "patch": CROP_PATCH,
            "grid": crop_grid,
            "inputs": "seeded uniform random crops (memory does not depend on the content)",
        },
        "whole_volume": {
            "label": "whole volume",
            "size": [int(s) for s in whole_volume],
            "spacing_mm": list(CLINICAL_SPACING),
            "box": [VOLUME_BOX] * 3,
            "patch": VOLUME_PATCH,
            "grid": box_grid,
            "precision": precision,
        },
    }
    base = {"device": device, "threads": threads, "seed": 0}
    with tempfile.TemporaryDirectory(prefix="medvit-bench3d-") as tmp:
        shape = tuple(int(s) for s in whole_volume)
        say(f"memory: writing a {' x '.join(map(str, shape))} phantom CT")
        path = _write_phantom(Path(tmp) / "whole.nii", shape, seed=99, spacing=CLINICAL_SPACING)  # uncompressed
        jobs = {
            "crop_batch": {
                **base,
                "case": "crop_batch",
                "items": CROP_ITEMS,
                "config": _memory_config(model, "roi", CROP_SIZE, CROP_PATCH, f"bench-crop{CROP_SIZE}-p{CROP_PATCH}"),
            },
            "whole_volume": {
                **base,
                "case": "whole_volume",
                "path": str(path),
                "precision": precision,
                "config": _memory_config(
                    model, "volume", VOLUME_BOX, VOLUME_PATCH, f"bench-volume{VOLUME_BOX}-p{VOLUME_PATCH}"
                ),
            },
        }
        for key, job in jobs.items():
            runs = {}
            for run in ("forward", "cdam+agcam"):
                say(f"memory: {cases[key]['label']}, {run} (fresh process)")
                runs[run] = _subprocess_worker(WORKER_FLAG, {**job, "run": run})
            case = cases[key]
            case["input_bytes"] = runs["forward"]["input_bytes"]
            case["runs"] = runs
            fwd, expl = runs["forward"]["peak_above_model_bytes"], runs["cdam+agcam"]["peak_above_model_bytes"]
            case["explain_over_forward"] = expl / fwd if fwd and expl is not None else None
    return {
        "embed_dim": info["embed_dim"],
        "depth": info["depth"],
        "num_heads": info["num_heads"],
        "targets": info["targets"],
        "weights": "random (seed 0)",
        "methods": list(MEMORY_METHODS),
        **cases,
    }
