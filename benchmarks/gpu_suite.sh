#!/usr/bin/env bash
# Every GPU measurement this project keeps, sized for one H100 in under 8 minutes.
# Run from the repository root on a machine with jax[cuda] and flax (no install needed:
# PYTHONPATH=.); each stage writes its markdown result into OUT_DIR (default
# benchmarks/results), named *_gpu.md, with the command and the device in its header.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [STAGE ...]
#
# Stages (default: all, in this order):
#   layers        benchmarks/layer_forms.py   per-example norm forms of each conv shape
#   device-batch  benchmarks/device_batch.py  examples/s by device batch; loop vs unrolled
#   stats         benchmarks/stats_overhead.py statistics step / plain step, time and memory
#   pipeline      benchmarks/pipeline.py      host pipeline vs step throughput
set -euo pipefail
out=${1:-benchmarks/results}
shift || true
stages=${*:-layers device-batch stats pipeline}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  git log -1 --format='code %h %s' 2>/dev/null || true
} | tee "$out/gpu_machine.txt"

for stage in $stages; do
  start=$(date +%s)
  case $stage in
    layers)
      python3 benchmarks/layer_forms.py --batches 128 1024 --out "$out/layer_forms_gpu.md" ;;
    device-batch)
      python3 benchmarks/device_batch.py --models cnn resnet20 --batches 32 64 128 256 512 1024 2048 \
        --micro 128 256 --k-max 4 --seconds 0.5 --out "$out/device_batch_gpu.md" ;;
    stats)
      python3 benchmarks/stats_overhead.py --models resnet20gn --batches 128 512 \
        --variants plain exact ghost microbatch --out "$out/stats_overhead_gpu.md" ;;
    pipeline)
      python3 benchmarks/pipeline.py --data random --batch-sizes 128,512,2048 --results-dir "$out" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
  echo "stage $stage: $(( $(date +%s) - start )) s"
done
