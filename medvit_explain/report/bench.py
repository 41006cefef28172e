"""The bench's table: a :class:`~medvit_explain.workflows.bench.BenchResult` as the lines ``medvit-explain
bench`` prints (machine and workload first, then every measurement, then the targets); a volumetric run
(:class:`~medvit_explain.workflows.bench_volumetric.VolumetricBenchResult`) by :func:`format_volumetric_table`."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table", "format_volumetric_table"]


def format_table(result) -> str:
    """The human-readable report of a bench run (a ``BenchResult`` or its ``to_dict()``)."""
    result = result.to_dict() if hasattr(result, "to_dict") else result
    if result.get("kind") == "volumetric":
        return format_volumetric_table(result)
    lines = _header_lines(result)
    if "forward_s" in result:
        lines += _method_lines(result)
    if result.get("clinical"):
        lines += _clinical_lines(result["clinical"])
    lines += ["", "targets"]
    for name, c in result["targets_check"].items():
        lines.append(f"  {name:40s} {c['value']:10.4g}  {c['target']:8s} {'met' if c['met'] else 'NOT MET'}")
    return "\n".join(lines)


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


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


# ---------------------------------------------------------------------------------------- volumetric


def _x(size) -> str:
    return " x ".join(f"{s:g}" if isinstance(s, float) else str(s) for s in size)


def format_volumetric_table(result) -> str:
    """The human-readable report of a volumetric bench run (a ``VolumetricBenchResult`` or its ``to_dict()``)."""
    result = result.to_dict() if hasattr(result, "to_dict") else result
    w = result["workload"]
    lines = _header_lines(result)  # machine, device, model (a workload without "slices" adds no line)
    where = (
        f"cubes around {w['rois']} phantom nodule centre(s), repeated"
        if w["mode"] == "roi"
        else "the whole phantom in the model box, repeated"
    )
    lines.append(
        f"workload  {w['items']} {w['mode']} inputs {w['input_shape']} ({where}; a {_x(w['phantom'])} phantom at "
        f"{_x(w['phantom_spacing_mm'])} mm) x {w['targets']} targets, median of up to {w['repeats']} warm runs, "
        f"loop on {w['loop_items']} input(s) scaled"
    )
    lines += [
        "",
        f"{'measurement':34s} {'seconds':>10s} {'x forward':>10s} {'best':>7s} {'runs':>5s}"
        "   (x forward: median of paired runs; best: fastest run / fastest forward)",
        f"{'forward (plain batched inference)':34s} {result['forward_s']:10.4f} {1.0:10.2f} {1.0:7.2f} "
        f"{result['forward_runs']:5d}",
    ]
    rows = [(name + " (all targets)", row) for name, row in result["methods"].items()]
    if result.get("together"):
        rows.append(("cdam + agcam (shared forward)", result["together"]))
    for name, row in rows:
        lines.append(
            f"{name:34s} {row['seconds']:10.4f} {row['ratio_to_forward']:10.2f} "
            f"{row['best_ratio_to_forward']:7.2f} {row['runs']:5d}"
        )
    for name, row in (result.get("loop") or {}).items():
        lines.append(
            f"{'loop ' + name + ' (1 input, 1 target)':34s} {row['seconds']:10.4f} "
            f"{row['ratio_to_forward']:10.2f} {'':7s} {row['runs']:5d}   batched is {row['speedup']:.1f}x faster"
        )
    mem = result.get("memory")
    if mem:
        lines += _volumetric_memory_lines(mem)
    else:
        lines += ["", "memory    skipped (--no-memory)"]
    return "\n".join(lines)


def _volumetric_memory_lines(mem: dict[str, Any]) -> list[str]:
    crop, whole = mem["crop_batch"], mem["whole_volume"]
    scope = crop["runs"]["forward"]["peak_scope"]
    lines = [
        "",
        f"memory    each run in a fresh process; peak RSS above the process after the model is built ({scope}); "
        f"ViTs of dim {mem['embed_dim']}, depth {mem['depth']}, {mem['num_heads']} heads, {mem['targets']} targets, "
        f"{mem['weights']} weights; cdam + agcam for all targets",
        f"  {crop['label']}: {crop['items']} crops of {_x(crop['input_size'])} voxels, patch {crop['patch']} "
        f"({_x(crop['grid'])} grid), input {_mib(crop['input_bytes'])}",
    ]
    for name, run in crop["runs"].items():
        label = "forward (no grad)" if name == "forward" else "cdam + agcam (explain_many)"
        lines.append(_memory_run_line(label, run))
    lines.append(f"    cdam + agcam / forward peak: {crop['explain_over_forward']:.2f}x")
    lines.append(
        f"  {whole['label']}: a {_x(whole['size'])} CT at {_x(whole['spacing_mm'])} mm "
        f"(CT {_mib(whole['input_bytes'])}) -> {_x(whole['box'])} box, patch {whole['patch']} "
        f"({_x(whole['grid'])} grid), {whole['precision']}"
    )
    for name, run in whole["runs"].items():
        label = "predict (forward)" if name == "forward" else "explain_volume + 1 map projected"
        lines.append(_memory_run_line(label, run))
    lines.append(f"    cdam + agcam / forward peak: {whole['explain_over_forward']:.2f}x")
    return lines


def _memory_run_line(name: str, run: dict[str, Any]) -> str:
    cuda = run.get("cuda_max_allocated_bytes")
    return (
        f"    {name:34s} peak +{_mib(run['peak_above_model_bytes'])} ({_mib(run['beyond_input_bytes'])} beyond the "
        f"input), {run['seconds']:.2f} s"
        + (f", {run['maps']} maps" if run["maps"] else "")
        + (f", CUDA max allocated {_mib(cuda)}" if cuda is not None else "")
        + f"  [process peak {_mib(run['peak_rss_bytes'])}, after model {_mib(run['rss_after_model_bytes'])}]"
    )
