"""Bring your own model: the messages a user acts on, the preprocessing a run reports, DINOv2 with
``dynamic_img_size``, and a plain timm ViT handed to the metrics' explain function."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from medvit_explain.cli import cli
from medvit_explain.errors import CheckpointError
from medvit_explain.explainers import explain
from medvit_explain.io import write_volume
from medvit_explain.model import build_model, load_model

from .test_pipeline import body_volume

KWARGS = {"img_size": [32, 32], "patch_size": 8, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}


def config(**kwargs):
    return {"architecture": {"timm_name": "vit_tiny_patch16_224", "kwargs": {**KWARGS, **kwargs}}}


@pytest.fixture
def timm_weights(tmp_path):
    """A bare timm state dict (head included: 9 outputs) of a 32 px, 1-channel, patch-8 ViT."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=9, **KWARGS).eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    return vit, tmp_path / "vit.pth"


def test_geometry_mismatch_says_what_to_set(timm_weights):
    _, path = timm_weights
    with pytest.raises(CheckpointError, match=r"set architecture.kwargs img_size: \[32, 32\] \(pos_embed holds 17"):
        load_model(path, device="cpu", config=config(img_size=[64, 64]))
    with pytest.raises(CheckpointError, match=r"set architecture.kwargs in_chans: 1 and patch_size: 8"):
        load_model(path, device="cpu", config=config(in_chans=3))


def test_bare_timm_checkpoint_with_its_head_equals_the_module(timm_weights):
    vit, path = timm_weights
    model = load_model(path, device="cpu", config=config())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), rtol=0, atol=1e-6)


def test_plain_timm_vit_goes_to_explain_func(timm_weights):
    """``metrics.explain_func`` takes a plain timm ViT with its head (wrapped once, re-wrapped when its
    weights change) and gives the wrapped model's maps."""
    from medvit_explain.metrics import explain_func
    from medvit_explain.model import wrap_model

    vit, _ = timm_weights
    x = torch.randn(3, 1, 32, 32)
    got = explain_func(vit, x, [0, 4, 4], method="cdam")
    wrapped = wrap_model(vit)
    want = explain_func(wrapped, x, [0, 4, 4], method="cdam")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    with torch.no_grad():
        vit.head.weight.mul_(-1)  # a randomisation-style in-place change: the next call sees it
    flipped = explain_func(vit, x, [0, 4, 4], method="cdam")
    np.testing.assert_allclose(flipped, -want, rtol=1e-5, atol=1e-6)


def test_dinov2_layout_with_dynamic_img_size_explains_like_the_original(tmp_path):
    """A DINOv2-style backbone (register tokens, layer scale, no class position) saved in the
    facebookresearch layout, configured with ``dynamic_img_size: true``: outputs and CDAM maps equal the
    original module's, CDAM by the definition on that module."""
    kw = dict(reg_tokens=4, no_embed_class=True, init_values=1e-5, dynamic_img_size=True)
    original = build_model(config(**kw)).eval()
    with torch.no_grad():
        for p in (original.backbone.pos_embed, original.backbone.cls_token, original.backbone.reg_token):
            p.normal_(std=0.02)
    vit = original.backbone
    facebook = {k.removeprefix("backbone."): v for k, v in original.state_dict().items()}
    cls_pos = torch.randn(1, 1, vit.embed_dim) * 0.02  # facebookresearch keeps a class position in pos_embed
    facebook["pos_embed"] = torch.cat([cls_pos, facebook["pos_embed"]], 1)
    facebook["cls_token"] = facebook["cls_token"] - cls_pos
    facebook["register_tokens"] = facebook.pop("reg_token")
    facebook["mask_token"] = torch.zeros(1, vit.embed_dim)
    save_file({k: v.contiguous() for k, v in facebook.items()}, str(tmp_path / "dinov2.safetensors"))
    loaded = load_model(
        tmp_path / "dinov2.safetensors", device="cpu", config={**config(**kw), "checkpoint": {"source": "timm-filter"}}
    )
    assert loaded.backbone.dynamic_img_size
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=1e-5, atol=1e-6)
    tokens = {}
    handle = vit.blocks[-1].norm1.register_forward_hook(lambda m, a, out: tokens.setdefault("t", out))
    try:
        out = original(x.clone())
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(out[:, 3].sum(), tokens["t"])
    want = (tokens["t"] * grad).sum(-1)[:, 5:].reshape(2, 4, 4)  # 1 class + 4 register tokens dropped
    torch.testing.assert_close(explain(loaded, x, "cdam", targets=[3])[:, 0], want.detach(), rtol=1e-4, atol=1e-6)


def test_defaults_are_reported_in_the_warning_summary_and_report(tmp_path, timm_weights):
    _, path = timm_weights
    cfg = {**config(), "preprocessing": {"hu_window": [-1200, 600], "crop_body": False}}
    (tmp_path / "vit.yaml").write_text(json.dumps(cfg))
    ct = write_volume(body_volume(np.eye(3), (1.0, 1.0, 2.0)), tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    args = ["explain", ct, "--model", path, "--method", "cdam", "--target", "0", "--out", out, "--device", "cpu"]
    done = CliRunner().invoke(cli, [str(a) for a in args])
    assert done.exit_code == 0, done.output
    warning = [line for line in done.output.splitlines() if line.startswith("warning:")]
    assert warning == [
        "warning: vit_tiny_patch16_224: preprocessing mode, scale_to, body_threshold_hu, channels, mean, std "
        "not set in its config; using the defaults (summary.json lists every value used)"
    ]
    model = json.loads((out / "summary.json").read_text())["model"]
    assert model["preprocessing"]["hu_window"] == [-1200.0, 600.0]
    assert model["preprocessing"]["channels"] == {"recipe": "copies"}
    assert model["preprocessing_defaults"] == ["mode", "scale_to", "body_threshold_hu", "channels", "mean", "std"]
    html = (out / "report.html").read_text()
    assert "The config left these to the defaults: body_threshold_hu, channels, mean, mode, scale_to, std." in html
    assert '<td class="l">scale_to</td><td class="l">[0.0, 1.0]</td><td class="l">default</td>' in html
    # the shipped sample model's config is complete: no warning
    sample = CliRunner().invoke(cli, ["explain", str(ct), "--method", "cdam", "--out", str(tmp_path / "s")])
    assert sample.exit_code == 0 and "warning:" not in sample.output


def test_a_biomarker_only_model_says_what_it_explained(tmp_path):
    """No binary target: the summary line counts the ROIs (no 'ROI None, p = nan'); the inputs of an ROI
    run are there to explain further (``result.inputs.images``)."""
    from medvit_explain.model import save_checkpoint

    from .models import tiny_config

    cfg = tiny_config(mode="roi")
    cfg["task_spec"] = {"targets": [{"name": "subtlety", "kind": "regression", "scale": [1, 5]}]}
    save_checkpoint(build_model(cfg), tmp_path / "biomarker")
    volume = body_volume(np.eye(3), (1.0, 1.0, 2.0), shape=(30, 30, 12))
    ct = write_volume(volume, tmp_path / "ct.nii.gz")
    (tmp_path / "centres.csv").write_text("x,y,z\n-20,25,18\n-15,30,20\n")
    args = ["explain", ct, "--model", tmp_path / "biomarker", "--roi-centers", tmp_path / "centres.csv"]
    done = CliRunner().invoke(cli, [str(a) for a in [*args, "--method", "cdam", "--out", tmp_path / "out"]])
    assert done.exit_code == 0, done.output
    assert "2 ROI(s) explained (no binary target to rank by); " in done.output and "nan" not in done.output
    from medvit_explain.model import load_model as load
    from medvit_explain.pipeline import explain_volume

    result = explain_volume(load(tmp_path / "biomarker", device="cpu"), volume, ["cdam"], roi_centers=[[-20, 25, 18]])
    assert result.inputs.images([0, 2]).shape == (2, 1, 32, 32)
