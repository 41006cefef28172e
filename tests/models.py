"""Tiny real models for pipeline tests (random weights, seeded)."""

from __future__ import annotations

import torch

from medvit_explain.model import build_model, save_checkpoint


def tiny_config(image_size=(32, 32), patch=8, window=(-1000.0, 400.0), crop_body=False, mode="slice"):
    """A tiny ViT's config; a 3-long ``image_size`` ``[D, H, W]`` gives a volumetric one (mode roi or volume)."""
    config = {
        "name": "tiny-test-vit",
        "architecture": {
            "timm_name": "vit_tiny_patch16_224",
            "kwargs": {
                "img_size": list(image_size),
                "patch_size": patch,
                "in_chans": 1,
                "embed_dim": 32,
                "depth": 2,
                "num_heads": 2,
            },
        },
        "task_spec": "lidc",
        "preprocessing": {
            "mode": mode,
            "image_size": list(image_size),
            "in_chans": 1,
            "hu_window": list(window),
            "crop_body": crop_body,
            "roi": {"size_mm": 16.0, "spacing_mm": 1.0, "views": ["axial", "coronal", "sagittal"]},
        },
    }
    if len(image_size) == 3:
        config["architecture"]["patch_embed"] = "conv3d"
    return config


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(tiny_config(**kwargs)).eval()


def tiny_checkpoint(path, seed=0, **kwargs):
    return save_checkpoint(tiny_model(seed, **kwargs), path)


def assert_resume_is_exact(config, data, tmp_path) -> None:
    """Two epochs of ``config`` in one go and one epoch + a resumed one give bit-identical weights."""
    from medvit_explain.model import load_model
    from medvit_explain.workflows.train import train

    train(config, data, tmp_path / "a", epochs=2, device="cpu", progress=False)
    train(config, data, tmp_path / "b", epochs=1, device="cpu", progress=False)
    train(config, data, tmp_path / "b", epochs=2, device="cpu", progress=False, resume=True)
    a = load_model(tmp_path / ".a.train_state" / "model", device="cpu").state_dict()
    b = load_model(tmp_path / ".b.train_state" / "model", device="cpu").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
