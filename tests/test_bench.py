"""The bench runs and reports well-formed numbers; ``explain_many`` equals separate ``explain`` calls.

Behaviour only: no test asserts a timing (the numbers belong to the bench's output and the README).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from medvit_explain.bench import format_table, loop_agcam, loop_cdam, run_bench
from medvit_explain.commands.bench import bench
from medvit_explain.errors import MethodError
from medvit_explain.explainers import explain, explain_many
from medvit_explain.registry import method_names
from medvit_explain.workflows import bench as bench_mod  # where run_bench looks up gradcam_available
from tests.models import tiny_checkpoint, tiny_model
from tests.vit_models import VARIANTS, make_images, make_model

TINY = {"slices": 2, "repeats": 1, "loop_slices": 1, "volume": (40, 40, 3), "long_s": 5.0}


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# ------------------------------------------------------------------------------------ explain_many


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("targets", [None, [2, 0]])
def test_explain_many_equals_separate_explain_calls(variant, targets):
    model = make_model(variant)
    images = make_images(model, 3, seed=5)
    methods = ["agcam", "attention", "cdam"]
    got = explain_many(model, images, methods, targets=targets)
    assert list(got) == methods
    for m in methods:
        assert torch.equal(got[m], explain(model, images, m, targets=targets)), m


def test_explain_many_single_method_and_options():
    model = make_model("plain")
    images = make_images(model, 2)
    got = explain_many(model, images, ["cdam"], targets=[1], options={"cdam": {}})
    assert torch.equal(got["cdam"], explain(model, images, "cdam", targets=[1]))
    concept = make_images(model, 4, seed=9)
    got = explain_many(model, images, ["cdam", "agcam"], options={"cdam": {"concept": concept}})
    assert torch.equal(got["cdam"], explain(model, images, "cdam", concept=concept))
    assert torch.equal(got["agcam"], explain(model, images, "agcam"))


def test_explain_many_rejects_bad_input():
    model = make_model("plain")
    images = make_images(model, 1)
    with pytest.raises(MethodError, match="unknown method"):
        explain_many(model, images, ["cdam", "nope"])
    with pytest.raises(MethodError, match="not asked for"):
        explain_many(model, images, ["cdam"], options={"agcam": {}})
    with pytest.raises(MethodError, match="does not accept"):
        explain_many(model, images, ["cdam", "agcam"], options={"agcam": {"n_steps": 3}})


# ------------------------------------------------------------------------------- the papers' loops


@pytest.mark.parametrize("variant", ["plain", "distilled", "qknorm-layerscale-mlphead"])
@pytest.mark.parametrize("method,loop", [("cdam", loop_cdam), ("agcam", loop_agcam)])
def test_loops_give_the_batched_maps(variant, method, loop):
    """The loop the speed-up is measured against computes the same maps (so the comparison is fair)."""
    model = make_model(variant)
    images = make_images(model, 2, seed=3)
    want = explain(model, images, method, targets=[1, 0])
    got = loop(model, images, [1, 0])
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")), "state not restored"


# ---------------------------------------------------------------------------------------- bench


def test_run_bench_reports_positive_finite_ratios():
    import warnings

    model = tiny_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench = run_bench(model, **TINY)
    # the end-to-end runs (warm-up + repeats) each write a fresh folder: none replaces another's outputs
    assert not [w for w in caught if "earlier output" in str(w.message)]
    result = bench.to_dict()
    assert _positive_finite(bench.forward_s) and result["forward_s"] == bench.forward_s
    assert set(result["methods"]) == set(method_names())
    for row in result["methods"].values():
        assert _positive_finite(row["seconds"]) and _positive_finite(row["ratio_to_forward"])
    assert _positive_finite(result["together"]["ratio_to_forward"])
    for m in ("cdam", "agcam"):
        assert _positive_finite(result["loop"][m]["speedup"])
    if result["gradcam"]["available"]:
        assert _positive_finite(result["gradcam"]["ratio_to_forward"])
    assert _positive_finite(result["end_to_end"]["slices_per_s"])
    assert result["end_to_end"]["files_written"] >= 2 * len(model.targets)
    mem = result["memory"]
    assert [r["slices"] for r in mem["runs"]] == [3, 12]
    for run in mem["runs"]:
        assert _positive_finite(run["peak_rss_bytes"])
        assert isinstance(run["output_bytes"], int) and run["output_bytes"] > 0  # bytes written to disk
    assert math.isfinite(mem["peak_rss"]["excess_fraction"])
    for check in result["targets_check"].values():
        assert isinstance(check["met"], bool) and math.isfinite(check["value"])
    assert not any(p.grad is not None for p in model.parameters()), "the bench left gradients on the model"
    table = format_table(bench)
    for text in ("machine", "torch", "forward", "loop cdam", "pytorch-grad-cam", "end to end", "memory"):
        assert text in table
    assert json.loads(bench_mod.to_json(bench)).keys() == result.keys()


def test_cli_bench_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_mod, "gradcam_available", lambda: False)
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    args = [
        "--model",
        str(ckpt),
        "--slices",
        "2",
        "--repeats",
        "1",
        "--loop-slices",
        "1",
        "--volume",
        "40",
        "40",
        "3",
        "--no-memory",
        "--method",
        "cdam",
        "--method",
        "agcam",
        "--device",
        "cpu",
        "--json",
    ]
    res = CliRunner().invoke(bench, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"forward_s", "methods", "loop", "gradcam", "end_to_end", "memory", "machine", "workload"} <= set(out)
    assert set(out["methods"]) == {"cdam", "agcam"}
    for m in ("cdam", "agcam"):
        assert _positive_finite(out["methods"][m]["seconds"])
        assert _positive_finite(out["methods"][m]["ratio_to_forward"])
        assert _positive_finite(out["loop"][m]["speedup"])
    assert out["gradcam"] == {"available": False, "ratio_to_forward": None, "note": out["gradcam"]["note"]}
    assert "pytorch-grad-cam" in out["gradcam"]["note"]
    assert _positive_finite(out["end_to_end"]["slices_per_s"])
    assert out["memory"] is None
    assert out["machine"]["torch"] == torch.__version__ and out["machine"]["device"] == "cpu"

    res = CliRunner().invoke(
        bench,
        [
            "--model",
            str(ckpt),
            "--slices",
            "2",
            "--repeats",
            "1",
            "--loop-slices",
            "1",
            "--volume",
            "40",
            "40",
            "3",
            "--no-memory",
            "--method",
            "attention",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "unavailable" in res.stdout and "forward" in res.stdout


@pytest.mark.parametrize(
    "args,match",
    [
        (["--arch", "vit_tiny_patch16_224", "--model", "x"], "got both"),
        (["--image-size", "64"], "needs --arch"),
        (["--method", "nope"], "unknown method"),
        (["--volume", "8", "8", "2"], "at least 32"),
    ],
)
def test_cli_bench_bad_options(args, match):
    res = CliRunner().invoke(bench, args)
    assert res.exit_code == 2
    assert match in res.output


def test_pytorch_gradcam_wrapper_shapes():
    pytest.importorskip("pytorch_grad_cam", reason="pytorch-grad-cam (the gradcam extra) is not installed")
    model = tiny_model()
    images = torch.rand(3, 1, 32, 32)
    maps = bench_mod.run_pytorch_gradcam(model, images, [0, 4])
    assert maps.shape == (3, 2, 32, 32)
    assert (maps >= 0).all() and (maps <= 1 + 1e-6).all()
    assert not any(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_bench_on_cuda():
    model = tiny_model().cuda()
    result = run_bench(model, **TINY).to_dict()
    assert result["machine"]["device"].startswith("cuda")
    assert _positive_finite(result["forward_s"])
    for run in result["memory"]["runs"]:
        assert _positive_finite(run["cuda_max_allocated_bytes"])
    assert "cuda_max_allocated" in result["memory"]
