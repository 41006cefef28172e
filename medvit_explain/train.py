"""Training the malignancy + biomarker ViT on labelled CT slices (phantoms or a manifest).

Data: a folder of phantoms as ``make-phantom`` writes them (``<name>.nii.gz``, ``<name>_nodules.nii.gz``,
``<name>.json``) or a manifest CSV with columns ``image``, ``nodule_mask``, ``labels`` (a JSON file in the
phantom format: ``{"nodules": [{"id", "malignancy", "subtlety", ..., "diameter_mm"}]}``), paths relative
to the CSV. Slices go through exactly the preprocessing used at inference (``SliceInputs``).

Slice labels: a slice is labelled from the nodules whose cross-section in it is at least
``min_area_mm2`` (malignancy = max over them; biomarkers of the largest); slices that only graze a
nodule (smaller cross-sections) are ambiguous and left out of training and evaluation; the other
slices are negatives with no biomarker labels (masked out of the regression loss).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MedvitInputError
from .metrics.masks import slice_masks
from .transforms import SliceInputs, reoriented_view

BIOMARKER_KEYS = {"diameter": "diameter_mm"}  # target name -> label key where they differ


@dataclass
class Study:
    name: str
    image: Path
    nodule_mask: Path
    labels: Path


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


def find_studies(data: str | os.PathLike) -> list[Study]:
    """The labelled studies of a phantom folder or a manifest CSV."""
    data = Path(data)
    if not data.exists():
        raise MedvitInputError(f"training data not found: {data}")
    if data.is_dir():
        studies = []
        for labels in sorted(data.glob("*.json")):
            name = labels.stem
            image, mask = data / f"{name}.nii.gz", data / f"{name}_nodules.nii.gz"
            if image.exists() and mask.exists():
                studies.append(Study(name, image, mask, labels))
        if not studies:
            raise MedvitInputError(f"no phantoms (<name>.nii.gz, <name>_nodules.nii.gz, <name>.json) in {data}")
        return studies
    with open(data, newline="") as stream:
        rows = list(csv.DictReader(stream))
    need = {"image", "nodule_mask", "labels"}
    if not rows or not need <= set(rows[0]):
        raise MedvitInputError(f"manifest {data} needs the columns {', '.join(sorted(need))}")
    studies = []
    for i, row in enumerate(rows):
        paths = [
            (data.parent / row[k]).resolve() if not os.path.isabs(row[k]) else Path(row[k])
            for k in ("image", "nodule_mask", "labels")
        ]
        for p in paths:
            if not p.exists():
                raise MedvitInputError(f"manifest {data} row {i + 1}: file not found: {p}")
        studies.append(Study(row.get("study_id") or paths[0].name, *paths))
    return studies


def slice_targets(
    task_spec, nodules: list[dict], mask_canon: np.ndarray, pixel_area_mm2: float, min_area_mm2: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per canonical slice: targets [Z, K] (normalised, NaN = unlabelled), labelled [Z] bool,
    has_nodule [Z] bool."""
    by_id = {int(n["id"]): n for n in nodules}
    Z = mask_canon.shape[2]
    K = len(task_spec)
    raw = np.full((Z, K), np.nan, np.float64)
    labelled = np.ones(Z, bool)
    has_nodule = np.zeros(Z, bool)
    ids = np.array(sorted(by_id), dtype=np.int64)
    for z in range(Z):
        plane = mask_canon[:, :, z]
        counts = np.bincount(plane.ravel().astype(np.int64), minlength=int(ids.max(initial=0)) + 1)
        present = [(int(i), counts[i] * pixel_area_mm2) for i in ids if counts[i] > 0]
        big = [(i, a) for i, a in present if a >= min_area_mm2]
        if present and not big:
            labelled[z] = False  # a slice that only grazes a nodule: ambiguous
            continue
        for k, target in enumerate(task_spec):
            if target.kind == "binary":
                raw[z, k] = max((float(by_id[i].get(target.name, 0)) for i, _ in big), default=0.0)
        if big:
            has_nodule[z] = True
            largest = by_id[max(big, key=lambda t: t[1])[0]]
            for k, target in enumerate(task_spec):
                if target.kind == "regression":
                    key = BIOMARKER_KEYS.get(target.name, target.name)
                    if key in largest:
                        raw[z, k] = float(largest[key])
    targets = np.asarray(task_spec.normalize(raw), dtype=np.float32)
    return targets, labelled, has_nodule


def load_labelled_study(study: Study, model, min_area_mm2: float):
    """One study's slice preprocessing and labels: ``(inputs, mask, nodules, targets [Z, K], labelled [Z],
    has_nodule [Z])`` per canonical slice (see :func:`slice_targets`)."""
    from .io import load_volume

    volume = load_volume(study.image)
    mask = load_volume(study.nodule_mask)
    if not mask.same_grid(volume, atol=1e-3):
        raise MedvitInputError(f"{study.nodule_mask} is not on the grid of {study.image}")
    try:
        nodules = json.loads(Path(study.labels).read_text())["nodules"]
    except (OSError, ValueError, KeyError) as exc:
        raise MedvitInputError(f"{study.labels}: expected a JSON file with a 'nodules' list ({exc})") from None
    inputs = SliceInputs(volume, model.preprocessing)
    axis_of = np.argsort(inputs.ornt[:, 0])
    pixel_area = float(volume.spacing[axis_of[0]] * volume.spacing[axis_of[1]])
    targets, labelled, has_nodule = slice_targets(
        model.task_spec, nodules, reoriented_view(mask.array, inputs.ornt), pixel_area, min_area_mm2
    )
    return inputs, mask, nodules, targets, labelled, has_nodule


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
        if all_slices:
            chosen = np.where(labelled)[0]
        else:
            pos = np.where(labelled & has_nodule)[0]
            neg = np.where(labelled & ~has_nodule)[0]
            n_neg = min(len(neg), max(1, int(round(background_ratio * max(len(pos), 1)))))
            chosen = np.sort(np.concatenate([pos, rng.choice(neg, n_neg, replace=False)])) if len(neg) else pos
        if len(chosen) == 0:
            continue
        images.append(inputs.images(chosen))
        malignant_ids = [int(n["id"]) for n in nodules if int(n.get("malignancy", 0)) == 1]
        labels = torch.from_numpy(slice_masks(mask.array, inputs, chosen).astype(np.float32))
        maps = torch.stack([(labels > 0).float(), torch.isin(labels, torch.tensor(malignant_ids + [-1.0])).float()], 1)
        token_targets.append(F.adaptive_avg_pool2d(maps, grid))
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


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with tie handling); NaN without both classes."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def evaluate(model, data: SliceSet, batch_size: int = 128) -> dict[str, Any]:
    """Slice-level malignancy ROC AUC and accuracy at 0.5, and biomarker MAE (LIDC scale) per target."""
    model.eval()
    device = next(model.parameters()).device
    outputs = torch.cat(
        [model(data.images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(data), batch_size)]
    )
    spec = model.task_spec
    values = spec.to_values(outputs.numpy())
    truth = spec.denormalize(data.targets.numpy())
    out: dict[str, Any] = {"n_slices": len(data), "n_nodule_slices": int(data.has_nodule.sum())}
    for k, target in enumerate(spec):
        valid = ~np.isnan(truth[:, k])
        if target.kind == "binary":
            y = truth[valid, k] > 0.5
            out[f"{target.name}_auc"] = roc_auc(y, values[valid, k])
            out[f"{target.name}_accuracy"] = float(np.mean((values[valid, k] > 0.5) == y))
            nod = valid & data.has_nodule
            out[f"{target.name}_auc_nodule_slices"] = roc_auc(truth[nod, k] > 0.5, values[nod, k])
        else:
            out.setdefault("mae", {})[target.name] = float(np.mean(np.abs(values[valid, k] - truth[valid, k])))
    return out


def split_studies(studies: Sequence[Study], val_fraction: float, seed: int) -> tuple[list[Study], list[Study]]:
    order = np.random.default_rng(seed).permutation(len(studies))
    n_val = max(1, int(round(val_fraction * len(studies)))) if len(studies) > 1 else 0
    val = [studies[i] for i in sorted(order[:n_val])]
    train = [studies[i] for i in sorted(order[n_val:])]
    return train, val


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
) -> dict[str, Any]:
    """Train a model from ``config`` (architecture, task_spec, preprocessing, training) on ``data``.

    Writes the best checkpoint (``training.select_by``: ``val_loss`` or a validation metric such as
    ``malignancy_auc``) to ``out`` and the resumable state to
    ``out/../<name>.last/``; returns the validation metrics of the best epoch.
    """
    from tqdm.auto import tqdm

    from .model import build_model, resolve_device, save_checkpoint
    from .model.checkpoint import load_model

    recipe = dict(config.get("training", {}))
    seed = int(recipe.get("seed", 0) if seed is None else seed)
    epochs = int(recipe.get("epochs", 30) if epochs is None else epochs)
    torch.manual_seed(seed)
    if recipe.get("num_threads"):
        torch.set_num_threads(int(recipe["num_threads"]))
    dev = resolve_device(device)
    out = Path(out)
    state_dir = out.parent / f".{out.name}.train_state"
    studies = find_studies(data)
    if val_data:
        train_studies, val_studies = studies, find_studies(val_data)
    else:
        train_studies, val_studies = split_studies(studies, float(recipe.get("val_fraction", 0.2)), seed)
    model = build_model(config).to(dev)
    token_head = TokenLabelHead(model).to(dev)
    token_weight = float(recipe.get("token_label_weight", 0.0))
    token_pos_weight = torch.tensor(float(recipe.get("token_label_pos_weight", 1.0)), device=dev)
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
    batch_size = int(recipe.get("batch_size", 64))
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *token_head.parameters()],
        lr=float(recipe.get("lr", 1e-3)),
        weight_decay=float(recipe.get("weight_decay", 0.05)),
    )
    warmup = int(recipe.get("warmup_epochs", 2)) * steps_per_epoch
    total = epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # model selection: the lowest validation loss, or the highest value of a validation metric
    select_by = str(recipe.get("select_by", "val_loss"))
    start_epoch, best_loss, best_score, history, elapsed_before = 0, float("inf"), -float("inf"), [], 0.0
    if resume and (state_dir / "state.pt").exists():
        state = torch.load(state_dir / "state.pt", weights_only=True)
        model.load_state_dict(load_model(state_dir / "model", device=str(dev)).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "token_head" in state:  # the training-only head is part of the resumable state, not of the model
            token_head.load_state_dict(state["token_head"])
        start_epoch, best_loss = int(state["epoch"]) + 1, float(state["best_loss"])
        best_score = float(state.get("best_score", _saved_score(out, select_by, best_loss)))
        elapsed_before = float(state.get("elapsed", 0.0))
        history = json.loads(state_dir.joinpath("history.json").read_text())
    kinds = list(model.task_spec.kinds)
    weights = recipe.get("loss_weights")
    flip = bool(recipe.get("augment_flip", True))
    best_metrics: dict[str, Any] = {}
    t_start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        model.train()
        order = torch.randperm(len(train_set))
        running = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress)
        for step in bar:
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = train_set.images[idx].to(dev)
            y = train_set.targets[idx].to(dev)
            tok = train_set.token_targets[idx].to(dev)
            if flip:  # left-right mirror: lungs are near-symmetric and labels do not change
                mirror = (torch.rand(len(x), device=dev) < 0.5)[:, None, None, None]
                x = torch.where(mirror, x.flip(-1), x)
                tok = torch.where(mirror, tok.flip(-1), tok)
            outputs, tokens = forward_with_tokens(model, x)
            loss = task_loss(outputs, y, kinds, weights)
            if token_weight:
                loss = loss + token_weight * F.binary_cross_entropy_with_logits(
                    token_head(tokens), tok, pos_weight=token_pos_weight
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()
            bar.set_postfix(loss=f"{running / (step + 1):.4f}")
        model.eval()
        with torch.no_grad():
            val_loss = float(
                np.mean(
                    [
                        float(
                            task_loss(
                                model(val_set.images[i : i + 256].to(dev)),
                                val_set.targets[i : i + 256].to(dev),
                                kinds,
                                weights,
                            )
                        )
                        for i in range(0, len(val_set), 256)
                    ]
                )
            )
        metrics = evaluate(model, val_set)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": running / steps_per_epoch,
                "val_loss": val_loss,
                "val_malignancy_auc": metrics.get("malignancy_auc"),
            }
        )
        score = -val_loss if select_by == "val_loss" else float(metrics.get(select_by, float("nan")))
        best_loss = min(best_loss, val_loss)
        if score > best_score:  # NaN never wins
            best_score, best_metrics = score, metrics
            provenance = {
                "recipe": config.get("training", {}),
                "seed": seed,
                "epoch": epoch + 1,
                "train_data": str(data),
                "val_data": str(val_data or f"{len(val_studies)} held-out studies of {data}"),
                "n_train_slices": len(train_set),
                "n_val_slices": len(val_set),
                "validation": metrics,
            }
            save_checkpoint(model, out, provenance=provenance)
        state_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, state_dir / "model")
        torch.save(
            {
                "epoch": epoch,
                "best_loss": best_loss,
                "best_score": best_score,
                "elapsed": elapsed_before + time.perf_counter() - t_start,
                "optimizer": optimizer.state_dict(),
                "token_head": token_head.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
            state_dir / "state.tmp",
        )
        os.replace(state_dir / "state.tmp", state_dir / "state.pt")
        (state_dir / "history.json").write_text(json.dumps(history, indent=1))
        if progress:
            print(
                f"epoch {epoch + 1}: train {history[-1]['train_loss']:.4f} val {val_loss:.4f} "
                f"auc {metrics.get('malignancy_auc', float('nan')):.3f}",
                flush=True,
            )
    return {
        "best_val_loss": best_loss,
        "validation": best_metrics,
        "history": history,
        "select_by": select_by,
        "best_score": best_score,
        "seconds": elapsed_before + time.perf_counter() - t_start,
    }


def _saved_score(out: Path, select_by: str, best_loss: float) -> float:
    """The selection score of the checkpoint already at ``out`` (for a run resumed from an older state)."""
    if select_by == "val_loss":
        return -best_loss
    try:
        validation = json.loads((Path(out) / "config.json").read_text())["provenance"]["validation"]
        return float(validation[select_by])
    except (OSError, KeyError, ValueError, TypeError):
        return -float("inf")
