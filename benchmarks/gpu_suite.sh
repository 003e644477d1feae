#!/usr/bin/env bash
# Every GPU measurement this project keeps, sized for one H100 in under 8 minutes.
# Run from the repository root on a machine with jax[cuda] and flax (no install needed:
# PYTHONPATH=.); each stage writes its result into OUT_DIR (default benchmarks/results),
# with the command and the device in its header. A stage that fails or runs past its
# time limit is reported and the next one runs.
#
#   DIVEBATCH_CODE=<commit> bash benchmarks/gpu_suite.sh [OUT_DIR] [STAGE ...]
#
# Stages (default: stats-gpt stats e2e pipeline stats18):
#   stats-gpt     stats_overhead.py: GPT-style transformers (tied head, T = 128, d = 128 / 256,
#                 unrolled and nnx.scan) at B = 64, 256 and the small-channel residual
#                 GroupNorm CNN (ResNet-20 GN, 16-64 channels) at B = 128: time, memory, FLOPs, bytes
#   stats-gram    stats_overhead.py: the unrolled GPTs at B = 64, 256 with every product layer
#                 forced into the Gram form (--gram-factor 1e-6): its bytes against its time
#   scale         scale.py --meshes one: the d = 256 GPT (scan / unrolled, remat off / on, B = 64, 256)
#                 on one GPU: compiled memory of the statistics step against the plain step with the
#                 same remat, and the share of the state donated (compiled only, about 1 min;
#                 the FSDP / TP tables need 8 devices: benchmarks/results/scale_cpu.md)
#   stats         stats_overhead.py: SmallCNN and ResNet-20 GroupNorm at B = 128, 512, 1024
#   e2e           end_to_end.py: SGD / AdaBatch / DiveBatch vs replays, ResNet-20 GN on
#                 CIFAR-10 (needs .bundle/cifar10_jpeg.npz from cifar10_jpeg_bundle.py pack)
#   pipeline      pipeline.py: data on the device vs from the host, against the engine's step
#   stats18       stats_overhead.py: ResNet-18 GroupNorm and BatchNorm at B = 128
#   layers        layer_forms.py: per-example norm forms of each conv shape (the cost model)
#   seq-forms     sequence_forms.py: Gram vs product form of MLP / projection layers over
#                 sequences, T = 64-1024, D = 128 / 256 (the cost model's ρ for transformers)
#   device-batch  device_batch.py: examples/s by device batch; loops vs unrolled
#   policies      reproduce.py protocol C (ResNet-20 GN, full CIFAR-10): SGD, AdaBatch,
#                 DiveBatch (first_resize), goodput, one seed; cells land in OUT_DIR/reproduce
#   lm            reproduce.py protocol LG: protocol L's GPU preset, the 10.8M-parameter char GPT
#                 (context 256) on all of tinyshakespeare (../shared/data/text): constant b0,
#                 constant b_max, DiveBatch and the norm test under AdamW, one seed
set -uo pipefail
out=${1:-benchmarks/results}
shift || true
stages=${*:-stats-gpt stats e2e pipeline stats18}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DIVEBATCH_CACHE_DIR=/tmp/divebatch_cache
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  echo "code ${DIVEBATCH_CODE:-unknown: pass DIVEBATCH_CODE=\$(git rev-parse --short HEAD) from the checkout}"
} | tee "$out/gpu_machine.txt"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$(date +%s)
  timeout "$limit" "$@"
  echo "stage $name: exit $?, $(( $(date +%s) - start )) s"
}

for s in $stages; do
  case $s in
    stats-gpt)
      stage stats-gpt 150 python3 benchmarks/stats_overhead.py --models gpt128 gpt128scan gpt256 gpt256scan \
        --batches 64 256 --variants plain auto "auto +ip" --reps 10 --out "$out/stats_overhead_gpt_gpu.md"
      stage stats-smallcnn 60 python3 benchmarks/stats_overhead.py --models resnet20gn --batches 128 \
        --variants plain auto "auto +ip" --reps 10 --out "$out/stats_overhead_smallcnn_gpu.md" ;;
    scale)
      stage scale 90 python3 benchmarks/scale.py --meshes one --widths 256 --batches 64 256 \
        --out "$out/scale_gpu.md" ;;
    stats-gram)
      stage stats-gram 60 python3 benchmarks/stats_overhead.py --models gpt128 gpt256 --batches 64 256 \
        --variants plain auto --reps 10 --gram-factor 1e-6 --out "$out/stats_overhead_gpt_gram_gpu.md" ;;
    stats)
      stage stats 110 python3 benchmarks/stats_overhead.py --models resnet20gn cnn --batches 128 512 1024 \
        --variants plain auto exact --reps 10 --out "$out/stats_overhead_gpu.md" ;;
    e2e)
      python3 benchmarks/cifar10_jpeg_bundle.py unpack .bundle/cifar10_jpeg.npz /tmp/cifar10.npz
      stage e2e 150 python3 benchmarks/end_to_end.py --dataset npz:/tmp/cifar10.npz --model resnet20 \
        --num-examples 10000 --num-test-examples 2000 --batch-size 128 --max-batch-size 2048 \
        --epochs 6 --every 2 --lr 0.1 --delta 0.02 --out "$out/end_to_end_gpu.md" ;;
    pipeline)
      stage pipeline 50 python3 benchmarks/pipeline.py --data random --batch-sizes 128,512,2048 \
        --min-bucket 128 --max-device-batch 1024 --seconds 1 --results-dir "$out" ;;
    stats18)
      stage stats18 70 python3 benchmarks/stats_overhead.py --models resnet18gn resnet18bn --batches 128 \
        --variants plain auto --reps 5 --out "$out/stats_overhead_resnet18_gpu.md" ;;
    seq-forms)
      stage seq-forms 90 python3 benchmarks/sequence_forms.py --lengths 64 128 256 512 1024 --tokens 32768 --reps 10 \
        --out "$out/sequence_forms_gpu.md" ;;
    layers)
      stage layers 120 python3 benchmarks/layer_forms.py --batches 128 1024 --out "$out/layer_forms_gpu.md" ;;
    device-batch)
      stage device-batch 150 python3 benchmarks/device_batch.py --models cnn resnet20 \
        --batches 32 64 128 256 512 1024 2048 --micro 128 256 --k-max 4 --seconds 0.5 \
        --out "$out/device_batch_gpu.md" ;;
    policies)
      python3 benchmarks/cifar10_jpeg_bundle.py unpack .bundle/cifar10_jpeg.npz /tmp/cifar10.npz
      stage policies 300 python3 benchmarks/reproduce.py --protocol C --dataset npz:/tmp/cifar10.npz \
        --methods sgd-small adabatch divebatch-first goodput --seeds 0 --root "$out/reproduce" ;;
    lm)
      stage lm 300 python3 benchmarks/reproduce.py --protocol LG \
        --methods constant-b0 constant-bmax divebatch norm-test --seeds 0 --root "$out/reproduce" ;;
    *) echo "unknown stage $s" >&2 ;;
  esac
done
