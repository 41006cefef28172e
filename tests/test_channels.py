"""Channel recipes and per-channel mean / std: exact values against slow, written-out references."""

import json

import numpy as np
import pytest
import torch

from medvit_explain.errors import CheckpointError
from medvit_explain.model import build_model, validate_preprocessing
from medvit_explain.model.preprocessing import DEFAULT_PREPROCESSING, defaults_used
from medvit_explain.transforms import (
    ChannelRecipe,
    Preprocessing,
    RoiInputs,
    SliceInputs,
    _view_plane,
    channel_fill,
    resize_planes,
    window,
    window_mean,
)
from medvit_explain.volume import Volume

from .models import tiny_config

F32 = np.float32
WINDOW = (-1000.0, 400.0)
WINDOWS = [[-1000.0, 400.0], [-160.0, 240.0], [-1400.0, -200.0]]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ROI = {"size_mm": 16.0, "spacing_mm": 1.0, "views": ["axial", "coronal", "sagittal"]}

# canonical (L, P, S) index -> source index, written out for the two geometries used below
CANONICAL = {
    "identity": (np.eye(3), lambda a, x, y, k: a[x, y, k]),
    # i runs to patient right and k to inferior: canonical x and k are the source's reversed
    "flipped": (np.diag([-1.0, 1.0, -1.0]), lambda a, x, y, k: a[a.shape[0] - 1 - x, y, a.shape[2] - 1 - k]),
}


def make_volume(direction=np.eye(3), shape=(12, 10, 6), seed=0, spacing=(0.8, 0.7, 2.0)):
    rng = np.random.default_rng(seed)
    array = rng.uniform(-1500, 600, size=shape).astype(np.float32)
    return Volume(array, (5.0, -3.0, 11.0), spacing, direction)


def ref_window(hu, lo, hi, a=0.0, b=1.0):
    """One voxel through the window, in float32 as the model inputs are."""
    x = (F32(hu) - F32(lo)) / F32(hi - lo)
    x = x * F32(b - a) + F32(a)
    return min(max(x, F32(a)), F32(b))


def ref_norm(x, mean, std, c):
    return x if mean is None else (F32(x) - F32(mean[c])) / F32(std[c])


def ref_slice_images(volume, canon_at, slices, windows, mean=None, std=None, offsets=None):
    """[B, C, rows, cols]: no crop, no resize; pixel (r, q) of canonical slice k is canonical voxel (q, r, k)."""
    a = volume.array
    nx, ny, nz = a.shape  # canonical extents equal the source's for these axis-aligned geometries
    n_chans = len(windows) if offsets is None else len(offsets)
    out = np.zeros((len(slices), n_chans, ny, nx), np.float32)
    for b, k in enumerate(slices):
        for c in range(n_chans):
            lo, hi = windows[c] if offsets is None else windows[0]
            kk = k if offsets is None else min(max(k + offsets[c], 0), nz - 1)
            for r in range(ny):
                for q in range(nx):
                    out[b, c, r, q] = ref_norm(ref_window(canon_at(a, q, r, kk), lo, hi), mean, std, c)
    return out


def ref_roi_images(roi, windows, mean=None, std=None, offsets=None):
    """[R·V, C, n, n] from each ROI's HU cube: axial (r, q) = cube[q, r, d], coronal = cube[q, d, n-1-r],
    sagittal = cube[d, q, n-1-r], with d the centre (+ offset, clamped) along the view's normal."""
    n = roi.n
    n_chans = len(windows) if offsets is None else len(offsets)
    out = np.zeros((roi.n_inputs, n_chans, n, n), np.float32)
    for r_idx in range(len(roi.centers_mm)):
        cube = roi.cube(r_idx)
        for v, view in enumerate(roi.views):
            for c in range(n_chans):
                lo, hi = windows[c] if offsets is None else windows[0]
                d = n // 2 if offsets is None else min(max(n // 2 + offsets[c], 0), n - 1)
                for r in range(n):
                    for q in range(n):
                        if view == "axial":
                            hu = cube[q, r, d]
                        elif view == "coronal":
                            hu = cube[q, d, n - 1 - r]
                        else:
                            hu = cube[d, q, n - 1 - r]
                        out[r_idx * len(roi.views) + v, c, r, q] = ref_norm(ref_window(hu, lo, hi), mean, std, c)
    return out


def slice_config(volume, in_chans, **extra):
    nx, ny, _ = volume.shape
    return {"image_size": [ny, nx], "in_chans": in_chans, "hu_window": list(WINDOW), "crop_body": False, **extra}


def roi_setup(in_chans, **extra):
    volume = make_volume(shape=(30, 28, 24), spacing=(1.0, 0.9, 1.3), seed=4)
    centres = volume.index_to_physical(np.array([[14.0, 13.0, 11.0], [3.0, 25.0, 20.0]]))  # one near the edge
    pre = {"image_size": [16, 16], "in_chans": in_chans, "hu_window": list(WINDOW), "roi": ROI, **extra}
    return RoiInputs(volume, pre, centres)


def assert_exact(got: torch.Tensor, want: np.ndarray):
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), want)


# --- the default is today's behaviour, bit for bit ------------------------------------------------


@pytest.mark.parametrize("crop_body", [False, True])
def test_default_config_gives_the_old_images(crop_body):
    """Copies of one windowed, resized plane (the code before channel recipes, written out here)."""
    volume = make_volume(shape=(40, 36, 7), seed=1)
    volume.array[:3] = -1000  # air at the sides so the body crop cuts something
    given = {"image_size": [24, 20], "in_chans": 3, "hu_window": list(WINDOW), "scale_to": [-2.0, 2.0]}
    pre = validate_preprocessing({**given, "crop_body": crop_body})
    assert pre["channels"] == {"recipe": "copies"} and pre["mean"] is None and pre["std"] is None
    si = SliceInputs(volume, pre)
    slices = np.array([0, 3, 6, 2])
    x0, x1, y0, y1 = si.box
    block = torch.from_numpy(np.ascontiguousarray(si.canonical[x0:x1, y0:y1][:, :, slices].transpose(2, 1, 0)))
    old = resize_planes(window(pre)(block), (24, 20)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    new = si.images(slices)
    assert torch.equal(new, old)
    assert new.is_contiguous()  # as before (the GPU batch loop pins it)

    roi = roi_setup(3, scale_to=[-2.0, 2.0], image_size=[20, 20])
    planes = [np.ascontiguousarray(_view_plane(roi.cube(r), view)) for r in range(2) for view in roi.views]
    hu = torch.from_numpy(np.stack(planes))
    old_roi = resize_planes(window(roi.config)(hu), (20, 20)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    assert torch.equal(roi.images(), old_roi)


def test_sample_model_preprocessing_is_unchanged():
    """The first sample model's dict (``configs/sample_slice_v1``: one channel, no mean / std) gets the copies
    recipe, no normalisation: its inputs are what they were before channel recipes existed."""
    from pathlib import Path

    config = json.loads((Path(__file__).parents[1] / "configs/sample_slice_v1/config.json").read_text())
    pre = Preprocessing.from_config(validate_preprocessing(config["preprocessing"], (1, 256, 256)))
    assert pre.channels.recipe == "copies" and pre.mean is None and pre.std is None
    volume = make_volume(shape=(20, 18, 3), seed=2)
    si = SliceInputs(volume, pre)
    x0, x1, y0, y1 = si.box
    block = torch.from_numpy(np.ascontiguousarray(si.canonical[x0:x1, y0:y1][:, :, [1]].transpose(2, 1, 0)))
    old = resize_planes(window(pre)(block), (256, 256)).unsqueeze(1)
    assert torch.equal(si.images([1]), old)
    assert window_mean(pre) == 0.0  # centre of scale_to [-2, 2], as before


# --- copies with per-channel mean / std -----------------------------------------------------------


def test_copies_with_per_channel_mean_std():
    volume = make_volume()
    mean, std = [0.1, 0.5, -0.25], [0.5, 2.0, 0.125]
    si = SliceInputs(volume, slice_config(volume, 3, mean=mean, std=std))
    slices = [0, 2, 5]
    want = ref_slice_images(volume, CANONICAL["identity"][1], slices, [WINDOW] * 3, mean, std)
    assert_exact(si.images(slices), want)
    # the same thing read as "(plane - mean[c]) / std[c]" of the unnormalised plane
    plane = SliceInputs(volume, slice_config(volume, 1)).images(slices)[:, 0]
    for c in range(3):
        assert torch.equal(si.images(slices)[:, c], (plane - F32(mean[c])) / F32(std[c]))


def test_copies_with_one_number_mean_std():
    volume = make_volume()
    si = SliceInputs(volume, slice_config(volume, 3, mean=0.5, std=0.25))
    images = si.images([1, 4])
    want = ref_slice_images(volume, CANONICAL["identity"][1], [1, 4], [WINDOW] * 3, [0.5] * 3, [0.25] * 3)
    assert_exact(images, want)


# --- one HU window per channel --------------------------------------------------------------------


@pytest.mark.parametrize("geometry", sorted(CANONICAL))
def test_hu_windows_with_imagenet_mean_std_slice_mode(geometry):
    direction, canon_at = CANONICAL[geometry]
    volume = make_volume(direction)
    channels = {"recipe": "hu_windows", "windows": WINDOWS}
    pre = validate_preprocessing(slice_config(volume, 3, channels=channels, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    si = SliceInputs(volume, pre)
    slices = list(range(si.n_slices))
    want = ref_slice_images(volume, canon_at, slices, WINDOWS, IMAGENET_MEAN, IMAGENET_STD)
    assert_exact(si.images(slices), want)
    batched = torch.cat([b.images for b in si.batches(4)])
    assert torch.equal(batched, si.images(slices))


def test_hu_windows_with_imagenet_mean_std_roi_mode():
    channels = {"recipe": "hu_windows", "windows": WINDOWS}
    roi = roi_setup(3, channels=channels, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    want = ref_roi_images(roi, WINDOWS, IMAGENET_MEAN, IMAGENET_STD)
    assert_exact(roi.images(), want)
    assert_exact(roi.images([4, 1]), want[[4, 1]])


# --- adjacent slices ------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", sorted(CANONICAL))
def test_adjacent_slices_slice_mode(geometry):
    """Channel c of slice k is canonical slice clamp(k + offsets[c]); the ends repeat."""
    direction, canon_at = CANONICAL[geometry]
    volume = make_volume(direction)
    offsets = [-1, 0, 1]
    si = SliceInputs(volume, slice_config(volume, 3, channels={"recipe": "adjacent_slices", "offsets": offsets}))
    last = si.n_slices - 1
    for slices in ([0, last], [3, 1, 4], list(range(si.n_slices))):
        want = ref_slice_images(volume, canon_at, slices, [WINDOW], offsets=offsets)
        assert_exact(si.images(slices), want)
    images = si.images([0, last])
    assert torch.equal(images[0, 0], images[0, 1]) and torch.equal(images[1, 2], images[1, 1])


def test_adjacent_slices_read_only_the_slices_a_batch_needs(monkeypatch):
    volume = make_volume(shape=(8, 8, 30))
    offsets = [-2, 0, 3]
    si = SliceInputs(volume, slice_config(volume, 3, channels={"recipe": "adjacent_slices", "offsets": offsets}))
    read = []
    original = si._hu_planes
    monkeypatch.setattr(si, "_hu_planes", lambda idx: read.append(list(idx)) or original(idx))
    images = si.images([0, 10, 28])
    assert read == [[0, 3, 8, 10, 13, 26, 28, 29]]  # the union of k + offsets, clamped
    want = ref_slice_images(volume, CANONICAL["identity"][1], [0, 10, 28], [WINDOW], offsets=offsets)
    assert_exact(images, want)


def test_adjacent_slices_roi_mode_with_mean_std():
    """Neighbouring cube planes along each view's normal, one cube sample apart, clamped to the cube."""
    offsets = [-9, 0, 8]  # the cube has 16 planes: 8 - 9 and 8 + 8 fall outside and clamp
    mean, std = [0.2, 0.3, 0.4], [0.5, 0.25, 2.0]
    roi = roi_setup(3, channels={"recipe": "adjacent_slices", "offsets": offsets}, mean=mean, std=std)
    want = ref_roi_images(roi, [WINDOW], mean, std, offsets=offsets)
    assert_exact(roi.images(), want)
    plain = roi_setup(3, channels={"recipe": "adjacent_slices", "offsets": [-1, 0, 1]})
    assert_exact(plain.images([2, 3]), ref_roi_images(plain, [WINDOW], offsets=[-1, 0, 1])[[2, 3]])


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"channels": {"recipe": "hu_windows", "windows": WINDOWS[:2]}}, r"channels\.windows to hold 3 .*got 2"),
        ({"channels": {"recipe": "hu_windows", "windows": [[0, 1], [0, 1], [5, 1]]}}, "lo < hi"),
        ({"channels": {"recipe": "hu_windows"}}, r"needs \['windows'\], e\.g\."),
        ({"channels": {"recipe": "adjacent_slices", "offsets": [0, 1]}}, r"channels\.offsets to hold 3 integers"),
        ({"channels": {"recipe": "adjacent_slices", "offsets": [1, 2, 3]}}, "include 0"),
        ({"channels": {"recipe": "adjacent_slices", "offsets": [-1, 0, 0.5]}}, "integer channels.offsets"),
        ({"channels": {"recipe": "stacked"}}, "unknown channels recipe 'stacked'"),
        ({"channels": {"recipe": "copies", "windows": WINDOWS}}, r"unknown channels keys \['windows'\]"),
        ({"channels": {"recipe": "adjacent_slices", "offsets": [-1, 0, 1], "step": 2}}, "unknown channels keys"),
        ({"channels": [1, 2, 3]}, "expected channels as one of"),
        ({"mean": [0.5, 0.5]}, r"mean as one number or 3 numbers .*got 2"),
        ({"std": [1.0, 1.0, 1.0, 1.0]}, r"std as one number or 3 numbers"),
        ({"mean": 0.5, "std": [0.2, 0.0, 0.2]}, "std > 0"),
        ({"std": -1}, "std > 0"),
        ({"mean": "imagenet"}, "finite number for mean"),
    ],
)
def test_validation_errors(extra, match):
    with pytest.raises(CheckpointError, match=match) as info:
        validate_preprocessing({"image_size": [16, 16], "in_chans": 3, **extra}, (3, 16, 16))
    assert "\n" not in str(info.value)


def test_hu_windows_does_not_need_hu_window_and_effective_dict_is_json():
    pre = validate_preprocessing(
        {"channels": {"recipe": "hu_windows", "windows": WINDOWS}, "mean": 0.5, "hu_window": [-1000, 400]},
        (3, 16, 16),
    )
    assert pre["channels"] == {"recipe": "hu_windows", "windows": WINDOWS}
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [1.0] * 3  # the missing one is the identity
    assert json.loads(json.dumps(pre)) == pre
    assert validate_preprocessing(pre, (3, 16, 16)) == pre  # the effective dict validates to itself
    adjacent = validate_preprocessing({"channels": {"recipe": "adjacent_slices", "offsets": [0, -1, 2]}}, (3, 8, 8))
    assert adjacent["channels"] == {"recipe": "adjacent_slices", "offsets": [0, -1, 2]}
    assert adjacent["mean"] is None and adjacent["std"] is None
    assert validate_preprocessing({"channels": "copies"}, (1, 8, 8))["channels"] == {"recipe": "copies"}


def test_defaults_used():
    given = {"image_size": [16, 16], "in_chans": 3, "hu_window": [-1000, 400]}
    assert defaults_used(given) == ["mode", "scale_to", "crop_body", "body_threshold_hu", "channels", "mean", "std"]
    everything = {
        "mode": "slice",
        "image_size": [16, 16],
        "in_chans": 3,
        "hu_window": [-1000, 400],
        "scale_to": [0, 1],
        "crop_body": False,
        "body_threshold_hu": -500,
        "roi": {"size_mm": 32, "spacing_mm": 1, "views": ["axial"]},
        "channels": {"recipe": "hu_windows", "windows": WINDOWS},
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    assert set(everything) == set(DEFAULT_PREPROCESSING)
    assert defaults_used(everything) == []
    # null is a choice (no normalisation); a missing key is a default; roi.* count for an ROI model only
    assert defaults_used({**everything, "std": None, "roi": {"views": ["axial"]}}) == []
    roi_model = {k: v for k, v in everything.items() if k != "std"} | {"mode": "roi", "roi": {"views": ["axial"]}}
    assert defaults_used(roi_model) == ["roi.size_mm", "roi.spacing_mm", "std"]
    assert defaults_used(None)[:2] == ["mode", "hu_window"]


# --- end to end -----------------------------------------------------------------------------------


def test_three_window_model_explains_end_to_end():
    """A 3-channel tiny ViT with a 3-window recipe and ImageNet mean / std: explain_volume's predictions
    are the model's outputs on the reference images."""
    from medvit_explain.pipeline import explain_volume
    from medvit_explain.prediction import output_row

    volume = make_volume(shape=(16, 16, 5), seed=7)
    config = tiny_config(image_size=(16, 16), patch=8)
    config["architecture"]["kwargs"]["in_chans"] = 3
    config["preprocessing"].update(
        in_chans=3, channels={"recipe": "hu_windows", "windows": WINDOWS}, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert model.preprocessing["channels"]["windows"] == WINDOWS
    result = explain_volume(model, volume, methods=["cdam"], targets=["malignancy"], batch_size=2)
    reference = ref_slice_images(volume, CANONICAL["identity"][1], range(5), WINDOWS, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        raw = model(torch.from_numpy(reference)).numpy()
    rows = result.predictions.rows
    assert [row["slice"] for row in rows] == list(range(5))
    for row, out in zip(rows, raw, strict=True):
        for column, value in output_row(model.task_spec, out).items():
            assert row[column] == pytest.approx(value, abs=1e-5), column


# --- the fill of removed pixels (faithfulness) ----------------------------------------------------


def test_channel_fill_is_each_channels_window_centre():
    base = {"image_size": [8, 8], "in_chans": 3, "scale_to": [-2.0, 2.0]}
    assert torch.equal(channel_fill(base), torch.zeros(3))
    assert window_mean(base) == 0.0
    assert window_mean({"image_size": [8, 8], "in_chans": 1}) == 0.5
    normalised = {**base, "scale_to": [0.0, 1.0], "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    want = [(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(channel_fill(normalised, torch.float64).numpy(), want, rtol=0, atol=1e-15)
    assert channel_fill(normalised).dtype == torch.float32
    with pytest.raises(ValueError, match="channel_fill"):
        window_mean(normalised)
    assert window_mean({**base, "mean": 1.0, "std": 4.0}) == -0.25  # the same in every channel: one number

    # a volume at the windows' common centre gives exactly the fill in every channel and pixel
    centred = [[-1000.0, 400.0], [-500.0, -100.0], [-400.0, -200.0]]  # all centred on -300 HU
    volume = Volume(np.full((8, 8, 3), -300.0, np.float32), (0, 0, 0), (1.0, 1.0, 1.0), np.eye(3))
    pre = validate_preprocessing(
        {"channels": {"recipe": "hu_windows", "windows": centred}, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        (3, 8, 8),
    )
    images = SliceInputs(volume, pre).images([0, 2])
    fill = channel_fill(pre)
    torch.testing.assert_close(images, fill[None, :, None, None].expand_as(images), rtol=0, atol=1e-6)


def test_per_channel_fill_reaches_removed_pixels():
    """What evaluate passes when the channels' fills differ ([C, 1, 1]): every removed pixel of channel c
    holds fill[c] in the images the model scores."""
    from medvit_explain.metrics import perturbation_curves

    pre = {"image_size": [4, 4], "in_chans": 3, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    fill = channel_fill(pre)[:, None, None]
    images = torch.rand(2, 3, 4, 4)
    maps = torch.rand(2, 1, 4, 4)
    seen = []

    def forward(batch):
        seen.append(batch)
        return batch.mean((1, 2, 3))[:, None]

    perturbation_curves(forward, images, maps, steps=3, fill=fill)
    batch = torch.cat(seen).reshape(2, -1, 3, 4, 4)
    assert torch.equal(batch[:, 1], fill.expand(2, 3, 4, 4))  # the fully removed image
    removed = batch[:, 2:] != images[:, None]
    assert torch.equal(batch[:, 2:][removed], fill.expand_as(batch[:, 2:])[removed])


def test_the_centre_channel_holds_the_plane_itself():
    """What figures of a model's inputs show: offset 0 of ``adjacent_slices``, else the first channel; on real
    inputs that channel equals a one-channel model's input of the same slice."""
    assert ChannelRecipe("adjacent_slices", offsets=(-2, -1, 0, 1, 2)).centre == 2
    assert ChannelRecipe("adjacent_slices", offsets=(0, 3)).centre == 0
    assert ChannelRecipe("copies").centre == 0
    volume = make_volume(shape=(20, 18, 6), seed=4)
    one = Preprocessing.from_config(validate_preprocessing({"mode": "slice", "image_size": [16, 16]}, (1, 16, 16)))
    adjacent = Preprocessing.from_config(
        validate_preprocessing(
            {"mode": "slice", "image_size": [16, 16], "channels": {"recipe": "adjacent_slices", "offsets": [-1, 0, 2]}},
            (3, 16, 16),
        )
    )
    x = SliceInputs(volume, adjacent).images([3])
    assert torch.equal(x[:, adjacent.channels.centre], SliceInputs(volume, one).images([3])[:, 0])
