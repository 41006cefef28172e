"""The bench of a volumetric (3D) model runs from the CLI and reports well-formed numbers.

Behaviour only: no test asserts a timing (the numbers belong to the bench's output and the README).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from medvit_explain.commands.bench import bench
from medvit_explain.report.bench import format_table
from medvit_explain.workflows.bench_volumetric import VOLUMETRIC_METHODS
from medvit_explain.workflows.bench_workers import worker_main
from tests.models import tiny_checkpoint

CUBE = {"image_size": (16, 16, 16), "patch": 8}
SMALL = ["--slices", "2", "--repeats", "1", "--loop-slices", "1", "--volume", "64", "64", "24", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (the workers get the same): a tiny model gains nothing from two, and on a machine
    whose cores are busy two threads wait on each other far longer than the work takes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_cli_bench_volumetric_json_and_memory(tmp_path):
    """ROI-mode checkpoint: CDAM, AG-CAM, both together, the loops, and both memory cases (fresh processes)."""
    ckpt = tiny_checkpoint(tmp_path / "roi3d", mode="roi", **CUBE)
    args = ["--model", str(ckpt), *SMALL, "--method", "cdam", "--method", "agcam"]
    res = CliRunner().invoke(bench, [*args, "--volumetric-volume", "48", "48", "16", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kind"] == "volumetric"
    w = out["workload"]
    assert w["mode"] == "roi" and w["items"] == 2 and w["input_shape"] == [1, 16, 16, 16] and w["targets"] == 9
    assert w["rois"] >= 1 and w["loop_items"] == 1
    assert out["model"]["patch_grid"] == [2, 2, 2] and out["machine"]["device"] == "cpu"
    assert _positive_finite(out["forward_s"])
    assert list(out["methods"]) == ["cdam", "agcam"]
    for row in [*out["methods"].values(), out["together"]]:
        assert _positive_finite(row["seconds"]) and _positive_finite(row["ratio_to_forward"])
    assert out["together"]["methods"] == ["cdam", "agcam"]
    for m in ("cdam", "agcam"):
        assert _positive_finite(out["loop"][m]["speedup"]) and out["loop"][m]["items_measured"] == 1

    mem = out["memory"]
    assert (mem["embed_dim"], mem["depth"], mem["num_heads"], mem["targets"]) == (32, 2, 2, 9)
    crop, whole = mem["crop_batch"], mem["whole_volume"]
    assert crop["items"] == 8 and crop["input_size"] == [64, 64, 64] and crop["grid"] == [8, 8, 8]
    assert crop["input_bytes"] == 8 * 64**3 * 4
    assert whole["size"] == [48, 48, 16] and whole["box"] == [128, 128, 128] and whole["grid"] == [8, 8, 8]
    assert whole["input_bytes"] == 48 * 48 * 16 * 4  # the CT as float32
    for case, maps in ((crop, 8 * 9 * 2), (whole, 9 * 2)):
        assert set(case["runs"]) == {"forward", "cdam+agcam"}
        assert case["runs"]["forward"]["maps"] == 0 and case["runs"]["cdam+agcam"]["maps"] == maps
        for run in case["runs"].values():
            for key in ("peak_rss_bytes", "rss_after_model_bytes", "peak_above_model_bytes", "seconds"):
                assert _positive_finite(run[key]), key
            assert run["input_bytes"] == case["input_bytes"]
            assert run["cuda_max_allocated_bytes"] is None
        assert _positive_finite(case["explain_over_forward"])

    table = format_table(out)  # the JSON renders as the table the CLI prints
    for text in ("machine", "workload  2 roi inputs", "crop batch 64³", "whole volume", "explain_volume + 1 map"):
        assert text in table


def test_cli_bench_volumetric_default_methods_volume_mode(tmp_path):
    """Volume-mode checkpoint (the whole phantom repeated as the batch): every default method's ratio."""
    ckpt = tiny_checkpoint(tmp_path / "vol3d", mode="volume", crop_body=True, **CUBE)
    res = CliRunner().invoke(bench, ["--model", str(ckpt), *SMALL, "--no-memory", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["workload"]["mode"] == "volume" and out["workload"]["items"] == 2
    assert list(out["methods"]) == list(VOLUMETRIC_METHODS)
    for row in [*out["methods"].values(), out["together"], *out["loop"].values()]:
        assert _positive_finite(row["seconds"]) and _positive_finite(row["ratio_to_forward"])
    assert out["memory"] is None


def test_cli_bench_volumetric_prints_the_table(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "roi3d", mode="roi", **CUBE)
    res = CliRunner().invoke(bench, ["--model", str(ckpt), *SMALL, "--no-memory", "--method", "attention"])
    assert res.exit_code == 0, res.output
    table = res.stdout
    for text in ("machine", "device    cpu", "model     tiny-test-vit", "2 roi inputs", "forward (plain batched"):
        assert text in table
    assert "attention (all targets)" in table and "cdam" not in table
    assert "memory    skipped" in table


def test_cli_bench_volumetric_bad_options(tmp_path):
    ckpt3d = tiny_checkpoint(tmp_path / "roi3d", mode="roi", **CUBE)
    res = CliRunner().invoke(bench, ["--model", str(ckpt3d), "--device", "cpu", "--e2e-size", "64", "64", "8"])
    assert res.exit_code == 2 and "for 2D models" in res.output
    ckpt2d = tiny_checkpoint(tmp_path / "slice")
    res = CliRunner().invoke(bench, ["--model", str(ckpt2d), "--device", "cpu", "--volumetric-volume", "64", "64", "8"])
    assert res.exit_code == 2 and "needs a volumetric model" in res.output


@pytest.mark.parametrize("argv", [[], ["--volumetric-memory-worker"], ["--nope", "{}"]])
def test_worker_usage(argv):
    assert "--volumetric-memory-worker" in worker_main(argv)
