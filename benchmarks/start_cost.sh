#!/bin/bash
# The default job's start: epoch 1's training time (compiles included) of SGD and DiveBatch
# with the embedded job's flags, each run pinned to one core, alternating, for two checkouts.
#   bash benchmarks/start_cost.sh OLD_CHECKOUT NEW_CHECKOUT OUT_DIR
# Prints epoch 1's record line of each run (train s, compile s, compilations).
set -u
old=$1; new=$2; results=$3
mkdir -p "$results"
export DIVEBATCH_CACHE_DIR=$results/cache   # one device-batch measurement for every run
for rep in 1 2; do
  for code in old new; do
    if [ $code = old ]; then root=$old; else root=$new; fi
    for method in sgd divebatch; do
      out=$results/$code-$method-$rep
      rm -rf $out
      (cd $root && PYTHONPATH=$root taskset -c 1 python -m divebatch_jax.train --dataset digits --model mlp --epochs 30 --batch-size 16 --max-batch-size 512 --lr 0.05 --resize-every 5 --growth-every 5 --method $method --out $out > $out.log 2>&1)
    done
  done
done
for log in "$results"/*.log; do echo "$(basename "$log" .log): $(grep -m1 'epoch   1 ' "$log")"; done
