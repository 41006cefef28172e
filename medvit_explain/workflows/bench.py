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
The subprocess worker is ``python -m medvit_explain.bench --memory-worker JSON`` (:mod:`.bench_workers`);
the papers' loops and pytorch-grad-cam are in :mod:`.bench_loops`, the clock in :mod:`.bench_common`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .bench_common import _images, bench_model, machine_info, model_info, time_call, time_paired
from .bench_loops import LOOPS, gradcam_available, loop_agcam, loop_cdam, run_pytorch_gradcam
from .bench_workers import CLINICAL_SPACING, _end_to_end, _memory, _model_source, clinical_case

__all__ = [
    "CLINICAL_SPACING",
    "DEFAULT_VOLUME",
    "TARGET_RATIOS",
    "BenchResult",
    "bench_model",
    "check_targets",
    "loop_agcam",
    "loop_cdam",
    "run_bench",
    "run_pytorch_gradcam",
    "to_json",
]

# the targets (ratios to a plain forward; speed-ups over the per-slice, per-target loop)
TARGET_RATIOS = {"cdam": 1.3, "agcam": 1.3, "cdam+agcam": 1.5}
TARGET_LOOP_SPEEDUP = {"cpu": 20.0, "cuda": 100.0}
TARGET_MEMORY_EXCESS = 0.10
LOOP_METHODS = ("cdam", "agcam")
DEFAULT_VOLUME = (192, 192, 32)
TARGET_CLINICAL = {"seconds": 45.0, "peak_rss_bytes": 2.5e9, "bytes_written": 400e6, "targets_rss_growth": 0.10}
TARGET_CLINICAL_GPU_SECONDS = 5.0


# -------------------------------------------------------------------------------- the benchmark


@dataclass
class BenchResult:
    """One bench run: the machine, model and workload, each measurement section this run made (``None``
    where it did not), and each target with its bound (``targets_check``). :meth:`to_dict` is the JSON
    ``--json`` prints (sections not measured are left out; ``memory`` is ``null`` when skipped);
    :func:`medvit_explain.report.bench.format_table` renders it as a table."""

    machine: dict[str, Any]
    model: dict[str, Any]
    workload: dict[str, Any]
    targets_check: dict[str, Any] = field(default_factory=dict)
    forward_s: float | None = None
    forward_runs: int | None = None
    methods: dict[str, Any] | None = None
    together: dict[str, Any] | None = None
    loop: dict[str, Any] | None = None
    gradcam: dict[str, Any] | None = None
    end_to_end: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    clinical: dict[str, Any] | None = None

    ORDER = ("machine", "model", "workload", "forward_s", "forward_runs", "methods", "together", "loop")
    ORDER += ("gradcam", "end_to_end", "memory", "clinical", "targets_check")

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for key in self.ORDER:
            value = getattr(self, key)
            if value is not None or (key == "memory" and self.end_to_end is not None):
                out[key] = value
        return out


def _clinical_only(model, device, model_source, clinical_size, batch_size, precision, map_dtype, say) -> BenchResult:
    """Only the clinical-size ``explain`` job (``--e2e-only``)."""
    if clinical_size is None:
        raise ValueError("clinical_only needs a clinical_size")
    result = {"machine": machine_info(device), "model": model_info(model), "workload": {"batch_size": batch_size}}
    with tempfile.TemporaryDirectory(prefix="medvit-bench-") as tmp:
        source = _model_source(model, model_source, Path(tmp))
        result["clinical"] = clinical_case(
            source, str(device), Path(tmp), clinical_size, batch_size, precision, map_dtype, say
        )
    result["targets_check"] = check_targets(result)
    return BenchResult(**result)


def _time_methods(model, images: Tensor, methods: list[str], targets: list[int], paired, say) -> dict[str, Any]:
    """Every method, all targets at once, batched; and CDAM + AG-CAM together (one shared forward)."""
    from ..explainers import explain, explain_many

    out: dict[str, Any] = {"methods": {}}
    for m in methods:
        say(f"method {m}")
        opts: dict[str, Any] = {}
        if m in ("ig", "smoothgrad", "cdam-smooth", "cdam-integrated"):
            opts["internal_batch_size"] = len(images)  # one perturbed copy of the batch per pass: bounded memory
        out["methods"][m] = paired(lambda m=m, o=opts: explain(model, images, m, targets, **o))
    if {"cdam", "agcam"} <= set(methods):
        say("cdam+agcam (shared forward)")
        out["together"] = {
            "methods": ["cdam", "agcam"],
            **paired(lambda: explain_many(model, images, ["cdam", "agcam"], targets)),
        }
    return out


def forward_clock(model, images: Tensor, device, repeats: int, long_s: float) -> tuple[dict[str, Any], Callable]:
    """A plain forward of ``images`` timed (the unit of every ratio), and ``paired(fn)``: ``fn`` timed against
    that forward run just before it (:func:`time_paired`)."""

    def forward() -> None:
        with torch.no_grad():
            model(images)

    fwd = time_call(forward, device, repeats, long_s)

    def paired(fn: Callable[[], Any]) -> dict[str, Any]:
        return time_paired(fn, forward, device, repeats, long_s)

    return fwd, paired


def _time_loops(
    model, images: Tensor, targets: list[int], n_loop: int, methods_timed: dict, paired, say, unit: str = "slices"
) -> dict:
    """The papers' per-item, per-target loops on ``n_loop`` items (``unit``: slices, or a volumetric model's
    inputs), scaled to the whole batch."""
    slices = len(images)
    loops = {}
    for m in LOOP_METHODS:
        if m not in methods_timed:
            continue
        say(f"loop {m}")
        t = paired(lambda m=m: LOOPS[m](model, images[:n_loop], targets))
        scale = slices / n_loop
        loops[m] = {
            "seconds_measured": t["seconds"],
            f"{unit}_measured": n_loop,
            "runs": t["runs"],
            "seconds": t["seconds"] * scale,
            "ratio_to_forward": t["ratio_to_forward"] * scale,
            "speedup": t["ratio_to_forward"] * scale / methods_timed[m]["ratio_to_forward"],
        }
    return loops


def _time_gradcam(model, images: Tensor, targets: list[int], paired, say) -> dict[str, Any]:
    if not gradcam_available():
        return {
            "available": False,
            "ratio_to_forward": None,
            "note": "pytorch-grad-cam not installed (pip install 'medvit-explain[gradcam]')",
        }
    say("pytorch-grad-cam")
    return {
        "available": True,
        "library": "pytorch-grad-cam " + _version("grad-cam"),
        **paired(lambda: run_pytorch_gradcam(model, images, targets)),
    }


def _file_runs(model, result: dict[str, Any], opts: dict[str, Any], device, say) -> None:
    """End to end on a phantom file; the memory subprocesses; the clinical-size job (into ``result``)."""
    batch_size, precision, volume = opts["batch_size"], opts["precision"], opts["volume"]
    with tempfile.TemporaryDirectory(prefix="medvit-bench-") as tmp:
        tmp_path = Path(tmp)
        say("end to end")
        result["end_to_end"] = _end_to_end(
            model, tmp_path, volume, batch_size, precision, opts["repeats"], device, opts["long_s"]
        )
        memory, clinical_size = opts["memory"], opts["clinical_size"]
        source = _model_source(model, opts["model_source"], tmp_path) if memory or clinical_size else {}
        if memory:
            result["memory"] = _memory(source, str(device), tmp_path, volume, batch_size, precision, say)
        else:
            result["memory"] = None
        if clinical_size:
            result["clinical"] = clinical_case(
                source, str(device), tmp_path, clinical_size, batch_size, precision, opts["map_dtype"], say
            )


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
) -> BenchResult:
    """Run the benchmark on ``model`` (on its device); returns a :class:`BenchResult`.

    ``model_source`` tells the memory subprocesses how to rebuild the model
    (``{"model_path": ...}`` or ``{"arch": ..., "image_size": ..., "seed": ...}``); without it the model is
    saved to a temporary checkpoint for them. ``clinical_size`` ([X, Y, Z]) adds the whole ``explain``
    job on a phantom of that size (see :func:`clinical_case`); ``clinical_only`` runs only that.
    """
    from ..registry import method_names

    say = progress or (lambda msg: None)
    device = next(model.parameters()).device
    model.eval()
    if clinical_only:
        return _clinical_only(model, device, model_source, clinical_size, batch_size, precision, map_dtype, say)
    methods = list(methods) if methods else method_names()
    targets = list(range(len(model.targets)))
    images = _images(model, slices)
    workload = {
        "slices": slices,
        "targets": len(targets),
        "repeats": repeats,
        "loop_slices": min(loop_slices, slices),
        "volume": list(volume),
        "batch_size": batch_size,
        "precision": precision,
    }
    result: dict[str, Any] = {"machine": machine_info(device), "model": model_info(model), "workload": workload}

    say("forward")
    fwd, paired = forward_clock(model, images, device, repeats, long_s)
    result["forward_s"] = fwd["seconds"]
    result["forward_runs"] = fwd["runs"]

    result.update(_time_methods(model, images, methods, targets, paired, say))
    result["loop"] = _time_loops(model, images, targets, min(loop_slices, slices), result["methods"], paired, say)
    result["gradcam"] = _time_gradcam(model, images, targets, paired, say)
    files = dict(
        volume=volume, batch_size=batch_size, precision=precision, repeats=repeats, long_s=long_s, memory=memory
    )
    files.update(clinical_size=clinical_size, model_source=model_source, map_dtype=map_dtype)
    _file_runs(model, result, files, device, say)
    result["targets_check"] = check_targets(result)
    return BenchResult(**result)


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


def to_json(result: BenchResult | dict[str, Any]) -> str:
    """The JSON of a bench run (``--json``)."""
    from ..vocabulary import to_json as vocabulary_to_json

    return vocabulary_to_json(result.to_dict() if isinstance(result, BenchResult) else result)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"
