"""Model-randomisation sanity check (Adebayo et al., 'Sanity Checks for Saliency Maps', NeurIPS 2018).

The top ``k`` transformer blocks of a copy of the model are re-initialised the way timm initialises a
ViT (Linear weights ``trunc_normal(std=0.02)``, biases 0, LayerNorm weight 1 and bias 0), from the last
block down (cascading: ``k = 1`` is the last block, ``k = 2`` the last two, ...). An explanation that
depends on what the model learned must change; the Spearman rank correlation between the original and
the randomised maps should drop.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["randomize_top_blocks"]


@torch.no_grad()
def randomize_top_blocks(model: nn.Module, k: int, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose last ``k`` backbone blocks are re-initialised (seeded).

    The original model is not touched. ``k`` larger than the depth re-initialises every block.
    """
    blocks = model.backbone.blocks
    if k < 1:
        raise ValueError(f"expected k >= 1 blocks to randomise, got {k}")
    clone = copy.deepcopy(model)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    for block in list(clone.backbone.blocks)[max(0, len(blocks) - k) :]:
        for module in block.modules():
            if isinstance(module, nn.Linear):
                weight = torch.empty(module.weight.shape)
                nn.init.trunc_normal_(weight, std=0.02, generator=generator)
                module.weight.copy_(weight)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
    return clone.eval()
