"""Reading CT volumes and writing results on their grid."""

from .reader import find_dicom_series, load_volume
from .writer import atomic_path, write_volume

__all__ = ["atomic_path", "find_dicom_series", "load_volume", "write_volume"]
