#!/usr/bin/env bash
# One prepared GPU call (see docs/maisi.md): peak memory and seconds of MAISI CT generation with the
# published rflow architecture and random weights at 256x256x128 and 512x512x256, beside MAISI's figures.
# Writes $OUT/maisi_device.json (and the log); about 5 minutes on one H100 (30 rflow steps per size).
#   run: bash benchmarks/maisi_device.sh        (OUT defaults to ./maisi_out)
set -euo pipefail
OUT="${OUT:-./maisi_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1 || true
python -c "import monai, torch; print('monai', monai.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  | tee "$OUT/versions.txt"
PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" timeout 540 \
  python benchmarks/maisi_device.py --out "$OUT/maisi_device.json" --steps "${STEPS:-30}" "$@" 2>&1 | tee "$OUT/maisi_device.log"
