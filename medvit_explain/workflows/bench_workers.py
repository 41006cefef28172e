"""The bench's runs on files: end to end in this process, and the memory and clinical-size runs in fresh
subprocesses (``python -m medvit_explain.bench --memory-worker|--clinical-worker JSON``, whose
``__main__`` block calls :func:`worker_main`; ``--volumetric-memory-worker JSON`` runs
:func:`volumetric_memory_worker`, the memory cases of :mod:`.bench_volumetric`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .bench_common import _sync, bench_model, time_call

__all__ = ["CLINICAL_SPACING", "CLINICAL_STAGES", "clinical_case", "worker_main"]

CLINICAL_SPACING = (0.7, 0.7, 1.0)  # mm: a chest CT's usual in-plane and slice spacing
WORKER_MODULE = "medvit_explain.bench"  # the documented entry point of the worker subprocesses


def _model_source(model: nn.Module, model_source: dict[str, Any] | None, tmp: Path) -> dict[str, Any]:
    """How a subprocess rebuilds ``model``: ``model_source``, else a temporary checkpoint of it."""
    source = dict(model_source or {})
    if not source:
        from ..model import save_checkpoint

        source = {"model_path": str(save_checkpoint(model, tmp / "model"))}
    return source


def _write_phantom(path: Path, shape: Sequence[int], seed: int = 0, spacing: Sequence[float] | None = None) -> Path:
    from ..io import write_volume
    from ..phantom import generate_phantom

    extra = {"spacing": tuple(float(s) for s in spacing)} if spacing is not None else {}
    ct = generate_phantom(seed, size=tuple(int(s) for s in shape), n_nodules=3, **extra).ct
    return write_volume(ct, path, dtype=np.int16)  # whole HU values, stored as scanners store them


def _explain_file(model: nn.Module, path: Path, out_dir: Path, batch_size: int, precision: str) -> dict[str, Any]:
    """load → explain_volume (CDAM + AG-CAM, all targets) → overlays written (no HTML report)."""
    from ..io import load_volume
    from ..outputs import write_outputs
    from ..pipeline import explain_volume

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
    runs = itertools.count()

    def once() -> None:
        out = tmp / f"e2e_out_{next(runs)}"  # a fresh folder each run: every run writes, none replaces
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
        [sys.executable, "-m", WORKER_MODULE, flag, json.dumps(job)],
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
    from ..io import load_volume
    from ..outputs import write_outputs
    from ..pipeline import explain_volume

    stages: dict[str, float] = {"import": time.perf_counter() - started}
    t0 = time.perf_counter()
    model = bench_model(job.get("model_path"), job.get("arch"), job["device"], job.get("image_size"), 0)
    stages["model_load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    volume = load_volume(job["path"])
    stages["load"] = time.perf_counter() - t0
    targets = None
    if job.get("targets") == "primary":
        from ..vocabulary import primary_target

        targets = [model.targets[primary_target(model.targets, model.task_spec.score_kinds)]]
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


MEMORY_METHODS = ("cdam", "agcam")  # what the volumetric memory cases explain (all targets)


def volumetric_memory_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One memory run in this fresh process (``--volumetric-memory-worker JSON``): build the model, record
    the RSS, make / load the input, reset the peak, run ``job["run"]`` (``forward`` or ``cdam+agcam``);
    the peak is taken above the level after the model is built (the input is inside it)."""
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    # every module a run uses is imported before the baseline: the peak above it is the run's, not code's
    from ..explainers import explain_many
    from ..io import load_volume
    from ..model import build_model, resolve_device
    from ..pipeline import explain_volume
    from ..prediction import predict

    torch.manual_seed(int(job.get("seed", 0)))
    device = resolve_device(job["device"])
    model = build_model(job["config"]).to(device).eval()
    targets = list(range(len(model.targets)))
    explain = job["run"] == "cdam+agcam"
    if job["run"] not in ("forward", "cdam+agcam"):
        raise ValueError(f"expected run forward or cdam+agcam, got {job['run']!r}")
    baseline = _current_rss_bytes()
    if job["case"] == "crop_batch":
        generator = torch.Generator().manual_seed(int(job.get("seed", 0)))
        x = torch.rand((int(job["items"]), *model.input_size), generator=generator).to(device)
        input_bytes = x.numel() * x.element_size()

        def run() -> int:
            if not explain:
                with torch.no_grad():
                    model(x)
                return 0
            maps = explain_many(model, x, list(MEMORY_METHODS), targets)
            return sum(int(m.shape[0] * m.shape[1]) for m in maps.values())

    elif job["case"] == "whole_volume":
        volume = load_volume(job["path"])
        input_bytes = int(volume.array.nbytes)

        def run() -> int:
            if not explain:
                predict(model, volume)
                return 0
            result = explain_volume(model, volume, list(MEMORY_METHODS), precision=job.get("precision", "fp32"))
            projected = result.map_array(MEMORY_METHODS[0], result.targets[0])  # one map on the CT's grid
            del projected
            return len(result.methods) * len(result.targets)

    else:
        raise ValueError(f"expected case crop_batch or whole_volume, got {job['case']!r}")
    after_input = _current_rss_bytes()
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    maps = run()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    above = peak - baseline if peak is not None and baseline is not None else None
    return {
        "run": job["run"],
        "seconds": seconds,
        "maps": maps,
        "peak_rss_bytes": peak,
        "peak_scope": "input + run" if reset else "whole process (imports and model build included)",
        "process_peak_rss_bytes": _process_peak_rss_bytes(),
        "rss_after_model_bytes": baseline,
        "rss_after_input_bytes": after_input,
        "peak_above_model_bytes": above,
        "input_bytes": input_bytes,
        "beyond_input_bytes": above - input_bytes if above is not None else None,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "device": str(device),
    }


WORKERS = {
    "--memory-worker": _memory_worker,
    "--clinical-worker": _clinical_worker,
    "--volumetric-memory-worker": volumetric_memory_worker,
}


def worker_main(argv: list[str]) -> int | str:
    """``--memory-worker JSON``, ``--clinical-worker JSON`` or ``--volumetric-memory-worker JSON``: run the
    job, print its result as one JSON line on stdout (everything else goes to stderr); returns the exit
    status (a string: the usage)."""
    if len(argv) == 2 and argv[0] in WORKERS:
        with contextlib.redirect_stdout(sys.stderr):
            job = json.loads(argv[1])
            report = WORKERS[argv[0]](job)
        print(json.dumps(report))
        return 0
    return f"usage: python -m medvit_explain.bench {'|'.join(WORKERS)} JSON (use `medvit-explain bench`)"
