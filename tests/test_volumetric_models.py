"""Volumetric ViTs in the model contract: timm's ViT with a 3D patch embedding, MONAI's 3D ``ViT`` through
``wrap_model``, checkpoints, and CDAM / AG-CAM / baselines on 3D token grids against the per-item,
per-target references of ``test_explain_exactness`` (the same definitions; only the grid has three axes)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT

import medvit_explain as mx
from medvit_explain.errors import CheckpointError, UnsupportedImageError
from medvit_explain.model import build_model, load_model, save_checkpoint, wrap_model
from tests.models import tiny_config
from tests.test_explain_exactness import assert_maps_close, ref

NAMES = ["malignancy", "spiculation", "texture"]


def monai_vit(proj_type="conv", img_size=(16, 32, 24), patch=(8, 8, 8), seed=0, heads=4):
    torch.manual_seed(seed)
    vit = ViT(
        in_channels=1,
        img_size=img_size,
        patch_size=patch,
        hidden_size=48,
        mlp_dim=96,
        num_layers=3,
        num_heads=heads,
        proj_type=proj_type,
        classification=True,
        num_classes=len(NAMES),
        spatial_dims=3,
    )
    with torch.no_grad():  # MONAI's init gives near-uniform attention: spread the weights out
        gen = torch.Generator().manual_seed(seed)
        for name, p in vit.named_parameters():
            if p.ndim >= 2:
                p.copy_(1.5 * torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif "norm" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return vit.eval()


def pre_tanh(vit, x):
    """MONAI's own forward up to the Linear before the Tanh."""
    captured = []
    handle = vit.classification_head[0].register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with torch.no_grad():
            vit(x)
    finally:
        handle.remove()
    return captured[0]


@pytest.fixture(scope="module", params=["conv", "perceptron"])
def wrapped(request):
    vit = monai_vit(request.param)
    return vit, wrap_model(vit, NAMES, preprocessing={"image_size": [16, 32, 24]})


def volumes(model, batch=2, seed=3):
    return torch.randn(batch, *model.input_size, generator=torch.Generator().manual_seed(seed))


def test_monai_3d_vit_wraps_with_its_geometry_and_outputs(wrapped):
    vit, model = wrapped
    assert model.spatial_dims == 3
    assert model.input_size == (1, 16, 32, 24)
    assert model.patch_size == (8, 8, 8)
    assert model.grid_size == (2, 4, 3)  # non-cubic, read from the module and the given size
    assert model.num_prefix_tokens == 1
    assert model.preprocessing["mode"] == "roi"  # a volumetric model's default
    x = volumes(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pre_tanh(vit, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["cdam", "agcam", "attention", "rollout", "gradcam"])
def test_methods_on_a_wrapped_monai_3d_vit_match_the_reference(wrapped, method):
    _, model = wrapped
    x = volumes(model, batch=3)
    targets = [2, 0]
    got = mx.explain(model, x, method, targets=targets)
    assert got.shape == (3, 2, 2, 4, 3)
    want = getattr(ref, {"attention": "attention_map"}.get(method, method))(model, x, targets)
    assert_maps_close(got, want)


def test_all_targets_in_one_call_equal_one_target_at_a_time(wrapped):
    _, model = wrapped
    x = volumes(model)
    for method in ("cdam", "agcam"):
        together = mx.explain(model, x, method)
        for t in range(len(NAMES)):
            torch.testing.assert_close(together[:, t], mx.explain(model, x, method, targets=[t])[:, 0])


def test_a_timm_vit_with_the_3d_patch_embedding_wraps():
    from timm.models.vision_transformer import VisionTransformer

    from medvit_explain.model.patch_embed import PatchEmbed3d

    torch.manual_seed(1)
    vit = VisionTransformer(
        img_size=(16, 32, 16),
        patch_size=8,
        in_chans=1,
        num_classes=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
        embed_layer=PatchEmbed3d,
    ).eval()
    model = wrap_model(vit, NAMES)
    assert model.config["architecture"]["patch_embed"] == "conv3d" and model.grid_size == (2, 4, 2)
    x = volumes(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x))


def test_a_cubic_monai_vit_needs_no_size():
    model = wrap_model(monai_vit(img_size=16, patch=4), NAMES)
    assert model.grid_size == (4, 4, 4)
    assert model.input_size == (1, 16, 16, 16)


def test_volumetric_checkpoint_round_trip(wrapped, tmp_path):
    _, model = wrapped
    save_checkpoint(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config["architecture"]["patch_embed"] == "conv3d"
    x = volumes(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(mx.explain(loaded, x, "cdam"), mx.explain(model, x, "cdam"))


def test_build_model_from_a_volumetric_config():
    model = build_model(tiny_config(image_size=(16, 32, 16), patch=8, mode="volume"))
    assert model.grid_size == (2, 4, 2)
    assert model.preprocessing["image_size"] == [16, 32, 16]
    assert model.preprocessing["mode"] == "volume"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["architecture"]["kwargs"].pop("depth"), r"needs architecture.kwargs \['depth'\]"),
        (
            lambda c: c["architecture"].update(patch_embed="conv4d"),
            r"expected architecture.patch_embed conv2d, conv3d \(3D volumes\) or convstem",
        ),
        (lambda c: c["architecture"]["kwargs"].update(img_size=[16, 32]), r"img_size \(patch_embed conv3d\): expected"),
        (lambda c: c["architecture"]["kwargs"].update(img_size=[16, 30, 16]), r"not a whole number of patches"),
        (lambda c: c["preprocessing"].update(mode="slice"), r"expected mode 'roi' or 'volume' \(a volumetric model\)"),
        (
            lambda c: c["preprocessing"].update(
                in_chans=3, channels={"recipe": "adjacent_slices", "offsets": [-1, 0, 1]}
            ),
            r"adjacent_slices is for 2D models",
        ),
    ],
)
def test_volumetric_config_errors_are_one_line(change, message):
    config = tiny_config(image_size=(16, 32, 16), patch=8, mode="roi")
    change(config)
    with pytest.raises(CheckpointError, match=message) as info:
        build_model(config)
    assert "\n" not in str(info.value)


def test_a_volumetric_model_refuses_2d_images():
    model = build_model(tiny_config(image_size=(16, 16, 16), patch=8, mode="roi"))
    with pytest.raises(UnsupportedImageError, match=r"expected volumes of shape \[B, C, D, H, W\] \(5D\)"):
        mx.explain(model, torch.zeros(1, 1, 16, 16), "cdam")
    with pytest.raises(UnsupportedImageError, match=r"expected images of size \(16, 16, 16\), got \(16, 16, 8\)"):
        mx.explain(model, torch.zeros(1, 1, 16, 16, 8), "cdam")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["cdam", "agcam", "rollout", "gradcam"])
def test_volumetric_maps_on_cuda_equal_the_cpu_ones(wrapped, method):
    _, model = wrapped
    x = volumes(model, batch=4)
    on_cpu = mx.explain(model, x, method)
    gpu_model = build_model(model.config)
    gpu_model.load_state_dict(model.state_dict())
    on_gpu = mx.explain(gpu_model.cuda().eval(), x.cuda(), method).cpu()
    assert_maps_close(on_gpu, on_cpu, tol=1e-3)  # TF32 convolutions and matmuls on the GPU
