"""Each metric on a hand-made case with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvit_explain.metrics import (
    abpc,
    auc,
    binary_scores,
    body_mask,
    bounding_boxes,
    class_sensitivity,
    compactness,
    evidence_share,
    localization_scores,
    minmax,
    pearson,
    perturbation_curves,
    pointing_game,
    randomize_top_blocks,
    removal_masks,
    slice_masks,
    spearman,
)
from medvit_explain.transforms import SliceInputs
from medvit_explain.volume import Volume

from .conftest import GEOMETRIES
from .models import tiny_model


def _square_mask(n=1, h=16, w=16, r0=4, r1=8, c0=6, c1=10):
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    mask[:, r0:r1, c0:c1] = True
    return mask


# ------------------------------------------------------------------------------------- localization
def test_map_equal_to_mask_scores_one():
    mask = _square_mask()
    scores = localization_scores(mask.float(), mask)
    for key in (
        "pixel_accuracy",
        "iou",
        "dice",
        "precision",
        "recall",
        "box_dice",
        "pointing_game",
        "evidence_in_nodule",
    ):
        assert scores[key].item() == pytest.approx(1.0), key


def test_disjoint_map_scores_zero_and_known_accuracy():
    mask = _square_mask()
    pred = torch.zeros_like(mask)
    pred[:, 0:2, 0:8] = True  # 16 pixels, none in the 16-pixel mask
    s = binary_scores(pred, mask)
    assert s["dice"].item() == pytest.approx(1e-5 / (32 + 1e-5))
    assert s["iou"].item() == pytest.approx(1e-5 / (32 + 1e-5))
    assert s["pixel_accuracy"].item() == pytest.approx((224 + 1e-5) / (256 + 1e-5))
    assert s["precision"].item() < 1e-5 and s["recall"].item() < 1e-5


def test_half_overlap_dice_and_iou():
    mask = _square_mask()  # rows 4..7, cols 6..9: 16 px
    pred = torch.zeros_like(mask)
    pred[:, 4:8, 8:12] = True  # 16 px, 8 shared
    s = binary_scores(pred, mask)
    assert s["dice"].item() == pytest.approx(0.5, abs=1e-6)
    assert s["iou"].item() == pytest.approx(8 / 24, abs=1e-6)
    assert s["precision"].item() == pytest.approx(0.5, abs=1e-6)


def test_constant_map_gives_no_nan():
    mask = _square_mask(2)
    maps = torch.full((2, 16, 16), 3.0)
    scores = localization_scores(maps, mask, lungs=torch.ones_like(mask))
    for key, value in scores.items():
        assert torch.isfinite(value).all(), key
    assert not pointing_game(maps, mask).any()  # a constant map points nowhere
    assert torch.equal(minmax(maps), torch.zeros_like(maps))
    assert evidence_share(torch.zeros(1, 4, 4), torch.ones(1, 4, 4)).item() == 0.0


def test_box_and_pointing_and_evidence_share():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2, 2] = mask[0, 5, 4] = True
    box = bounding_boxes(mask)
    assert box.sum().item() == 4 * 3 and box[0, 2:6, 2:5].all()
    maps = torch.zeros(1, 8, 8)
    maps[0, 5, 4] = 2.0
    maps[0, 0, 0] = 1.0
    maps[0, 7, 7] = -5.0  # negative evidence does not count
    assert pointing_game(maps, mask).item()
    assert evidence_share(maps, mask).item() == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------- faithfulness
def test_removal_masks_counts_and_orders():
    maps = torch.arange(16.0).reshape(1, 4, 4)
    morf, lerf = removal_masks(maps, steps=5)  # 0, 4, 8, 12, 16 pixels
    assert morf.flatten(2).sum(-1).tolist() == [[0, 4, 8, 12, 16]]
    assert morf[0, 1].flatten().nonzero().flatten().tolist() == [12, 13, 14, 15]
    assert lerf[0, 1].flatten().nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_abpc_of_a_perfect_map_on_a_linear_model():
    """Score = mean of the top-left quadrant; the map marks that quadrant: MoRF drops at once."""
    h = w = 4
    images = torch.ones(1, 1, h, w)
    weight = torch.zeros(h, w)
    weight[:2, :2] = 0.25

    def forward(x):
        return (x[:, 0] * weight).sum((-1, -2))[:, None]

    maps = weight[None, None].clone()
    morf, lerf = perturbation_curves(forward, images, maps, steps=5, fill=0.0)
    np.testing.assert_allclose(morf[0, 0], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(lerf[0, 0], [1, 1, 1, 1, 0])
    assert abpc(morf, lerf)[0, 0] == pytest.approx(auc(lerf)[0, 0] - auc(morf)[0, 0])
    assert auc(np.array([1, 0, 0, 0, 0.0])) == pytest.approx(0.125)
    assert abpc(morf, lerf)[0, 0] == pytest.approx(0.875 - 0.125)
    # a constant map: MoRF and LeRF remove the same pixels -> ABPC 0, no NaN
    morf_c, lerf_c = perturbation_curves(forward, images, torch.zeros(1, 1, h, w), steps=5, fill=0.0)
    assert np.isfinite(morf_c).all() and abpc(morf_c, lerf_c)[0, 0] == 0.0


def test_perturbation_curves_batch_and_targets_match_one_by_one():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 6, 6)
    weights = torch.rand(2, 6, 6)

    def forward(x):
        return torch.einsum("bhw,thw->bt", x[:, 0], weights)

    maps = torch.randn(3, 2, 6, 6)
    morf, lerf = perturbation_curves(forward, images, maps, steps=11, fill=0.5, batch_size=7)
    for i in range(3):
        for t in range(2):
            mo, le = perturbation_curves(
                lambda x, t=t: forward(x)[:, t : t + 1],
                images[i : i + 1],
                maps[i : i + 1, t : t + 1],
                steps=11,
                fill=0.5,
            )
            np.testing.assert_allclose(morf[i, t], mo[0, 0], rtol=1e-5)
            np.testing.assert_allclose(lerf[i, t], le[0, 0], rtol=1e-5)


# ------------------------------------------------------------------------------------- maps
def test_compactness_known_values():
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0] = 1.0
    m[0, 0, 1] = 0.04  # ≤ 5 % of max: counts as empty
    m[0, 0, 2] = -0.5
    assert compactness(m).item() == pytest.approx(14 / 16)
    assert compactness(torch.zeros(2, 4, 4)).tolist() == [1.0, 1.0]


def test_class_sensitivity_known_values():
    a = torch.arange(16.0).reshape(4, 4)
    maps = torch.stack([a, a, -a, torch.full_like(a, 2.0)])[None]  # [1, 4, 4, 4]
    per_image, pairs = class_sensitivity(maps, ["a", "b", "c", "d"])
    assert pairs["a|b"] == pytest.approx(0.0)
    assert pairs["a|c"] == pytest.approx(0.0)  # anti-correlated maps are not class-discriminative either
    assert pairs["a|d"] == pytest.approx(0.0)  # a constant map: r := 1, no NaN
    b = torch.zeros(4, 4)
    b[::2] = 1.0
    c = torch.zeros(4, 4)
    c[:, ::2] = 1.0  # uncorrelated with b
    _, pairs = class_sensitivity(torch.stack([b, c])[None])
    assert pairs["0|1"] == pytest.approx(1.0)
    assert torch.isfinite(per_image).all()


def test_spearman_and_pearson():
    a = torch.arange(16.0).reshape(1, 4, 4)
    assert spearman(a, a**3).item() == pytest.approx(1.0)  # monotone: rank correlation 1
    assert pearson(a, a**3).item() < 0.99
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    assert spearman(a, torch.zeros_like(a)).item() == 0.0
    assert spearman(torch.zeros_like(a), torch.zeros_like(a)).item() == 1.0


def test_randomize_top_blocks_changes_only_the_top_blocks():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = randomize_top_blocks(model, 1, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "the original must not change"
    changed = {k for k, v in clone.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("backbone.blocks.1.") for k in changed)
    again = randomize_top_blocks(model, 1, seed=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in clone.state_dict().items())
    assert clone.backbone.blocks[1].norm1.weight.eq(1).all()


# ------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES[:3])
@pytest.mark.parametrize("crop", [False, True])
def test_slice_masks_follow_the_model_inputs(name, direction, spacing, crop):
    """A volume whose HU equal a label map: the mask at model resolution equals the thresholded image."""
    rng = np.random.default_rng(0)
    labels = np.zeros((24, 20, 6), np.int16)
    for _ in range(6):
        x, y, z = rng.integers(0, 18), rng.integers(0, 14), rng.integers(0, 6)
        labels[x : x + 6, y : y + 6, z] = 1
    labels[2:22, 2:18, :] |= 0  # keep the body box computation simple
    hu = np.where(labels > 0, 400.0, -1000.0).astype(np.float32)
    hu[1:23, 1:19, :] = np.maximum(hu[1:23, 1:19, :], -400.0)  # a "body" so the crop box is not everything
    volume = Volume(hu, np.zeros(3), np.asarray(spacing), np.asarray(direction), {})
    size = (48, 40)  # an integer upscale of the uncropped slice: nearest and bilinear agree off the edges
    pre = {
        "image_size": list(size),
        "in_chans": 1,
        "hu_window": [-1000.0, 400.0],
        "crop_body": crop,
        "body_threshold_hu": -500.0,
    }
    inputs = SliceInputs(volume, pre)
    ks = np.arange(inputs.n_slices)
    masks = slice_masks(labels, inputs, ks)
    images = inputs.images(ks)[:, 0].numpy()
    assert masks.shape == images.shape
    # wherever the image is saturated (1.0) the mask says 1, wherever it is at the body value it says 0
    assert np.all(masks[images > 0.999] == 1)
    assert np.all(masks[images < 0.43] == 0)


def test_body_mask_fills_the_lungs():
    hu = np.full((20, 20, 2), -1000.0)
    hu[3:17, 3:17] = 40.0
    hu[6:14, 6:14] = -850.0  # lung inside the body
    body = body_mask(hu)
    assert body[3:17, 3:17].all() and not body[:3].any()
