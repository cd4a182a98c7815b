#!/usr/bin/env bash
# One prepared GPU call (issue 23): the four GPU recipes (gan2d, gan3d, ldm2d, ldm3d) measured beside the
# memory model and MONAI's plain loop, JSON lines under $OUT, within 10 minutes on one H100 / H200.
#
#   $OUT/env.txt              GPU, driver, torch, MONAI
#   $OUT/memory_model.jsonl   per recipe stage: the memory model's estimate beside the measured allocator peak
#                             and seconds per step (benchmarks/memory_model.py --device cuda; the ldm diffusion
#                             stage needs a trained autoencoder and is timed by train_ldm.py instead)
#   $OUT/switches.jsonl       the same rows with training.channels_last (gan3d, ldm3d) and training.compile (gan2d)
#   $OUT/train_ldm.jsonl      stage-2 UNet and stage-1 autoencoder steps, plain fp32 vs ours (bf16, fused
#                             attention, fused Adam) vs + torch.compile, with peak memory
#   $OUT/train_gan.jsonl      gan2d and gan3d steps (benchmarks/train_gan.py)
#   $OUT/sample.jsonl         sampling throughput: samplers x batch, eager vs CUDA graph, tiled decode
#   $OUT/peer.jsonl           ../shared/peers/monai_baseline.py: MONAI's tutorial networks, plain loop
#   $OUT/device.log           everything printed, errors included
#
# Prepare here, once per session (the device has no registry, no monai and no pydantic; ../shared does not
# travel, so the peer goes in the carried folder too):
#   echo /.device/ >> "$(git rev-parse --git-path info/exclude)"; mkdir -p .device/whl
#   cp ../shared/peers/monai_baseline.py .device/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .device/whl monai==1.6.1 nibabel==5.4.2 pydantic==2.13.4 pydantic-core==2.46.4 \
#     annotated-types==0.7.0 typing-inspection==0.4.2
# Then one device call:  run(command="bash benchmarks/device.sh", carry=[".device"], timeout_s=600)
# Each part has its own time limit (the sum is 540 s); a part that runs out leaves what it printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/device.log") 2>&1

# 0. carried wheels, the repo on the path, the peer script
if compgen -G ".device/whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
PEER=""
for p in .device/monai_baseline.py shared/peers/monai_baseline.py ../shared/peers/monai_baseline.py; do
  [ -f "$p" ] && PEER="$p" && break
done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)"
  echo "peer: ${PEER:-not found}"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

part() {  # part SECONDS NAME COMMAND...: run one measurement into $OUT/NAME.jsonl (JSON lines only)
  local secs=$1 name=$2; shift 2
  echo "== $name (at most ${secs} s)"
  timeout "$secs" "$@" | tee "$OUT/$name.raw" || echo "{\"what\": \"$name\", \"error\": \"exit $? (timeout 124)\"}" >> "$OUT/$name.raw"
  grep '^{' "$OUT/$name.raw" > "$OUT/$name.jsonl" || true
  rm -f "$OUT/$name.raw"
}

# 1. peak memory and step time of each GPU recipe stage, the memory model's estimate beside it
part 140 memory_model python3 benchmarks/memory_model.py --device cuda --recipes gan2d,gan3d,ldm2d,ldm3d --timeout 110
# 2. the switches that stay off until measured: channels-last (3D) and torch.compile (gan2d), same rows
part 100 switches bash -c 'python3 benchmarks/memory_model.py --device cuda --recipes gan3d,ldm3d --timeout 50 \
  --set training.channels_last=true; python3 benchmarks/memory_model.py --device cuda --recipes gan2d --timeout 55 \
  --set training.compile=true'
# 3. training steps: our stage-2 UNet and stage-1 autoencoder (plain, ours, + compile), the GAN recipes
part 100 train_ldm python3 benchmarks/train_ldm.py --device cuda --compile --steps 10 --warmup 3
part 50 train_gan python3 benchmarks/train_gan.py --recipe configs/gan2d.yaml --recipe configs/gan3d.yaml --steps 10
# 4. sampling throughput (no 1000-step DDPM: the peer times that one)
part 75 sample python3 benchmarks/sample.py --device cuda --skip-ddpm
# 5. the peer, in the same call
if [ -n "$PEER" ]; then
  part 75 peer python3 "$PEER"
else
  echo '{"what": "peer", "error": "monai_baseline.py not carried (see the header)"}' > "$OUT/peer.jsonl"
fi
echo "== done"; ls -l "$OUT"
