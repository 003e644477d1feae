#!/usr/bin/env bash
# SGD vs AdaBatch vs DiveBatch on the full CIFAR-10 (ResNet-20, GroupNorm) on one GPU, timed the
# same way for every method (instrumented epochs included). Run from the repo root on a machine
# with jax[cuda] and flax, with the bundle made by `cifar10_jpeg_bundle.py pack`:
#   bash benchmarks/gpu_cifar10_policies.sh .bundle/cifar10_jpeg.npz OUT_DIR [EPOCHS]
set -euo pipefail
bundle=$1; out=$2; epochs=${3:-30}
python3 benchmarks/cifar10_jpeg_bundle.py unpack "$bundle" /tmp/cifar10.npz
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/machine.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$out/machine.txt"
# delta from docs/choosing_delta.md: n = 50,000, diversity ~2 at the first resize, target ~512.
python3 -m divebatch_jax.train --dataset npz:/tmp/cifar10.npz --model resnet20 \
  --compare sgd,adabatch,divebatch --epochs "$epochs" --batch-size 128 --max-batch-size 2048 \
  --lr 0.1 --schedule cosine --momentum 0.9 --weight-decay 5e-4 --resize-every 5 --growth-every 5 \
  --delta 0.005 --checkpoint-every 1000 --no-progress --out /tmp/gpu_runs
cp /tmp/gpu_runs/results.txt /tmp/gpu_runs/results.json /tmp/gpu_runs/comparison.png "$out/"
for m in sgd adabatch divebatch; do cp "/tmp/gpu_runs/$m/metrics.jsonl" "$out/${m}_metrics.jsonl"; done
