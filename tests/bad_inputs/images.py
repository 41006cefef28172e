"""The image corpus: broken, hostile or unsupported inputs, one builder per case.

Each builder writes small files under the folder it is given and returns a :class:`BadImage`: the path to
pass to the CLI and a regular expression its one ``error:`` line must match. ``CASES`` maps each case's
name to its builder, in the order written here.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

from medvit_explain.io.dicom_series import write_ct_file, write_ct_series

from .files import dicom_series, nifti, tiny_ct

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ESCAPE = "\x1b[31mRED\x1b[0m"  # recolours a terminal
TITLE = "\x1b]0;title\x07"  # sets a terminal's title


@dataclass(frozen=True)
class BadImage:
    path: Path
    match: str  # regex the error line must match


CASES: dict[str, Callable[[Path], BadImage]] = {}


def case(build: Callable[[Path], BadImage]) -> Callable[[Path], BadImage]:
    """Register ``build`` in ``CASES`` under its function name."""
    CASES[build.__name__] = build
    return build


# ---------------------------------------------------------------------------------------- helpers


def rewrite(files: list[Path], change: Callable[[pydicom.Dataset, int], None]) -> None:
    """Apply ``change(dataset, k)`` to every DICOM file (slice ``k``) and save it in place."""
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        change(ds, k)
        ds.save_as(path)


def nifti_of(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """``data`` saved as NIfTI at ``path`` with nibabel (any dtype nibabel can store)."""
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def tilted_series(folder: Path, tilt_deg: float = 15.0, volume=None) -> list[Path]:
    """An axial CT series whose slice positions also step along y by ``tan(tilt) * dz`` (a gantry tilt):
    ImageOrientationPatient stays axial, GantryDetectorTilt says the angle. Pixel ``(i, j)`` of slice ``k``
    lies at ``origin + (i * dx, j * dy + k * dz * tan(tilt), k * dz)``."""
    volume = volume or tiny_ct()
    files = dicom_series(folder, volume)
    shift = np.tan(np.radians(tilt_deg)) * volume.spacing[2]

    def tilt(ds, k):
        position = [float(v) for v in ds.ImagePositionPatient]
        position[1] += k * shift
        ds.ImagePositionPatient = [f"{v:.10g}" for v in position]
        ds.GantryDetectorTilt = f"{tilt_deg:g}"

    rewrite(files, tilt)
    return files


def _mhd(folder: Path, data_file: str, name: str = "ct.mhd", tail: str = "") -> Path:
    """A MetaImage header for a 4 × 4 × 2 uchar volume whose voxels live in ``data_file``."""
    folder.mkdir(parents=True, exist_ok=True)
    header = folder / name
    header.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 2\nElementType = MET_UCHAR\nElementSpacing = 1 1 1\n"
        f"ElementDataFile = {data_file}\n{tail}"
    )
    return header


def _nhdr(folder: Path, data_file: str, name: str = "ct.nhdr", key: str = "data file") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = folder / name
    header.write_text(
        f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 2\nspacings: 1 1 1\nencoding: raw\n{key}: {data_file}\n"
    )
    return header


def _raw(path: Path, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(size)))
    return path


def _negative_pixdim(path: Path, form: str) -> Path:
    """A NIfTI whose raw pixdim[2] is negative, with only a qform or only an sform."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    image = nib.Nifti1Image(np.zeros((6, 6, 4), np.int16), affine)
    image.set_qform(affine if form == "qform" else None, code=1 if form == "qform" else 0)
    image.set_sform(affine if form == "sform" else None, code=1 if form == "sform" else 0)
    plain = path.with_name(path.name.removesuffix(".gz"))
    nib.save(image, str(plain))
    raw = bytearray(plain.read_bytes())
    raw[80:92] = np.asarray([2.0, -2.0, 3.0], "<f4").tobytes()  # pixdim[1:4]; nibabel refuses to write it
    if path.name.endswith(".gz"):
        plain.unlink()
        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(bytes(raw))
    return path


def _secondary_capture(ds, _k) -> None:
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE


def jpeg_ls_available() -> bool:
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEGLSLossless

    return bool(get_encoder(JPEGLSLossless).is_available)


# ---------------------------------------------------------------------------------------- paths and formats


@case
def nonexistent(tmp: Path) -> BadImage:
    return BadImage(tmp / "does_not_exist.nii.gz", r"input not found")


@case
def name_with_escapes(tmp: Path) -> BadImage:
    return BadImage(tmp / f"{TITLE}{ESCAPE}.nii.gz", r"input not found")


@case
def empty_file(tmp: Path) -> BadImage:
    (tmp / "ct.nii.gz").write_bytes(b"")
    return BadImage(tmp / "ct.nii.gz", r"empty file")


@case
def unknown_format(tmp: Path) -> BadImage:
    (tmp / "notes.txt").write_text("not an image\n")
    return BadImage(tmp / "notes.txt", r"not a readable image")


@case
def folder_without_dicom(tmp: Path) -> BadImage:
    (tmp / "study" / "sub").mkdir(parents=True)
    (tmp / "study" / "readme.txt").write_text("hello\n")
    (tmp / "study" / "sub" / "notes.txt").write_text("hello\n")
    return BadImage(tmp / "study", r"no DICOM series found .*searched 2 files in 2 folders")


@case
def garbage_named_nii(tmp: Path) -> BadImage:
    (tmp / "ct.nii").write_bytes(np.random.default_rng(0).bytes(4096))
    return BadImage(tmp / "ct.nii", r"cannot read .*ct\.nii")


# ---------------------------------------------------------------------------------------- DICOM behind another name


def _dicom_named(tmp: Path, suffix: str, compress: bool = False) -> BadImage:
    one = write_ct_file(tiny_ct(), tmp / "one.dcm", k=2)
    path = tmp / f"scan{suffix}"
    path.write_bytes(gzip.compress(one.read_bytes()) if compress else one.read_bytes())
    one.unlink()
    return BadImage(path, rf"holds DICOM data but is named {suffix.replace('.', '[.]')}; rename it to [.]dcm")


@case
def dicom_named_nii(tmp: Path) -> BadImage:
    return _dicom_named(tmp, ".nii")


@case
def dicom_gzipped_named_nii_gz(tmp: Path) -> BadImage:
    return _dicom_named(tmp, ".nii.gz", compress=True)


@case
def dicom_named_nrrd(tmp: Path) -> BadImage:
    return _dicom_named(tmp, ".nrrd")


@case
def dicom_named_mha(tmp: Path) -> BadImage:
    return _dicom_named(tmp, ".mha")


# ---------------------------------------------------------------------------------------- cut short


@case
def truncated_nii_gz(tmp: Path) -> BadImage:
    path = nifti(tmp)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return BadImage(path, r"gzip stream is truncated")


@case
def nii_cut_short(tmp: Path) -> BadImage:
    path = nifti(tmp, "ct.nii")
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.6)])
    return BadImage(path, r"cut short: .* holds \d+ \(5\d%\)")


@case
def nii_gz_cut_short_inside(tmp: Path) -> BadImage:
    """A sound gzip stream around a NIfTI that was already cut short before it was compressed."""
    plain = nifti(tmp, "plain.nii")
    raw = plain.read_bytes()
    plain.unlink()
    (tmp / "ct.nii.gz").write_bytes(gzip.compress(raw[: int(len(raw) * 0.6)]))
    return BadImage(tmp / "ct.nii.gz", r"cut short")


@case
def mha_cut_short(tmp: Path) -> BadImage:
    """MetaIO prints 'data not read completely' to fd 2 itself; it must arrive in the one error line."""
    path = tmp / "ct.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(path), useCompression=False)
    path.write_bytes(path.read_bytes()[:-50])
    return BadImage(path, r"data not read completely")


@case
def nhdr_raw_cut_short(tmp: Path) -> BadImage:
    header = _nhdr(tmp, "ct.raw")
    _raw(tmp / "ct.raw", size=20)
    return BadImage(header, r"cannot read .*fread got only")


# ---------------------------------------------------------------------------------------- data files elsewhere


@case
def mhd_absolute_data_file(tmp: Path) -> BadImage:
    return BadImage(_mhd(tmp / "hdr", "/etc/passwd"), r"/etc/passwd, outside the header's folder.*move the data")


@case
def mhd_data_file_above(tmp: Path) -> BadImage:
    _raw(tmp / "secret.raw")
    return BadImage(_mhd(tmp / "hdr", "../secret.raw"), r"outside the header's folder \(ElementDataFile: \.\./")


@case
def mhd_data_file_symlink(tmp: Path) -> BadImage:
    _raw(tmp / "secret.raw")
    (tmp / "hdr").mkdir()
    os.symlink(tmp / "secret.raw", tmp / "hdr" / "ct.raw")
    return BadImage(_mhd(tmp / "hdr", "ct.raw"), r"secret\.raw, outside the header's folder")


@case
def mhd_list_data_files(tmp: Path) -> BadImage:
    _raw(tmp / "hdr" / "s0.raw", 16)
    _raw(tmp / "s1.raw", 16)
    return BadImage(_mhd(tmp / "hdr", "LIST", tail="s0.raw\n../s1.raw\n"), r"s1\.raw, outside the header's folder")


@case
def mhd_pattern_data_files(tmp: Path) -> BadImage:
    _raw(tmp / "s1.raw", 16)
    _raw(tmp / "s2.raw", 16)
    return BadImage(_mhd(tmp / "hdr", "../s%d.raw 1 2 1"), r"s1\.raw, outside the header's folder")


@case
def nhdr_data_file_above(tmp: Path) -> BadImage:
    _raw(tmp / "secret.raw")
    return BadImage(_nhdr(tmp / "hdr", "../secret.raw"), r"outside the header's folder \(data file: \.\./")


@case
def nrrd_absolute_datafile(tmp: Path) -> BadImage:
    return BadImage(_nhdr(tmp, "/etc/passwd", name="ct.nrrd", key="datafile"), r"/etc/passwd, outside")


# ---------------------------------------------------------------------------------------- voxel types and values


@case
def nan_voxels(tmp: Path) -> BadImage:
    data = np.zeros((6, 6, 4), np.float32)
    data[1, 2, 3] = np.nan
    return BadImage(nifti_of(tmp / "ct.nii.gz", data), r"1 NaN or infinite voxels")


@case
def complex64_nifti(tmp: Path) -> BadImage:
    data = np.full((6, 6, 4), 40 + 3j, np.complex64)
    return BadImage(nifti_of(tmp / "ct.nii.gz", data), r"complex voxels \(complex64\)")


@case
def complex128_nifti(tmp: Path) -> BadImage:
    data = np.full((6, 6, 4), 40 + 3j, np.complex128)
    return BadImage(nifti_of(tmp / "ct.nii", data), r"complex voxels \(complex128\)")


@case
def rgb_nifti(tmp: Path) -> BadImage:
    data = np.zeros((6, 6, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return BadImage(nifti_of(tmp / "ct.nii.gz", data), r"colour")


@case
def rgb_dicom_series(tmp: Path) -> BadImage:
    files = dicom_series(tmp / "rgb", tiny_ct(shape=(8, 8, 3)))

    def to_rgb(ds, _k):
        grey = (ds.pixel_array // 256).astype(np.uint8)
        ds.PhotometricInterpretation = "RGB"
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.stack([grey] * 3, axis=-1).tobytes()

    rewrite(files, to_rgb)
    return BadImage(tmp / "rgb", r"colour \(RGB, 3 samples per pixel\)")


@case
def four_d_nifti(tmp: Path) -> BadImage:
    return BadImage(nifti_of(tmp / "ct.nii.gz", np.zeros((6, 6, 4, 3), np.int16)), r"4D image .*expected a 3D")


@case
def two_d_image(tmp: Path) -> BadImage:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(tmp / "flat.nii.gz"))
    return BadImage(tmp / "flat.nii.gz", r"2D image .*expected a 3D")


# ---------------------------------------------------------------------------------------- geometry


@case
def negative_pixdim_qform_nii(tmp: Path) -> BadImage:
    return BadImage(_negative_pixdim(tmp / "ct.nii", "qform"), r"invalid voxel spacing \(2\.0, -2\.0, 3\.0\)")


@case
def negative_pixdim_sform_nii_gz(tmp: Path) -> BadImage:
    return BadImage(_negative_pixdim(tmp / "ct.nii.gz", "sform"), r"invalid voxel spacing \(2\.0, -2\.0, 3\.0\)")


@case
def negative_spacing_mha(tmp: Path) -> BadImage:
    path = tmp / "ct.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 6, 6), np.int16)), str(path))
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 -1 1"))
    return BadImage(path, r"invalid voxel spacing")


@case
def missing_slice(tmp: Path) -> BadImage:
    files = dicom_series(tmp / "gap", tiny_ct(shape=(8, 8, 6)))
    files[3].unlink()
    return BadImage(tmp / "gap", r"inconsistent slice spacing")


@case
def tilted_series_with_shifted_slice(tmp: Path) -> BadImage:
    files = tilted_series(tmp / "tilt", volume=tiny_ct(shape=(8, 8, 6)))
    rewrite(
        files[3:4],
        lambda ds, _k: setattr(
            ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:1], "30", ds.ImagePositionPatient[2]]
        ),
    )
    return BadImage(tmp / "tilt", r"tilted DICOM series .*not evenly spaced")


# ---------------------------------------------------------------------------------------- series choice and modality


@case
def several_series(tmp: Path) -> BadImage:
    write_ct_series(tiny_ct(shape=(8, 8, 3)), tmp / "study", uid_seed="a", filename_pattern="A{index:03d}.dcm")
    write_ct_series(tiny_ct(shape=(8, 8, 4)), tmp / "study", uid_seed="b", filename_pattern="B{index:03d}.dcm")
    return BadImage(tmp / "study", r"holds 2 DICOM series; choose one with --series")


@case
def several_series_with_escapes(tmp: Path) -> BadImage:
    """SeriesDescriptions holding terminal escapes are listed, harmless, in the error line."""
    for seed, text in (("a", ESCAPE), ("b", TITLE)):
        volume = tiny_ct(shape=(8, 8, 3))
        write_ct_series(
            volume, tmp / "study", uid_seed=seed, series_description=text, filename_pattern=seed + "{index}.dcm"
        )
    return BadImage(tmp / "study", r"choose one with --series UID: .*' \[31mRED \[0m'")


@case
def series_in_sub_folders_several(tmp: Path) -> BadImage:
    write_ct_series(tiny_ct(shape=(8, 8, 3)), tmp / "pat" / "st" / "s1", uid_seed="a")
    write_ct_series(tiny_ct(shape=(8, 8, 4)), tmp / "pat" / "st" / "s2", uid_seed="b")
    return BadImage(tmp / "pat", r"holds 2 DICOM series")


@case
def mr_series(tmp: Path) -> BadImage:
    files = dicom_series(tmp / "mr")
    rewrite(files, lambda ds, _k: setattr(ds, "Modality", "MR"))
    return BadImage(tmp / "mr", r"is MR, not CT.*pass --allow-modality")


@case
def no_modality_series(tmp: Path) -> BadImage:
    files = dicom_series(tmp / "series")
    rewrite(files, lambda ds, _k: delattr(ds, "Modality"))
    return BadImage(tmp / "series", r"has no Modality attribute.*pass --allow-modality if it is a CT")


@case
def empty_modality_file(tmp: Path) -> BadImage:
    path = write_ct_file(tiny_ct(), tmp / "one.dcm", k=2)
    rewrite([path], lambda ds, _k: setattr(ds, "Modality", ""))
    return BadImage(path, r"has no Modality attribute")


@case
def secondary_capture_without_modality(tmp: Path) -> BadImage:
    """A Secondary Capture with no Modality, JPEG-LS compressed where an encoder (pyjpegls) is installed."""
    path = write_ct_file(tiny_ct(), tmp / "sc.dcm", k=2)

    def change(ds, k):
        _secondary_capture(ds, k)
        del ds.Modality
        if jpeg_ls_available():
            from pydicom.uid import JPEGLSLossless

            ds.compress(JPEGLSLossless)

    rewrite([path], change)
    return BadImage(path, r"has no Modality attribute")


@case
def secondary_capture_series_labelled_ct(tmp: Path) -> BadImage:
    files = dicom_series(tmp / "sc")
    rewrite(files, _secondary_capture)
    return BadImage(tmp / "sc", r"Secondary Capture image \(SOP class 1\.2\.840\.10008\.5\.1\.4\.1\.1\.7\)")


# ---------------------------------------------------------------------------------------- rescale


@case
def rescale_slope_zero(tmp: Path) -> BadImage:
    files = dicom_series(tmp / "series")
    rewrite(files[2:3], lambda ds, _k: setattr(ds, "RescaleSlope", "0"))
    return BadImage(tmp / "series", r"IM00003\.dcm: RescaleSlope is 0: every voxel would be the intercept")


@case
def rescale_slope_nan_file(tmp: Path) -> BadImage:
    path = write_ct_file(tiny_ct(), tmp / "one.dcm")
    with warnings.catch_warnings():  # pydicom warns that "nan" is no valid DS, which is the point
        warnings.simplefilter("ignore")
        rewrite([path], lambda ds, _k: setattr(ds, "RescaleSlope", "nan"))
    return BadImage(path, r"RescaleSlope is nan; expected a finite number")


__all__ = ["CASES", "BadImage", "jpeg_ls_available", "rewrite", "tilted_series"]
