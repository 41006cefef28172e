"""A ViT with a convolutional stem (``architecture.patch_embed: convstem``): its geometry and layers, the
config's errors, checkpoints, ``wrap_model`` of a timm ViT built with it, and the explainers on it (the
exactness tests of every method also run on the ``convstem`` variant of ``tests.vit_models``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medvit_explain as mx
from medvit_explain.errors import CheckpointError
from medvit_explain.model import build_model, load_model, save_checkpoint, wrap_model
from medvit_explain.model.patch_embed import ConvStem
from tests.models import tiny_config

NAMES = ["malignancy", "spiculation", "texture"]


def stem_config(widths=(8, 8, 16), patch=4, image_size=(16, 24), in_chans=1):
    config = tiny_config(image_size=image_size, patch=patch)
    config["architecture"].update(patch_embed="convstem", stem_widths=list(widths))
    config["architecture"]["kwargs"]["in_chans"] = config["preprocessing"]["in_chans"] = in_chans
    return config


def images(model, batch=2, seed=0):
    return torch.randn(batch, *model.input_size, generator=torch.Generator().manual_seed(seed))


def test_a_conv_stem_keeps_the_patch_grid_and_halves_in_its_last_convolutions():
    model = build_model(stem_config(widths=(8, 8, 16), patch=4, image_size=(16, 24), in_chans=3))
    pe = model.backbone.patch_embed
    assert isinstance(pe, ConvStem)
    assert model.input_size == (3, 16, 24) and model.patch_size == (4, 4) and model.grid_size == (4, 6)
    convs = [m for m in pe.stem if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(1, 1), (2, 2), (2, 2)]
    assert [c.out_channels for c in convs] == [8, 8, 16] and convs[0].in_channels == 3
    assert pe.proj.kernel_size == (1, 1) and pe.proj.out_channels == model.backbone.embed_dim
    assert model.config["architecture"]["stem_widths"] == [8, 8, 16]
    x = images(model)
    with torch.no_grad():  # the tokens are the 1x1 projection of the stem's feature map, row-major
        expected = pe.proj(pe.stem(x)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(pe(x), expected)
        assert pe(x).shape == (2, 24, model.backbone.embed_dim)


def test_each_token_sees_only_its_neighbourhood():
    """A pixel change moves the tokens whose receptive field holds it, not a far one (locality)."""
    model = build_model(stem_config(widths=(8, 8, 16), patch=4, image_size=(32, 32)))
    pe = model.backbone.patch_embed.eval()
    x = images(model, batch=1)
    y = x.clone()
    y[0, 0, 0, 0] += 10.0
    with torch.no_grad():
        moved = (pe(y) - pe(x)).abs().sum(-1)[0].reshape(8, 8)
    assert moved[0, 0] > 0 and moved[4:, 4:].abs().max() == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["architecture"].pop("stem_widths"), r"patch_embed convstem needs architecture.stem_widths"),
        (lambda c: c["architecture"].update(stem_widths=[8, 0]), r"needs architecture.stem_widths"),
        (lambda c: c["architecture"].update(stem_widths=[8]), r"stem_widths needs at least 2 positive channel"),
        (lambda c: c["architecture"]["kwargs"].update(patch_size=6), r"patch_size must be one power of two"),
        (lambda c: c["architecture"]["kwargs"].update(img_size=[16, 22]), r"not a whole number of patches"),
        (
            lambda c: c["architecture"].update(patch_embed="conv2d"),
            r"stem_widths is for patch_embed convstem",
        ),
    ],
)
def test_conv_stem_config_errors_are_one_line(change, message):
    config = stem_config()
    change(config)
    with pytest.raises(CheckpointError, match=message) as info:
        build_model(config)
    assert "\n" not in str(info.value)


def test_conv_stem_checkpoint_round_trip(tmp_path):
    model = build_model(stem_config())
    with torch.no_grad():  # batch-norm statistics are part of the checkpoint
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    save_checkpoint(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", device="cpu")
    assert loaded.config["architecture"]["patch_embed"] == "convstem"
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(mx.explain(loaded, x, "cdam"), mx.explain(model, x, "cdam"))


def test_a_timm_vit_built_with_the_conv_stem_wraps():
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    vit = VisionTransformer(
        img_size=16,
        patch_size=4,
        in_chans=2,
        num_classes=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
        embed_layer=partial(ConvStem, widths=[6, 6, 12]),
    ).eval()
    model = wrap_model(vit, NAMES)
    assert model.config["architecture"]["patch_embed"] == "convstem"
    assert model.config["architecture"]["stem_widths"] == [6, 6, 12]
    assert model.input_size == (2, 16, 16) and model.grid_size == (4, 4)
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x))


@pytest.mark.parametrize("method", ["cdam", "agcam", "attention", "rollout", "gradcam", "attnlrp", "inputxgrad"])
def test_methods_run_on_a_conv_stem_model_with_one_map_per_token(method):
    """Through the package API on a built model (the values: the ``convstem`` variant of the exactness tests;
    pixel methods are pooled to the token grid, AttnLRP stops at the stem's output)."""
    model = build_model(stem_config()).eval()
    maps = mx.explain(model, images(model), method, targets=["malignancy", "spiculation"])
    assert maps.shape == (2, 2, *model.grid_size) and torch.isfinite(maps).all() and maps.abs().sum() > 0
