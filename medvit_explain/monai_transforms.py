"""The model-input chain as MONAI transforms, to drop into a user's own ``Compose``.

::

    from monai.transforms import Compose, Invertd, SaveImaged
    from medvit_explain.monai_transforms import ExplainViTd, model_chain

    pre = Compose(model_chain(model.preprocessing))        # LoadCTd → OrientLPSd → CropBodyd → HUWindowd
    explain = ExplainViTd("image", model, ["cdam"])          #   → ResizeToModeld → InputChannelsd → NormalizeChannelsd
    data = explain(pre({"image": "scan.nii.gz"}))           # adds "cdam_malignancy", ... (model space)
    post = Compose([Invertd(explain.map_keys, pre, orig_keys="image")]
                   + [SaveImaged(k, output_dir="out", output_postfix=k, separate_folder=False, resample=False,
                                 output_dtype=np.float32) for k in explain.map_keys])
    post(data)                                               # out/scan_cdam_malignancy.nii.gz, ...

One implementation: the array transforms here are thin wrappers over the functions
:class:`medvit_explain.transforms.SliceInputs` streams a CT through for ``explain`` (``reoriented_view``,
``body_box``, ``window_channels``, ``resize_planes``, ``pick_channels``, ``normalise_channels``, and the same
functions backwards for the inverse), and :class:`ExplainViTd` runs the pipeline's own method runner; the
dictionary transforms are MONAI's usual few-line wrappers. So a map from this chain equals the ``explain``
overlay (tested to 1e-5 of the map's scale on an oblique anisotropic NIfTI and a DICOM series).

Reading goes through MONAI's ``LoadImaged`` with :class:`CTReader`, which reads with medvit-explain's own
readers (SimpleITK for NIfTI / NRRD / MHA, pydicom for DICOM: series selection, modality checks and the
one-line errors of ``load_volume``), in HU, with the LPS geometry given to MONAI as its RAS ``affine``.

Layout: channel-first ``[C, X, Y, Z]`` MetaTensors; after :class:`OrientLPSd` the axes run to patient
left, posterior and superior, so a Z-slice is an axial image (rows along Y, columns along X). Every
spatial step records what its inverse needs, so MONAI's ``Invertd`` puts a model-space map back on the
source grid. Slice mode only (the ROI mode stays with :func:`medvit_explain.explain_volume`).

Importing this module imports MONAI (about 2 s on top of torch here); ``explain`` and the API do not.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import ImageReader, MetaTensor
from monai.transforms import InvertibleTransform, LoadImaged, MapTransform, Transform

from .errors import MedvitInputError
from .orientation import ornt_from_affine_ras, reoriented_view
from .transforms import (
    Preprocessing,
    body_box,
    normalise_channels,
    pick_channels,
    resize_planes,
    window_channels,
)
from .vocabulary import IMAGE_SUFFIXES

__all__ = [
    "CTReader",
    "CropBody",
    "CropBodyd",
    "ExplainViTd",
    "HUWindowd",
    "InputChannelsd",
    "LoadCTd",
    "NormalizeChannelsd",
    "OrientLPS",
    "OrientLPSd",
    "ResizeToModel",
    "ResizeToModeld",
    "model_chain",
]


# ------------------------------------------------------------------------------------------- reading


class CTReader(ImageReader):
    """A MONAI ``ImageReader`` over :func:`medvit_explain.io.load_volume`: a NIfTI / NRRD / MHA file, a
    DICOM file or a DICOM series folder → HU float32 ``[X, Y, Z]`` with ``affine`` (RAS, MONAI's
    convention), ``original_affine``, ``spatial_shape``, ``space: RAS`` and the study's metadata
    (``format``, ``modality``, ``series_uid``, ...)."""

    def __init__(self, series_uid: str | None = None, allow_modality: bool = False) -> None:
        super().__init__()
        self.series_uid, self.allow_modality = series_uid, allow_modality

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, str) else list(filename)
        return all(str(n).lower().endswith((*IMAGE_SUFFIXES, ".dcm")) or "." not in str(n) for n in names)

    def read(self, data: Sequence[str] | str, **kwargs: Any):
        from .io import load_volume

        paths = [data] if isinstance(data, str) else list(data)
        if len(paths) != 1:
            raise MedvitInputError(f"expected one CT (a file or a DICOM series folder), got {len(paths)} paths")
        return load_volume(str(paths[0]), series_uid=self.series_uid, allow_modality=self.allow_modality)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        meta = {k: v for k, v in img.metadata.items() if isinstance(v, (str, int, float, bool))}
        meta.update(
            affine=np.asarray(img.affine_ras, dtype=np.float64),
            original_affine=np.asarray(img.affine_ras, dtype=np.float64),
            spatial_shape=np.asarray(img.shape),
            space="RAS",
            original_channel_dim=float("nan"),
        )
        return np.asarray(img.array, dtype=np.float32), meta


class LoadCTd(LoadImaged):
    """``LoadImaged`` with :class:`CTReader`, channel first: ``{key: path}`` → ``{key: MetaTensor [1, X, Y, Z]}``.

    Only :class:`CTReader` reads (MONAI would otherwise try its other readers when one fails, and read
    an MR series the CT reader refused); its error is what a failed load raises."""

    def __init__(self, keys, series_uid: str | None = None, allow_modality: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("image_only", True)
        kwargs.setdefault("ensure_channel_first", True)
        self.ct_reader = CTReader(series_uid, allow_modality)
        super().__init__(keys, reader=self.ct_reader, **kwargs)

    def __call__(self, data, reader: ImageReader | None = None):
        return super().__call__(data, reader or self.ct_reader)


# --------------------------------------------------------------------------------- spatial (invertible)


def _meta_like(array: np.ndarray | torch.Tensor, like: MetaTensor, affine) -> MetaTensor:
    out = MetaTensor(torch.as_tensor(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array))
    out.copy_meta_from(like)
    out.affine = torch.as_tensor(np.asarray(affine), dtype=torch.float64)
    return out


def _channels_last(x: torch.Tensor) -> np.ndarray:
    return np.moveaxis(np.asarray(x.detach().cpu()), 0, -1)  # [C, X, Y, Z] → [X, Y, Z, C]


class OrientLPS(InvertibleTransform, Transform):
    """``[C, X, Y, Z]`` → axes to patient left, posterior, superior (the reorientation ``explain`` uses:
    axis permutation and flips, no resampling; :func:`medvit_explain.transforms.reoriented_view`)."""

    def __call__(self, img: MetaTensor) -> MetaTensor:
        import nibabel.orientations as nio

        affine = np.asarray(img.affine, dtype=np.float64)
        ornt = ornt_from_affine_ras(affine)
        shape = tuple(int(s) for s in img.shape[1:])
        out = np.moveaxis(reoriented_view(_channels_last(img), ornt), -1, 0)
        out = _meta_like(out, img, affine @ nio.inv_ornt_aff(ornt, shape))
        return self.push_transform(out, extra_info={"ornt": ornt.tolist(), "affine": affine.tolist()}, orig_size=shape)

    def inverse(self, data: MetaTensor) -> MetaTensor:
        record = self.pop_transform(data)
        ornt, shape = np.asarray(record["extra_info"]["ornt"]), tuple(record["orig_size"])
        out = np.zeros((*shape, data.shape[0]), np.float32)
        reoriented_view(out, ornt)[...] = _channels_last(data)  # writing the canonical view fills the source grid
        return _meta_like(np.moveaxis(out, -1, 0), data, record["extra_info"]["affine"])


class CropBody(InvertibleTransform, Transform):
    """``[C, X, Y, Z]`` (canonical axes) → the body's bounding box in X and Y, grown to the model's
    aspect (:func:`medvit_explain.transforms.body_box` on channel 0); the inverse pads with zeros. With
    ``enabled=False`` the whole slice is kept (and still recorded, so the chain inverts the same way)."""

    def __init__(self, threshold_hu: float = -500.0, aspect: float = 1.0, enabled: bool = True) -> None:
        self.threshold_hu, self.aspect, self.enabled = threshold_hu, aspect, enabled

    def __call__(self, img: MetaTensor) -> MetaTensor:
        nx, ny = int(img.shape[1]), int(img.shape[2])
        x0, x1, y0, y1 = (0, nx, 0, ny)
        if self.enabled:
            x0, x1, y0, y1 = body_box(np.asarray(img[0].detach().cpu()), self.threshold_hu, aspect=self.aspect)
        affine = np.asarray(img.affine, dtype=np.float64)
        shift = np.eye(4)
        shift[:3, 3] = [x0, y0, 0]
        out = _meta_like(img[:, x0:x1, y0:y1], img, affine @ shift)
        info = {"box": [x0, x1, y0, y1], "affine": affine.tolist()}
        return self.push_transform(out, extra_info=info, orig_size=tuple(int(s) for s in img.shape[1:]))

    def inverse(self, data: MetaTensor) -> MetaTensor:
        record = self.pop_transform(data)
        x0, x1, y0, y1 = record["extra_info"]["box"]
        out = torch.zeros((data.shape[0], *record["orig_size"]), dtype=data.dtype)
        out[:, x0:x1, y0:y1] = data.as_tensor().cpu()
        return _meta_like(out, data, record["extra_info"]["affine"])


class ResizeToModel(InvertibleTransform, Transform):
    """``[C, X, Y, Z]`` → ``[C, W, H, Z]``: every axial slice bilinear (``align_corners=False``, no
    anti-aliasing) to the model's ``image_size`` (H rows along Y, W columns along X), as ``explain``
    resizes; the inverse resizes back the same way."""

    def __init__(self, image_size: Sequence[int]) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))

    @staticmethod
    def _resize(img: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        c, nx, ny, nz = img.shape
        planes = img.permute(0, 3, 2, 1).reshape(c * nz, ny, nx).float()  # [C·Z, rows (Y), cols (X)]
        return resize_planes(planes, (rows, cols)).reshape(c, nz, rows, cols).permute(0, 3, 2, 1)

    def __call__(self, img: MetaTensor) -> MetaTensor:
        _, nx, ny, _ = img.shape
        h, w = self.image_size
        affine = np.asarray(img.affine, dtype=np.float64)
        scale = np.eye(4)  # output voxel o sits at input (o + 0.5) · n_in / n_out − 0.5
        scale[0, 0], scale[1, 1] = nx / w, ny / h
        scale[0, 3], scale[1, 3] = 0.5 * nx / w - 0.5, 0.5 * ny / h - 0.5
        out = _meta_like(self._resize(img.as_tensor(), h, w).contiguous(), img, affine @ scale)
        return self.push_transform(
            out, extra_info={"affine": affine.tolist()}, orig_size=tuple(int(s) for s in img.shape[1:])
        )

    def inverse(self, data: MetaTensor) -> MetaTensor:
        record = self.pop_transform(data)
        nx, ny, _ = record["orig_size"]
        out = self._resize(data.as_tensor(), int(ny), int(nx)).contiguous()
        return _meta_like(out, data, record["extra_info"]["affine"])


# ------------------------------------------------------------------------------ dictionary wrappers


class _ArrayWrapperd(MapTransform, InvertibleTransform):
    """A dictionary transform that applies ``self.array`` to each key and inverts it the same way."""

    array: Transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.array(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.array.inverse(d[key]) if isinstance(self.array, InvertibleTransform) else d[key]
        return d


class OrientLPSd(_ArrayWrapperd):
    """Dictionary :class:`OrientLPS`."""

    def __init__(self, keys, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.array = OrientLPS()


class CropBodyd(_ArrayWrapperd):
    """Dictionary :class:`CropBody`."""

    def __init__(self, keys, threshold_hu=-500.0, aspect=1.0, enabled=True, allow_missing_keys=False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.array = CropBody(threshold_hu, aspect, enabled)


class ResizeToModeld(_ArrayWrapperd):
    """Dictionary :class:`ResizeToModel`."""

    def __init__(self, keys, image_size: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.array = ResizeToModel(image_size)


class _Intensity(Transform):
    """A per-voxel step of the channel recipe on ``[C, X, Y, Z]`` (no inverse: maps have their own
    channels), run on the ``[Z, C, Y, X]`` planes the way ``explain`` runs it."""

    def __init__(self, config: Preprocessing, step) -> None:
        self.config, self.step = config, step

    def __call__(self, img: MetaTensor) -> MetaTensor:
        planes = img.as_tensor().permute(3, 0, 2, 1).float()  # [Z, C, Y, X]
        out = self.step(self.config, planes).permute(1, 3, 2, 0).contiguous()  # back to [C', X, Y, Z]
        return _meta_like(out, img, np.asarray(img.affine))


class HUWindowd(_ArrayWrapperd):
    """HU window(s) scaled onto ``scale_to`` (MONAI's ``ScaleIntensityRange(clip=True)``): one channel, or
    one per window of a ``hu_windows`` recipe."""

    def __init__(self, keys, preprocessing: Mapping[str, Any] | Preprocessing, allow_missing_keys=False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.array = _Intensity(Preprocessing.from_config(preprocessing), lambda cfg, x: window_channels(cfg, x[:, 0]))


class InputChannelsd(_ArrayWrapperd):
    """The model's ``in_chans`` channels by the recipe: copies of the slice, or the slices k + offsets
    (``adjacent_slices``, clamped at the ends); a ``hu_windows`` input already has them."""

    def __init__(self, keys, preprocessing: Mapping[str, Any] | Preprocessing, allow_missing_keys=False) -> None:
        super().__init__(keys, allow_missing_keys)
        config = Preprocessing.from_config(preprocessing)

        def channels(cfg: Preprocessing, planes: torch.Tensor) -> torch.Tensor:
            if cfg.channels.recipe == "hu_windows":
                return planes
            n = len(planes)
            index = None
            if cfg.channels.recipe == "adjacent_slices":
                index = torch.from_numpy(np.clip(np.arange(n)[:, None] + np.asarray(cfg.channels.offsets), 0, n - 1))
            return pick_channels(cfg, planes[:, 0], index)

        self.array = _Intensity(config, channels)


class NormalizeChannelsd(_ArrayWrapperd):
    """Per-channel ``(x − mean[c]) / std[c]`` (nothing when the preprocessing has no ``mean`` / ``std``)."""

    def __init__(self, keys, preprocessing: Mapping[str, Any] | Preprocessing, allow_missing_keys=False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.array = _Intensity(Preprocessing.from_config(preprocessing), normalise_channels)


def model_chain(
    preprocessing: Mapping[str, Any] | Preprocessing,
    keys: str | Sequence[str] = "image",
    series_uid: str | None = None,
    allow_modality: bool = False,
    load: bool = True,
) -> list[Transform]:
    """The transforms from a CT path (``load=True``) to model inputs ``[C, W, H, Z]``, from a model's
    ``preprocessing`` (``model.preprocessing``): the same steps, settings and arithmetic as ``explain``."""
    config = Preprocessing.from_config(preprocessing)
    if config.mode != "slice":
        raise MedvitInputError(
            "the MONAI chain covers slice-mode models; explain an ROI model with explain_volume(..., roi_centers=...)"
        )
    aspect = config.image_size[0] / config.image_size[1]
    chain: list[Transform] = [LoadCTd(keys, series_uid, allow_modality)] if load else []
    return chain + [
        OrientLPSd(keys),
        CropBodyd(keys, config.body_threshold_hu, aspect, config.crop_body),
        HUWindowd(keys, config),
        ResizeToModeld(keys, config.image_size),
        InputChannelsd(keys, config),
        NormalizeChannelsd(keys, config),
    ]


# ------------------------------------------------------------------------------------------- explain


class ExplainViTd(MapTransform):
    """Model inputs ``[C, W, H, Z]`` (the end of :func:`model_chain`) → one map per method and target,
    ``"<method>_<target>"``: ``[1, W, H, Z]`` MetaTensors in the model-input space (the token-grid map
    upsampled bilinearly to the input size, as ``explain`` does before inverting), carrying the image's
    metadata and transform history, so ``Invertd(map_keys, chain, orig_keys=key)`` puts them on the source
    grid. Also ``"<key>_scores"``: the raw outputs ``[Z, K]`` (one row per slice)."""

    def __init__(
        self,
        keys: str = "image",
        model=None,
        methods: Sequence[str] = ("cdam", "agcam"),
        targets: Sequence[str | int] | None = None,
        batch_size: int = 16,
        precision: str = "fp32",
        method_options: dict[str, dict[str, Any]] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if model is None:
            raise MedvitInputError("ExplainViTd needs a model (medvit_explain.load_model(...))")
        from .pipeline import MethodRunner

        self.model, self.batch_size = model, int(batch_size)
        self.runner = MethodRunner(model, list(methods), model.task_spec.resolve(targets), precision, method_options)
        self.targets = [model.targets[i] for i in self.runner.target_idx]
        self.map_keys = [f"{m}_{t}" for m in self.runner.methods for t in self.targets]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            images = img.as_tensor().permute(3, 0, 2, 1).float()  # [Z, C, H, W]
            device = next(self.model.parameters()).device
            raws, kept = [], {m: [] for m in self.runner.methods}
            for start in range(0, len(images), self.batch_size):
                raw, maps = self.runner(images[start : start + self.batch_size].to(device))
                raws.append(raw)
                for m in self.runner.methods:
                    kept[m].append(maps[m].detach().float())
            h, w = images.shape[-2:]
            for m in self.runner.methods:
                maps = torch.cat(kept[m])  # [Z, T, gh, gw]
                for t, target in enumerate(self.targets):
                    plane = resize_planes(maps[:, t], (h, w)).cpu()  # [Z, H, W]
                    d[f"{m}_{target}"] = _meta_like(plane.permute(2, 1, 0)[None].contiguous(), img, img.affine)
            d[f"{key}_scores"] = torch.from_numpy(np.concatenate(raws))
        return d
