#!/usr/bin/env bash
# Download (here, where pip reaches the package index) the wheels the device machine lacks into .whl/
# (ignored by git; carried with `carry: [".whl"]`). The device image has torch, timm, click, numpy,
# scipy, matplotlib, pillow, safetensors, pyyaml and tqdm already; Python there is 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl monai pydicom nibabel SimpleITK highdicom pyjpegls captum zlib-ng
du -sh .whl
