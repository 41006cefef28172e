"""Words every layer shares (standard library only, so the CLI, the viewers and the writers agree).

* ``MAP_DTYPES``: how overlays are stored; ``int16`` (quantised, NIfTI ``scl_slope``) by default,
  ``float32`` for exact values.
* ``IMAGE_SUFFIXES``: the image file suffixes whose removal gives an output stem.
"""

from __future__ import annotations

MAP_DTYPES = ("int16", "float32")
DEFAULT_MAP_DTYPE = "int16"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
