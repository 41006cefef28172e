"""Training the malignancy + biomarker ViT on labelled CT slices (phantoms or a manifest).

Data: a folder of phantoms as ``make-phantom`` writes them (``<name>.nii.gz``, ``<name>_nodules.nii.gz``,
``<name>.json``) or a manifest CSV (:mod:`.studies`: ``study_id,path,nodule_mask,labels``, or the older
``image,nodule_mask,labels``; ``labels`` is a JSON file in the phantom format:
``{"nodules": [{"id", "malignancy", "subtlety", ..., "diameter_mm"}]}``), paths relative to the CSV.
Slices go through exactly the preprocessing used at inference (``SliceInputs``).

Slice labels (:mod:`.labels`): a slice is labelled from the nodules whose cross-section in it is at
least ``min_area_mm2`` (malignancy = max over them; biomarkers of the largest); slices that only graze a
nodule (smaller cross-sections) are ambiguous and left out of training and evaluation; the other
slices are negatives with no biomarker labels (masked out of the regression loss).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MedvitInputError
from ..metrics.masks import slice_masks
from .labels import BIOMARKER_KEYS, load_labelled_study, slice_targets
from .scores import roc_auc, slice_metrics
from .studies import Study, find_studies

__all__ = [
    "BIOMARKER_KEYS",
    "SliceSet",
    "Study",
    "TokenLabelHead",
    "evaluate",
    "find_studies",
    "forward_with_tokens",
    "load_labelled_study",
    "load_slices",
    "roc_auc",
    "slice_targets",
    "split_studies",
    "task_loss",
    "train",
]


@dataclass
class SliceSet:
    """Preprocessed slices and their targets: ``images`` [N, C, H, W], ``targets`` [N, K] (NaN = no
    label), ``study`` [N] study index, ``has_nodule`` [N] bool, ``token_targets`` [N, 2, gh, gw]
    (share of each patch inside a nodule / inside a malignant nodule: the token labels)."""

    images: torch.Tensor
    targets: torch.Tensor
    study: np.ndarray
    has_nodule: np.ndarray
    token_targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def _choose_slices(
    labelled: np.ndarray, has_nodule: np.ndarray, background_ratio: float, all_slices: bool, rng
) -> np.ndarray:
    """Every nodule slice plus ``background_ratio`` as many random nodule-free ones (or every labelled one)."""
    if all_slices:
        return np.where(labelled)[0]
    pos = np.where(labelled & has_nodule)[0]
    neg = np.where(labelled & ~has_nodule)[0]
    n_neg = min(len(neg), max(1, int(round(background_ratio * max(len(pos), 1)))))
    return np.sort(np.concatenate([pos, rng.choice(neg, n_neg, replace=False)])) if len(neg) else pos


def _token_targets(mask: np.ndarray, inputs, chosen: np.ndarray, nodules: list[dict], grid) -> torch.Tensor:
    """[n, 2, gh, gw]: the share of each patch inside a nodule and inside a malignant nodule."""
    malignant_ids = [int(n["id"]) for n in nodules if int(n.get("malignancy", 0)) == 1]
    labels = torch.from_numpy(slice_masks(mask, inputs, chosen).astype(np.float32))
    maps = torch.stack([(labels > 0).float(), torch.isin(labels, torch.tensor(malignant_ids + [-1.0])).float()], 1)
    return F.adaptive_avg_pool2d(maps, grid)


def load_slices(
    studies: Sequence[Study],
    model,
    *,
    min_area_mm2: float = 10.0,
    background_ratio: float = 1.0,
    all_slices: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> SliceSet:
    """Preprocess the labelled slices of ``studies``: every nodule slice plus ``background_ratio`` as
    many random nodule-free slices (or every labelled slice with ``all_slices``)."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    images, targets, study_idx, nodule_flags, token_targets = [], [], [], [], []
    grid = tuple(model.backbone.patch_embed.grid_size)
    for s, study in enumerate(tqdm(studies, desc="loading", unit="study", disable=not progress)):
        inputs, mask, nodules, t, labelled, has_nodule = load_labelled_study(study, model, min_area_mm2)
        chosen = _choose_slices(labelled, has_nodule, background_ratio, all_slices, rng)
        if len(chosen) == 0:
            continue
        images.append(inputs.images(chosen))
        token_targets.append(_token_targets(mask.array, inputs, chosen, nodules, grid))
        targets.append(torch.from_numpy(t[chosen]))
        study_idx.append(np.full(len(chosen), s))
        nodule_flags.append(has_nodule[chosen])
    if not images:
        raise MedvitInputError("no labelled slices found in the training data")
    return SliceSet(
        torch.cat(images),
        torch.cat(targets),
        np.concatenate(study_idx),
        np.concatenate(nodule_flags),
        torch.cat(token_targets),
    )


class TokenLabelHead(torch.nn.Module):
    """Training-only auxiliary head: each patch token predicts whether its patch lies in a nodule and
    in a malignant nodule (token labelling, Jiang et al., "All Tokens Matter", NeurIPS 2021). It teaches
    a small ViT trained from scratch where lesions are; it is not part of the saved model."""

    def __init__(self, model):
        super().__init__()
        self.prefix = int(model.backbone.num_prefix_tokens)
        self.grid = tuple(model.backbone.patch_embed.grid_size)
        self.linear = torch.nn.Linear(model.backbone.embed_dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, P+N, D] final-norm tokens → [B, 2, gh, gw] logits."""
        logits = self.linear(tokens[:, self.prefix :])
        return logits.transpose(1, 2).reshape(len(tokens), 2, *self.grid)


def forward_with_tokens(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs and its final-norm tokens from one pass (same maths as ``model(x)``)."""
    tokens = model.backbone.forward_features(x)
    return model.head(model.backbone.forward_head(tokens, pre_logits=True)), tokens


def task_loss(
    outputs: torch.Tensor, targets: torch.Tensor, kinds: Sequence[str], weights: dict[str, float] | None = None
) -> torch.Tensor:
    """BCE-with-logits on binary targets + MSE on normalised regression targets; NaN targets masked."""
    weights = weights or {"binary": 1.0, "regression": 1.0}
    binary = torch.tensor([k == "binary" for k in kinds], device=outputs.device)
    valid = ~torch.isnan(targets)
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    bce = F.binary_cross_entropy_with_logits(outputs, safe.clamp(0, 1), reduction="none")
    mse = (outputs - safe) ** 2
    loss = torch.zeros((), device=outputs.device)
    for mask, per, w in ((valid & binary, bce, weights["binary"]), (valid & ~binary, mse, weights["regression"])):
        if mask.any():
            loss = loss + w * per[mask].mean()
    return loss


def evaluate(model, data: SliceSet, batch_size: int = 128) -> dict[str, Any]:
    """Slice-level malignancy ROC AUC and accuracy at 0.5, and biomarker MAE (LIDC scale) per target
    (:func:`.scores.slice_metrics`; the model is put in eval mode)."""
    model.eval()
    out = slice_metrics(model, data.images, data.targets, data.has_nodule, batch_size)
    mae = out.pop("mae")
    return {**out, "mae": mae} if mae else out  # as checkpoints have always recorded it: "mae" last, if any


def split_studies(studies: Sequence[Study], val_fraction: float, seed: int) -> tuple[list[Study], list[Study]]:
    order = np.random.default_rng(seed).permutation(len(studies))
    n_val = max(1, int(round(val_fraction * len(studies)))) if len(studies) > 1 else 0
    val = [studies[i] for i in sorted(order[:n_val])]
    train = [studies[i] for i in sorted(order[n_val:])]
    return train, val


# ------------------------------------------------------------------------------------ the training run


@dataclass
class TrainResult:
    """What a training run gives: the best validation loss and the metrics of the kept checkpoint
    (``validation``: AUC, accuracy, MAE, …), the per-epoch ``history``, the selection rule and its best
    score, and the seconds spent (a resumed run adds the earlier ones)."""

    best_val_loss: float
    validation: dict[str, Any]
    history: list[dict[str, Any]]
    select_by: str
    best_score: float
    seconds: float


@dataclass
class _Run:
    """What one training run holds: the data, the model and its optimiser, and the progress so far
    (the resumable part: ``start_epoch``, ``best_loss``, ``best_score``, ``history``, ``elapsed_before``)."""

    recipe: dict
    seed: int
    epochs: int
    dev: torch.device
    model: Any
    token_head: TokenLabelHead
    train_set: SliceSet
    val_set: SliceSet
    n_val_studies: int
    optimizer: Any = None
    scheduler: Any = None
    steps_per_epoch: int = 0
    batch_size: int = 64
    select_by: str = "val_loss"
    start_epoch: int = 0
    best_loss: float = float("inf")
    best_score: float = -float("inf")
    history: list = field(default_factory=list)
    elapsed_before: float = 0.0
    best_metrics: dict = field(default_factory=dict)


def _prepare(config: dict, data, val_data, seed: int, epochs: int, device: str, progress: bool) -> _Run:
    """Seed, studies (split unless ``val_data``), model, token head and the preprocessed slices."""
    from ..model import build_model, resolve_device

    recipe = dict(config.get("training", {}))
    torch.manual_seed(seed)
    if recipe.get("num_threads"):
        torch.set_num_threads(int(recipe["num_threads"]))
    dev = resolve_device(device)
    studies = find_studies(data)
    if val_data:
        train_studies, val_studies = studies, find_studies(val_data)
    else:
        train_studies, val_studies = split_studies(studies, float(recipe.get("val_fraction", 0.2)), seed)
    model = build_model(config).to(dev)
    token_head = TokenLabelHead(model).to(dev)
    min_area = float(recipe.get("min_area_mm2", 10.0))
    train_set = load_slices(
        train_studies,
        model,
        min_area_mm2=min_area,
        seed=seed,
        progress=progress,
        background_ratio=float(recipe.get("background_ratio", 1.0)),
    )
    val_set = load_slices(val_studies, model, min_area_mm2=min_area, seed=seed + 1, all_slices=True, progress=progress)
    return _Run(recipe, seed, epochs, dev, model, token_head, train_set, val_set, len(val_studies))


def _optimise(run: _Run) -> None:
    """AdamW over the model and the token head; linear warm-up, then a cosine decay per step."""
    recipe = run.recipe
    run.batch_size = int(recipe.get("batch_size", 64))
    run.steps_per_epoch = math.ceil(len(run.train_set) / run.batch_size)
    run.optimizer = torch.optim.AdamW(
        [*run.model.parameters(), *run.token_head.parameters()],
        lr=float(recipe.get("lr", 1e-3)),
        weight_decay=float(recipe.get("weight_decay", 0.05)),
    )
    warmup = int(recipe.get("warmup_epochs", 2)) * run.steps_per_epoch
    total = run.epochs * run.steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lr_factor)
    # model selection: the lowest validation loss, or the highest value of a validation metric
    run.select_by = str(recipe.get("select_by", "val_loss"))


def _resume(run: _Run, state_dir: Path, out: Path) -> None:
    """Restore the model, optimiser, scheduler, RNG, token head and progress from ``state_dir``."""
    from ..model.checkpoint import load_model

    state = torch.load(state_dir / "state.pt", weights_only=True)
    run.model.load_state_dict(load_model(state_dir / "model", device=str(run.dev)).state_dict())
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "token_head" in state:  # the training-only head is part of the resumable state, not of the model
        run.token_head.load_state_dict(state["token_head"])
    run.start_epoch, run.best_loss = int(state["epoch"]) + 1, float(state["best_loss"])
    run.best_score = float(state.get("best_score", _saved_score(out, run.select_by, run.best_loss)))
    run.elapsed_before = float(state.get("elapsed", 0.0))
    run.history = json.loads(state_dir.joinpath("history.json").read_text())


def _train_epoch(run: _Run, epoch: int, progress: bool) -> float:
    """One epoch over the shuffled training slices; returns the mean training loss."""
    from tqdm.auto import tqdm

    recipe, dev, model = run.recipe, run.dev, run.model
    kinds = list(model.task_spec.score_kinds)
    weights = recipe.get("loss_weights")
    flip = bool(recipe.get("augment_flip", True))
    token_weight = float(recipe.get("token_label_weight", 0.0))
    token_pos_weight = torch.tensor(float(recipe.get("token_label_pos_weight", 1.0)), device=dev)
    model.train()
    order = torch.randperm(len(run.train_set))
    running = 0.0
    bar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{run.epochs}", unit="batch", disable=not progress)
    for step in bar:
        idx = order[step * run.batch_size : (step + 1) * run.batch_size]
        x = run.train_set.images[idx].to(dev)
        y = run.train_set.targets[idx].to(dev)
        tok = run.train_set.token_targets[idx].to(dev)
        if flip:  # left-right mirror: lungs are near-symmetric and labels do not change
            mirror = (torch.rand(len(x), device=dev) < 0.5)[:, None, None, None]
            x = torch.where(mirror, x.flip(-1), x)
            tok = torch.where(mirror, tok.flip(-1), tok)
        outputs, tokens = forward_with_tokens(model, x)
        loss = task_loss(outputs, y, kinds, weights)
        if token_weight:
            loss = loss + token_weight * F.binary_cross_entropy_with_logits(
                run.token_head(tokens), tok, pos_weight=token_pos_weight
            )
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        running += loss.item()
        bar.set_postfix(loss=f"{running / (step + 1):.4f}")
    return running / run.steps_per_epoch


@torch.no_grad()
def _validation_loss(run: _Run) -> float:
    run.model.eval()
    kinds, weights, val = list(run.model.task_spec.score_kinds), run.recipe.get("loss_weights"), run.val_set
    losses = [
        float(
            task_loss(
                run.model(val.images[i : i + 256].to(run.dev)), val.targets[i : i + 256].to(run.dev), kinds, weights
            )
        )
        for i in range(0, len(val), 256)
    ]
    return float(np.mean(losses))


def _keep_if_best(run: _Run, epoch: int, val_loss: float, metrics: dict, config: dict, data, val_data, out) -> None:
    """Save the checkpoint to ``out`` when this epoch's selection score beats the best so far."""
    from ..model import save_checkpoint

    score = -val_loss if run.select_by == "val_loss" else float(metrics.get(run.select_by, float("nan")))
    run.best_loss = min(run.best_loss, val_loss)
    if not score > run.best_score:  # NaN never wins
        return
    run.best_score, run.best_metrics = score, metrics
    provenance = {
        "recipe": config.get("training", {}),
        "seed": run.seed,
        "epoch": epoch + 1,
        "train_data": str(data),
        "val_data": str(val_data or f"{run.n_val_studies} held-out studies of {data}"),
        "n_train_slices": len(run.train_set),
        "n_val_slices": len(run.val_set),
        "validation": metrics,
    }
    save_checkpoint(run.model, out, provenance=provenance)


def _save_state(run: _Run, epoch: int, state_dir: Path, elapsed: float) -> None:
    """The resumable state after ``epoch``: the model, optimiser, scheduler, RNG and history."""
    from ..model import save_checkpoint

    state_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run.model, state_dir / "model")
    torch.save(
        {
            "epoch": epoch,
            "best_loss": run.best_loss,
            "best_score": run.best_score,
            "elapsed": elapsed,
            "optimizer": run.optimizer.state_dict(),
            "token_head": run.token_head.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        state_dir / "state.tmp",
    )
    os.replace(state_dir / "state.tmp", state_dir / "state.pt")
    (state_dir / "history.json").write_text(json.dumps(run.history, indent=1))


def train(
    config: dict,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val_data: str | None = None,
    resume: bool = False,
    epochs: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> TrainResult:
    """Train a model from ``config`` (architecture, task_spec, preprocessing, training) on ``data``.

    Writes the best checkpoint (``training.select_by``: ``val_loss`` or a validation metric such as
    ``malignancy_auc``) to ``out`` and the resumable state to
    ``out/../<name>.last/``; returns the validation metrics of the best epoch.
    """
    recipe = dict(config.get("training", {}))
    seed = int(recipe.get("seed", 0) if seed is None else seed)
    epochs = int(recipe.get("epochs", 30) if epochs is None else epochs)
    out = Path(out)
    state_dir = out.parent / f".{out.name}.train_state"
    run = _prepare(config, data, val_data, seed, epochs, device, progress)
    _optimise(run)
    if resume and (state_dir / "state.pt").exists():
        _resume(run, state_dir, out)
    t_start = time.perf_counter()
    for epoch in range(run.start_epoch, epochs):
        train_loss = _train_epoch(run, epoch, progress)
        val_loss = _validation_loss(run)
        metrics = evaluate(run.model, run.val_set)
        run.history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_malignancy_auc": metrics.get("malignancy_auc"),
            }
        )
        _keep_if_best(run, epoch, val_loss, metrics, config, data, val_data, out)
        _save_state(run, epoch, state_dir, run.elapsed_before + time.perf_counter() - t_start)
        if progress:
            print(
                f"epoch {epoch + 1}: train {train_loss:.4f} val {val_loss:.4f} "
                f"auc {metrics.get('malignancy_auc', float('nan')):.3f}",
                flush=True,
            )
    return TrainResult(
        best_val_loss=run.best_loss,
        validation=run.best_metrics,
        history=run.history,
        select_by=run.select_by,
        best_score=run.best_score,
        seconds=run.elapsed_before + time.perf_counter() - t_start,
    )


def _saved_score(out: Path, select_by: str, best_loss: float) -> float:
    """The selection score of the checkpoint already at ``out`` (for a run resumed from an older state)."""
    if select_by == "val_loss":
        return -best_loss
    try:
        validation = json.loads((Path(out) / "config.json").read_text())["provenance"]["validation"]
        return float(validation[select_by])
    except (OSError, KeyError, ValueError, TypeError):
        return -float("inf")
