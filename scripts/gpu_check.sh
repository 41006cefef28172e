#!/usr/bin/env bash
# The device check, run on a lent GPU machine from the repository root (after scripts/gpu_wheels.sh here):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# 1. the tests marked gpu; 2. the bench on the GPU (sample model, then ViT-S/16);
# 3. the clinical-size case: 512 x 512 x 300, cdam + agcam, 18 maps written (goal: <= 5 s on one H100);
# 4. the volumetric model: its bench (ratios, memory) and an explain on the sample CT.
# Everything it prints also lands in $OUT/gpu_check.log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && tar xJf .whl/simpleitk.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'timm', timm.__version__)"
echo "== tests marked gpu"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests -o addopts="" || echo "gpu tests failed"
echo "== clinical size, sample model (all targets and one target, fresh processes)"
timeout 110 python3 -m medvit_explain bench --e2e-size 512 512 300 --e2e-only --device cuda --json > "$OUT/clinical_sample.json" \
  && python3 -c "import json,sys; c=json.load(open(sys.argv[1]))['clinical']; print(round(c['seconds'],2),'s', c['stages_s'], round(c['peak_rss_bytes']/2**20),'MiB')" "$OUT/clinical_sample.json"
echo "== clinical size, ViT-S/16 random weights"
timeout 110 python3 -m medvit_explain bench --arch vit_small_patch16_224 --e2e-size 512 512 300 --e2e-only --device cuda --json > "$OUT/clinical_vits.json" \
  && python3 -c "import json,sys; c=json.load(open(sys.argv[1]))['clinical']; print(round(c['seconds'],2),'s', c['stages_s'], round(c['peak_rss_bytes']/2**20),'MiB')" "$OUT/clinical_vits.json"
echo "== method bench on the GPU (sample model)"
timeout 80 python3 -m medvit_explain bench --device cuda --no-memory --repeats 3 || echo "bench failed"
echo "== volumetric model (sample-roi3d) on the GPU: ratios, the 64^3 crop batch and a whole 512 x 512 x 300 CT"
timeout 100 python3 -m medvit_explain bench --model sample-roi3d --device cuda --repeats 3 || echo "3d bench failed"
echo "== volumetric explain on the GPU (sample data, its nodule mask)"
timeout 40 python3 -m medvit_explain explain sample_data/phantom_001.nii.gz --model sample-roi3d \
  --roi-mask sample_data/phantom_001_nodules.nii.gz --out "$OUT/roi3d" --device cuda --no-report || echo "3d explain failed"
