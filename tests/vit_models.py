"""Tiny timm ViT classifiers for the explainer tests (random, seeded; never downloads).

``TinyViTClassifier`` follows the model contract: ``.backbone`` (timm VisionTransformer, num_classes=0),
``.head`` (pooled pre-logits [B, D] → [B, K]), ``.targets`` (K names),
``model(x) == head(backbone.forward_head(backbone.forward_features(x), pre_logits=True))``.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medvit_explain.model.patch_embed import ConvStem, PatchEmbed3d

TARGETS = ["malignancy", "subtlety", "calcification"]


class TinyViTClassifier(nn.Module):
    def __init__(
        self,
        targets=TARGETS,
        *,
        img_size=32,
        patch_size=8,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
        reg_tokens=0,
        distilled=False,
        global_pool="token",
        qkv_bias=True,
        qk_norm=False,
        init_values=None,
        mlp_head=False,
        volumetric=False,
        stem_widths=None,
        seed=0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        cls = VisionTransformerDistilled if distilled else VisionTransformer
        kwargs = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            init_values=init_values,
            global_pool=global_pool,
        )
        if reg_tokens:
            kwargs["reg_tokens"] = reg_tokens
        if volumetric:  # a 3D patch embedding: img_size / patch_size are (D, H, W)
            kwargs["embed_layer"] = PatchEmbed3d
        if stem_widths:  # a convolutional stem in place of the patchify convolution
            kwargs["embed_layer"] = partial(ConvStem, widths=stem_widths)
        self.backbone = cls(**kwargs)
        d, k = embed_dim, len(targets)
        mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, k))
        self.head = mlp if mlp_head else nn.Linear(d, k)
        self.targets = list(targets)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # timm's init gives near-uniform attention; spread the weights out
            for name, p in self.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * noise)
                elif "gamma" in name:
                    p.copy_(0.5 + 0.1 * noise)
                elif p.ndim >= 2:
                    fan_in = p[0].numel()
                    p.copy_(1.5 * noise / fan_in**0.5)
                else:
                    p.copy_(0.1 * noise)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.head(pooled)


VARIANTS = {
    "plain": dict(),
    "reg4": dict(reg_tokens=4, depth=3),
    "nonsquare": dict(img_size=(32, 48)),
    "distilled": dict(distilled=True),
    "qknorm-layerscale-mlphead": dict(qk_norm=True, init_values=0.5, mlp_head=True, depth=3),
    "avgpool": dict(global_pool="avg"),
    "convstem": dict(stem_widths=[4, 6, 8], patch_size=4, img_size=16),  # three 3×3 convs, two of stride 2
    "3d": dict(volumetric=True, img_size=16, patch_size=8),  # a 2 × 2 × 2 token grid
    "3d-noncubic-reg2": dict(volumetric=True, img_size=(8, 24, 16), patch_size=(4, 8, 4), reg_tokens=2, depth=3),
}


def make_model(variant: str = "plain", **overrides) -> TinyViTClassifier:
    return TinyViTClassifier(**{**VARIANTS[variant], **overrides})


def make_images(model: TinyViTClassifier, batch: int = 2, seed: int = 1) -> torch.Tensor:
    pe = model.backbone.patch_embed
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.backbone.in_chans, *pe.img_size, generator=gen)
