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
# SimpleITK's wheel (53 MB) and the working tree (20 MiB) together pass the 64 MiB a call may carry; its
# library compresses to about 28 MB with xz, so it travels as a tarball that gpu_check.sh unpacks.
if ls .whl/simpleitk-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  python3 -m zipfile -e .whl/simpleitk-*.whl "$tmp"
  (cd "$tmp" && tar cf - SimpleITK simpleitk-*.dist-info) | xz -9 -T0 > .whl/simpleitk.tar.xz
  rm -rf "$tmp" .whl/simpleitk-*.whl
fi
du -sh .whl
