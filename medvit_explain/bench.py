"""Benchmark: how much an explanation costs next to a plain forward pass, and what memory it needs.

``run_bench(model, ...)`` measures, warm, on the same slices, with repeats and the median reported:

* ``forward``: plain batched inference (no explanation), the unit everything else is divided by;
* every method in the registry, all K targets at once, batched; and CDAM + AG-CAM together
  (``explain_many``, one shared forward);
* ``loop``: the papers' execution pattern for CDAM and AG-CAM (one slice and one target per call, a
  fresh forward + backward each), measured on a few slices and scaled per slice;
* pytorch-grad-cam's Grad-CAM on the same ViT and slices, one call per target (optional dependency);
* end to end on a phantom volume: load → ``explain_volume`` (CDAM + AG-CAM) → overlays written;
* peak memory of two subprocesses explaining N and 4·N slices, with the input and output volume bytes,
  so "growth beyond the volumes themselves" is explicit;
* ``clinical`` (``--e2e-size X Y Z``, e.g. 512 512 300 at 0.7 × 0.7 × 1.0 mm): the whole ``explain`` job
  as a user runs it (imports, model load, load, preprocess, model, explain, project, write, report) in
  a fresh subprocess, with every stage's seconds, the bytes written and the process's peak RSS; run
  once for all the model's targets and once for the primary target alone, so the memory that depends
  on the number of maps is explicit.

Timings are wall-clock (``torch.cuda.synchronize`` around each on a GPU). Each ratio is the median over
runs of (time / a plain forward timed just before it), which holds up on a shared machine whose load
drifts; ``seconds`` is the median time. Benchmarks are separate from
tests: the tests check that this runs and returns positive finite numbers, never the numbers.
The subprocess worker is ``python -m medvit_explain.bench --memory-worker JSON``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["TARGET_RATIOS", "bench_model", "format_table", "loop_agcam", "loop_cdam", "run_bench"]

# the targets (ratios to a plain forward; speed-ups over the per-slice, per-target loop)
TARGET_RATIOS = {"cdam": 1.3, "agcam": 1.3, "cdam+agcam": 1.5}
TARGET_LOOP_SPEEDUP = {"cpu": 20.0, "cuda": 100.0}
TARGET_MEMORY_EXCESS = 0.10
LOOP_METHODS = ("cdam", "agcam")
DEFAULT_VOLUME = (192, 192, 32)
CLINICAL_SPACING = (0.7, 0.7, 1.0)  # mm: a chest CT's usual in-plane and slice spacing
TARGET_CLINICAL = {"seconds": 45.0, "peak_rss_bytes": 2.5e9, "bytes_written": 400e6, "targets_rss_growth": 0.10}
TARGET_CLINICAL_GPU_SECONDS = 5.0


# ----------------------------------------------------------------------------------------- model


def bench_model(
    model_path: str | None = None,
    arch: str | None = None,
    device: str = "auto",
    image_size: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """The model to benchmark: a checkpoint (default: the shipped sample model) or a timm architecture
    with random weights (``in_chans=1``, the 9 LIDC targets, ``image_size`` or the variant's default)."""
    from .model import build_model, load_model, resolve_device

    if arch is None:
        return load_model(model_path, device=device)
    kwargs: dict[str, Any] = {"in_chans": 1}
    if image_size:
        kwargs["img_size"] = [int(image_size), int(image_size)]
    config = {"name": f"{arch}-random", "architecture": {"timm_name": arch, "kwargs": kwargs}, "task_spec": "lidc"}
    torch.manual_seed(seed)
    model = build_model(config)
    return model.to(resolve_device(device)).eval()


# ---------------------------------------------------------------------------------------- timing


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


# ------------------------------------------------------------------------------ the papers' loops


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
    from .explainers.base import HookSet, captured, inspect_model, tokens_to_grid

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
    from .explainers.base import HookSet, captured, inspect_model, split_qkv, tokens_to_grid

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


# ------------------------------------------------------------------------------ pytorch-grad-cam


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

    from .explainers.base import inspect_model

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


# ---------------------------------------------------------------------------------------- machine


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
    from .explainers import inspect_model

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


# -------------------------------------------------------------------------------- the benchmark


def _images(model: nn.Module, n: int, seed: int = 0) -> Tensor:
    """``n`` model inputs made from phantom slices (realistic content, not noise)."""
    from .phantom import generate_phantom
    from .prediction import model_inputs

    size = model.preprocessing["image_size"]
    phantom = generate_phantom(seed, size=(max(64, size[1]), max(64, size[0]), n), n_nodules=3)
    inputs = model_inputs(model, phantom.ct, None, None)
    images = inputs.images(np.arange(n)).as_subclass(Tensor)  # a plain tensor, not MONAI's MetaTensor
    return images.to(next(model.parameters()).device)


def run_bench(
    model: nn.Module,
    *,
    slices: int = 16,
    repeats: int = 5,
    methods: Sequence[str] | None = None,
    loop_slices: int = 2,
    volume: Sequence[int] = DEFAULT_VOLUME,
    memory: bool = True,
    batch_size: int = 16,
    precision: str = "fp32",
    long_s: float = 20.0,
    model_source: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    clinical_size: Sequence[int] | None = None,
    clinical_only: bool = False,
    map_dtype: str = "int16",
) -> dict[str, Any]:
    """Run the benchmark on ``model`` (on its device); returns the result dict (see ``format_table``).

    ``model_source`` tells the memory subprocesses how to rebuild the model
    (``{"model_path": ...}`` or ``{"arch": ..., "image_size": ..., "seed": ...}``); without it the model is
    saved to a temporary checkpoint for them. ``clinical_size`` ([X, Y, Z]) adds the whole ``explain``
    job on a phantom of that size (see :func:`clinical_case`); ``clinical_only`` runs only that.
    """
    from .explainers import explain, explain_many
    from .registry import method_names

    say = progress or (lambda msg: None)
    device = next(model.parameters()).device
    model.eval()
    if clinical_only:
        if clinical_size is None:
            raise ValueError("clinical_only needs a clinical_size")
        result = {"machine": machine_info(device), "model": model_info(model), "workload": {"batch_size": batch_size}}
        with tempfile.TemporaryDirectory(prefix="medvit-bench-") as tmp:
            source = _model_source(model, model_source, Path(tmp))
            result["clinical"] = clinical_case(
                source, str(device), Path(tmp), clinical_size, batch_size, precision, map_dtype, say
            )
        result["targets_check"] = check_targets(result)
        return result
    methods = list(methods) if methods else method_names()
    k = len(model.targets)
    targets = list(range(k))
    images = _images(model, slices)
    result: dict[str, Any] = {
        "machine": machine_info(device),
        "model": model_info(model),
        "workload": {
            "slices": slices,
            "targets": k,
            "repeats": repeats,
            "loop_slices": min(loop_slices, slices),
            "volume": list(volume),
            "batch_size": batch_size,
            "precision": precision,
        },
    }

    def forward() -> None:
        with torch.no_grad():
            model(images)

    say("forward")
    fwd = time_call(forward, device, repeats, long_s)
    forward_s = fwd["seconds"]
    result["forward_s"] = forward_s
    result["forward_runs"] = fwd["runs"]

    def paired(fn: Callable[[], Any]) -> dict[str, Any]:
        return time_paired(fn, forward, device, repeats, long_s)

    result["methods"] = {}
    for m in methods:
        say(f"method {m}")
        opts: dict[str, Any] = {}
        if m in ("ig", "smoothgrad", "cdam-smooth", "cdam-integrated"):
            opts["internal_batch_size"] = slices  # one perturbed copy of the batch per pass: bounded memory
        result["methods"][m] = paired(lambda m=m, o=opts: explain(model, images, m, targets, **o))
    if {"cdam", "agcam"} <= set(methods):
        say("cdam+agcam (shared forward)")
        result["together"] = {
            "methods": ["cdam", "agcam"],
            **paired(lambda: explain_many(model, images, ["cdam", "agcam"], targets)),
        }

    n_loop = min(loop_slices, slices)
    result["loop"] = {}
    for m in LOOP_METHODS:
        if m not in result["methods"]:
            continue
        say(f"loop {m}")
        t = paired(lambda m=m: LOOPS[m](model, images[:n_loop], targets))
        scale = slices / n_loop
        result["loop"][m] = {
            "seconds_measured": t["seconds"],
            "slices_measured": n_loop,
            "runs": t["runs"],
            "seconds": t["seconds"] * scale,
            "ratio_to_forward": t["ratio_to_forward"] * scale,
            "speedup": t["ratio_to_forward"] * scale / result["methods"][m]["ratio_to_forward"],
        }

    if gradcam_available():
        say("pytorch-grad-cam")
        result["gradcam"] = {
            "available": True,
            "library": "pytorch-grad-cam " + _version("grad-cam"),
            **paired(lambda: run_pytorch_gradcam(model, images, targets)),
        }
    else:
        result["gradcam"] = {
            "available": False,
            "ratio_to_forward": None,
            "note": "pytorch-grad-cam not installed (pip install 'medvit-explain[gradcam]')",
        }

    with tempfile.TemporaryDirectory(prefix="medvit-bench-") as tmp:
        tmp_path = Path(tmp)
        say("end to end")
        result["end_to_end"] = _end_to_end(model, tmp_path, volume, batch_size, precision, repeats, device, long_s)
        source = _model_source(model, model_source, tmp_path) if memory or clinical_size else {}
        if memory:
            result["memory"] = _memory(source, str(device), tmp_path, volume, batch_size, precision, say)
        else:
            result["memory"] = None
        if clinical_size:
            result["clinical"] = clinical_case(
                source, str(device), tmp_path, clinical_size, batch_size, precision, map_dtype, say
            )
    result["targets_check"] = check_targets(result)
    return result


def _model_source(model: nn.Module, model_source: dict[str, Any] | None, tmp: Path) -> dict[str, Any]:
    """How a subprocess rebuilds ``model``: ``model_source``, else a temporary checkpoint of it."""
    source = dict(model_source or {})
    if not source:
        from .model import save_checkpoint

        source = {"model_path": str(save_checkpoint(model, tmp / "model"))}
    return source


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _write_phantom(path: Path, shape: Sequence[int], seed: int = 0, spacing: Sequence[float] | None = None) -> Path:
    from .io import write_volume
    from .phantom import generate_phantom

    extra = {"spacing": tuple(float(s) for s in spacing)} if spacing is not None else {}
    ct = generate_phantom(seed, size=tuple(int(s) for s in shape), n_nodules=3, **extra).ct
    return write_volume(ct, path, dtype=np.int16)  # whole HU values, stored as scanners store them


def _explain_file(model: nn.Module, path: Path, out_dir: Path, batch_size: int, precision: str) -> dict[str, Any]:
    """load → explain_volume (CDAM + AG-CAM, all targets) → overlays written (no HTML report)."""
    from .io import load_volume
    from .outputs import write_outputs
    from .pipeline import explain_volume

    t0 = time.perf_counter()
    volume = load_volume(path)
    load_s = time.perf_counter() - t0
    result = explain_volume(model, volume, methods=["cdam", "agcam"], batch_size=batch_size, precision=precision)
    written = write_outputs(result, out_dir, report=False)
    return {
        "load": load_s,
        **result.timings,
        "files": len(written),
        "input_bytes": int(volume.array.nbytes),
        "output_bytes": int(sum(Path(p).stat().st_size for p in written.values())),  # on disk; maps are not held
    }


def _end_to_end(
    model,
    tmp: Path,
    volume: Sequence[int],
    batch_size: int,
    precision: str,
    repeats: int,
    device: torch.device,
    long_s: float,
) -> dict[str, Any]:
    path = _write_phantom(tmp / "e2e.nii.gz", volume)
    parts: dict[str, Any] = {}

    def once() -> None:
        out = tmp / "e2e_out"
        parts.clear()
        parts.update(_explain_file(model, path, out, batch_size, precision))

    t = time_call(once, device, min(repeats, 3), long_s)
    n = int(volume[2])
    return {
        "seconds": t["seconds"],
        "runs": t["runs"],
        "slices": n,
        "slices_per_s": n / t["seconds"],
        "methods": ["cdam", "agcam"],
        "volume": list(volume),
        "breakdown_s": {k: round(v, 4) for k, v in parts.items() if isinstance(v, float)},
        "files_written": parts.get("files"),
    }


# ------------------------------------------------------------------------------- clinical size

CLINICAL_STAGES = ("import", "model_load", "load", "preprocess", "model", "explain", "project", "write", "report")


def clinical_case(
    source: dict[str, Any],
    device: str,
    tmp: Path,
    size: Sequence[int],
    batch_size: int,
    precision: str,
    map_dtype: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The whole ``explain`` job (CDAM + AG-CAM, overlays + table + summary + report) on a phantom of
    ``size`` at :data:`CLINICAL_SPACING`, in fresh subprocesses: once for every target of the model,
    once for the primary target alone. Each run reports its stage seconds (``write`` is the wall time
    of the overlays, ``project`` the projection seconds inside it summed over the writer threads),
    ``bytes_written`` and the process's ``peak_rss_bytes``."""
    shape = tuple(int(s) for s in size)
    say(f"clinical: writing a {' x '.join(map(str, shape))} phantom")
    path = _write_phantom(tmp / "clinical.nii.gz", shape, seed=99, spacing=CLINICAL_SPACING)
    runs = {}
    for label, targets in (("all_targets", None), ("one_target", "primary")):
        say(f"clinical: explain ({label.replace('_', ' ')})")
        job = _job(source, device, path, tmp / f"clinical_{label}", batch_size, precision)
        job.update(map_dtype=map_dtype, targets=targets)
        runs[label] = _subprocess_worker("--clinical-worker", job)
    full, one = runs["all_targets"], runs["one_target"]
    return {
        "size": list(shape),
        "spacing_mm": list(CLINICAL_SPACING),
        "map_dtype": map_dtype,
        **full,
        "one_target": one,
        "targets_rss_growth": full["peak_rss_bytes"] / one["peak_rss_bytes"] - 1.0,
    }


def _job(source: dict[str, Any], device: str, path: Path, out: Path, batch_size: int, precision: str) -> dict[str, Any]:
    """What a worker subprocess needs: how to rebuild the model, where to read and write, how to run."""
    return {
        **source,
        "device": device,
        "path": str(path),
        "out": str(out),
        "batch_size": batch_size,
        "precision": precision,
        "threads": torch.get_num_threads(),
    }


def _subprocess_worker(flag: str, job: dict[str, Any]) -> dict[str, Any]:
    job = {**job, "launched": time.perf_counter()}  # a monotonic clock shared with the child process
    proc = subprocess.run(
        [sys.executable, "-m", "medvit_explain.bench", flag, json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"bench worker {flag} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _clinical_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One ``explain`` job in this fresh process; ``import`` counts from the parent's launch of it."""
    started = float(job["launched"])
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    from .io import load_volume
    from .outputs import write_outputs
    from .pipeline import explain_volume

    stages: dict[str, float] = {"import": time.perf_counter() - started}
    t0 = time.perf_counter()
    model = bench_model(job.get("model_path"), job.get("arch"), job["device"], job.get("image_size"), 0)
    stages["model_load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    volume = load_volume(job["path"])
    stages["load"] = time.perf_counter() - t0
    targets = None
    if job.get("targets") == "primary":
        from .vocabulary import primary_target

        targets = [model.targets[primary_target(model.targets, model.task_spec.kinds)]]
    t0 = time.perf_counter()
    result = explain_volume(
        model, volume, ["cdam", "agcam"], targets, batch_size=int(job["batch_size"]), precision=job["precision"]
    )
    _sync(next(model.parameters()).device)
    explain_wall = time.perf_counter() - t0
    out = Path(job["out"])
    write_outputs(result, out, map_dtype=job["map_dtype"], report=True)
    timings = result.timings
    stages["preprocess"] = timings.get("preprocess", 0.0)
    stages["model"] = timings.get("predict", 0.0)
    stages["explain"] = sum(v for k, v in timings.items() if k.startswith("explain_"))
    stages["explain_volume_other"] = explain_wall - stages["preprocess"] - stages["model"] - stages["explain"]
    for key in ("project", "write", "report"):
        stages[key] = timings.get(key, 0.0)
    files = [p for p in out.rglob("*") if p.is_file()]
    return {
        "seconds": time.perf_counter() - started,
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "maps": len(result.methods) * len(result.targets),
        "files_written": len(files),
        "bytes_written": int(sum(p.stat().st_size for p in files)),
        "peak_rss_bytes": _peak_rss_bytes(),
        "device": str(next(model.parameters()).device),
    }


# ----------------------------------------------------------------------------------------- memory


def _memory(
    source: dict[str, Any],
    device: str,
    tmp: Path,
    volume: Sequence[int],
    batch_size: int,
    precision: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Peak memory of separate processes explaining N and 4·N slices of the same in-plane size."""
    runs = []
    for factor in (1, 4):
        shape = (int(volume[0]), int(volume[1]), int(volume[2]) * factor)
        say(f"memory {shape[2]} slices")
        path = _write_phantom(tmp / f"mem_{shape[2]}.nii.gz", shape)
        job = _job(source, device, path, tmp / f"mem_out_{shape[2]}", batch_size, precision)
        runs.append({"slices": shape[2], **_subprocess_worker("--memory-worker", job)})
    small, large = runs
    out: dict[str, Any] = {"runs": runs}
    for key in ("peak_rss_bytes", "cuda_max_allocated_bytes"):
        if small.get(key) is None or large.get(key) is None:
            continue
        growth = large[key] - small[key]
        io_growth = large["input_bytes"] - small["input_bytes"]  # maps live at model resolution, not on the grid
        if key.startswith("cuda"):
            io_growth = 0  # the volumes stay on the host
        excess = growth - io_growth
        out[key.replace("_bytes", "")] = {
            "growth_bytes": growth,
            "volumes_growth_bytes": io_growth,
            "excess_bytes": excess,
            "excess_fraction": excess / small[key] if small[key] else 0.0,
        }
    return out


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ``/proc/self/clear_refs``), so the peak measured
    afterwards belongs to the explanation, not to imports or model loading."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _peak_rss_bytes() -> int | None:
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else _process_peak_rss_bytes()


def _process_peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return int(psutil.Process().memory_info().peak_wset)
        except (ImportError, AttributeError):
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _memory_worker(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    model = bench_model(
        job.get("model_path"), job.get("arch"), job["device"], job.get("image_size"), int(job.get("seed", 0))
    )
    device = next(model.parameters()).device
    baseline = _current_rss_bytes()
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    info = _explain_file(model, Path(job["path"]), Path(job["out"]), int(job["batch_size"]), job["precision"])
    _sync(device)
    return {
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_scope": "load + explain + write" if reset else "whole process (imports and model load included)",
        "process_peak_rss_bytes": _process_peak_rss_bytes(),
        "rss_after_model_bytes": baseline,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "input_bytes": info["input_bytes"],
        "output_bytes": info["output_bytes"],
    }


# ------------------------------------------------------------------------------------ assessment


def check_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issue: the measured number, the bound and whether it is met."""
    checks: dict[str, Any] = {}
    for name, bound in TARGET_RATIOS.items():
        row = result.get("together") if "+" in name else result.get("methods", {}).get(name)
        if row:
            checks[f"{name} ratio_to_forward"] = _check(row["ratio_to_forward"], "<=", bound)
    kind = "cuda" if result["machine"]["device"].startswith("cuda") else "cpu"
    for m, row in result.get("loop", {}).items():
        checks[f"{m} speedup over loop ({kind})"] = _check(row["speedup"], ">=", TARGET_LOOP_SPEEDUP[kind])
    mem = result.get("memory") or {}
    for key in ("peak_rss", "cuda_max_allocated"):
        if key in mem:
            checks[f"{key} excess (4x slices)"] = _check(mem[key]["excess_fraction"], "<", TARGET_MEMORY_EXCESS)
    clinical = result.get("clinical")
    if clinical and tuple(clinical["size"]) == (512, 512, 300):  # the bounds are for this size
        seconds = TARGET_CLINICAL_GPU_SECONDS if kind == "cuda" else TARGET_CLINICAL["seconds"]
        checks["clinical seconds"] = _check(clinical["seconds"], "<=", seconds)
        checks["clinical peak_rss_bytes"] = _check(clinical["peak_rss_bytes"], "<=", TARGET_CLINICAL["peak_rss_bytes"])
        checks["clinical bytes_written"] = _check(clinical["bytes_written"], "<=", TARGET_CLINICAL["bytes_written"])
        checks["clinical rss growth, all vs 1 target"] = _check(
            clinical["targets_rss_growth"], "<", TARGET_CLINICAL["targets_rss_growth"]
        )
    return checks


def _check(value: float, op: str, bound: float) -> dict[str, Any]:
    met = {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[op]
    return {"value": value, "target": f"{op} {bound:g}", "met": bool(met)}


# ------------------------------------------------------------------------------------------ table


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def format_table(result: dict[str, Any]) -> str:
    """The human-readable report: machine and workload first, then every measurement."""
    lines = _header_lines(result)
    if "forward_s" in result:
        lines += _method_lines(result)
    if result.get("clinical"):
        lines += _clinical_lines(result["clinical"])
    lines += ["", "targets"]
    for name, c in result["targets_check"].items():
        lines.append(f"  {name:40s} {c['value']:10.4g}  {c['target']:8s} {'met' if c['met'] else 'NOT MET'}")
    return "\n".join(lines)


def _header_lines(result: dict[str, Any]) -> list[str]:
    m, w, mod = result["machine"], result["workload"], result["model"]
    lines = [
        f"machine   {m['host']} | {m['platform']} | {m['cpu_count']} CPUs, {m['torch_threads']} torch threads"
        + (f" | load avg {m['load_average_1m']}" if "load_average_1m" in m else ""),
        f"device    {m['device']}"
        + (f" ({m['gpu']}, CUDA {m['cuda']})" if "gpu" in m else "")
        + f" | torch {m['torch']} | timm {m['timm']} | python {m['python']}",
        f"model     {mod['name']}: {mod['image_size']} px, grid {mod['patch_grid']}, depth {mod['depth']}, "
        f"dim {mod['embed_dim']}, {mod['num_heads']} heads, {mod['targets']} targets, "
        f"{mod['parameters'] / 1e6:.2f} M parameters",
    ]
    if "slices" in w:
        lines.append(
            f"workload  {w['slices']} slices x {w['targets']} targets, median of up to {w['repeats']} warm runs, "
            f"loop on {w['loop_slices']} slice(s) scaled, volume {' x '.join(map(str, w['volume']))}, "
            f"batch {w['batch_size']}, {w['precision']}"
        )
    return lines


def _clinical_lines(c: dict[str, Any]) -> list[str]:
    one = c["one_target"]
    stages = ", ".join(f"{k} {v:.2f}" for k, v in c["stages_s"].items())
    return [
        "",
        f"clinical  explain (cdam + agcam, {c['maps']} maps, {c['map_dtype']} overlays, report) on a "
        f"{' x '.join(map(str, c['size']))} CT at {' x '.join(f'{s:g}' for s in c['spacing_mm'])} mm, "
        f"fresh process on {c['device']}:",
        f"          {c['seconds']:.1f} s end to end, peak RSS {_mib(c['peak_rss_bytes'])}, "
        f"{c['files_written']} files, {c['bytes_written'] / 1e6:.1f} MB written",
        f"          stages (s): {stages}  (write: overlays wall time; project: inside write, summed over threads)",
        f"          one target ({one['maps']} maps): {one['seconds']:.1f} s, peak RSS {_mib(one['peak_rss_bytes'])} "
        f"-> all targets use {100 * c['targets_rss_growth']:+.1f} % RSS",
    ]


def _method_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"{'measurement':34s} {'seconds':>10s} {'x forward':>10s} {'best':>7s} {'runs':>5s}"
        "   (x forward: median of paired runs; best: fastest run / fastest forward)",
        f"{'forward (plain batched inference)':34s} {result['forward_s']:10.4f} {1.0:10.2f} {1.0:7.2f} "
        f"{result['forward_runs']:5d}",
    ]
    for name, row in result["methods"].items():
        lines.append(
            f"{name + ' (all targets)':34s} {row['seconds']:10.4f} {row['ratio_to_forward']:10.2f} "
            f"{row['best_ratio_to_forward']:7.2f} {row['runs']:5d}"
        )
    if result.get("together"):
        row = result["together"]
        lines.append(
            f"{'cdam + agcam (shared forward)':34s} {row['seconds']:10.4f} "
            f"{row['ratio_to_forward']:10.2f} {row['best_ratio_to_forward']:7.2f} {row['runs']:5d}"
        )
    for name, row in result.get("loop", {}).items():
        lines.append(
            f"{'loop ' + name + ' (1 slice, 1 target)':34s} {row['seconds']:10.4f} "
            f"{row['ratio_to_forward']:10.2f} {'':7s} {row['runs']:5d}   "
            f"batched is {row['speedup']:.1f}x faster"
        )
    g = result["gradcam"]
    if g.get("available"):
        lines.append(
            f"{'pytorch-grad-cam GradCAM':34s} {g['seconds']:10.4f} {g['ratio_to_forward']:10.2f} "
            f"{g['best_ratio_to_forward']:7.2f} {g['runs']:5d}   ({g['library']}, one call per target)"
        )
    else:
        lines.append(f"{'pytorch-grad-cam GradCAM':34s} {'unavailable':>10s}   {g['note']}")
    e = result["end_to_end"]
    lines += [
        "",
        f"end to end (load -> cdam + agcam -> {e['files_written']} files written), "
        f"{e['slices']} slices: {e['seconds']:.2f} s, {e['slices_per_s']:.1f} slices/s  "
        f"[{', '.join(f'{k} {v:.2f}' for k, v in e['breakdown_s'].items())}]",
    ]
    mem = result.get("memory")
    if mem:
        for run in mem["runs"]:
            lines.append(
                f"memory    {run['slices']:4d} slices: peak RSS ({run['peak_scope']}) "
                f"{_mib(run['peak_rss_bytes'])} "
                f"(after model load {_mib(run['rss_after_model_bytes'])}), input {_mib(run['input_bytes'])}, "
                f"written {_mib(run['output_bytes'])}"
                + (
                    f", CUDA max allocated {_mib(run['cuda_max_allocated_bytes'])}"
                    if run.get("cuda_max_allocated_bytes") is not None
                    else ""
                )
            )
        for key in ("peak_rss", "cuda_max_allocated"):
            if key in mem:
                r = mem[key]
                lines.append(
                    f"          {key}: 4x slices grew {_mib(r['growth_bytes'])}, volumes "
                    f"{_mib(r['volumes_growth_bytes'])}, excess {_mib(r['excess_bytes'])} = "
                    f"{100 * r['excess_fraction']:.1f} % of the smaller run's peak"
                )
    return lines


def to_json(result: dict[str, Any]) -> str:
    from .vocabulary import to_json as vocabulary_to_json

    return vocabulary_to_json(result)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--memory-worker", "--clinical-worker"):
        with contextlib.redirect_stdout(sys.stderr):
            job = json.loads(sys.argv[2])
            report = _memory_worker(job) if sys.argv[1] == "--memory-worker" else _clinical_worker(job)
        print(json.dumps(report))
    else:
        sys.exit(
            "usage: python -m medvit_explain.bench --memory-worker|--clinical-worker JSON (use `medvit-explain bench`)"
        )
