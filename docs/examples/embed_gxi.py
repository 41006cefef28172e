"""A method of your own, in one file: gradient × input at the patch embeddings.

Register it from your package's pyproject.toml (then `pip install` it):

    [project.entry-points."medvit_explain.explainers"]
    embed-gxi = "embed_gxi:EmbeddingGxI"

and it appears in `medvit-explain list-methods` and runs with `medvit-explain explain CT --method embed-gxi`.
"""

from medvit_explain.explainers import Explainer
from medvit_explain.explainers.base import target_grads, tokens_to_grid


class EmbeddingGxI(Explainer):
    """S_i = Σ_j T_ij ∂f_c/∂T_ij with T the tokens after the position embedding: [B, T, gh, gw], signed."""

    name = "embed-gxi"
    title = "Gradient x input at the patch embeddings"
    citation = "medvit-explain README, 'Write your own method'"
    kind, space = "gradient", "token"

    def attribute(self, images, target_idx):
        vit = self.backbone  # a timm VisionTransformer; self.spec has its geometry
        tokens = vit._pos_embed(vit.patch_embed(images)).detach().requires_grad_(True)  # [B, P+N, D]
        x = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(tokens))))
        outputs = self.scorer(vit.forward_head(x, pre_logits=True))  # [B, K]: logits (or a concept score)
        (grads,) = target_grads(outputs, [tokens], target_idx)  # [T, B, P+N, D], one backward
        return tokens_to_grid((grads * tokens).sum(-1).transpose(0, 1), self.spec)  # prefix tokens dropped
