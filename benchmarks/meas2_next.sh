#!/bin/bash
# After the rotated-classes series (pid $1) ends: the loss series once wt-base is READY ALL (merged
# first), else the memory-200 % series. Seed-major through meas2_runs.sh; STOP-meas2 stops it.
cd /work/wt-meas2 || exit 1
while kill -0 "$1" 2>/dev/null; do sleep 10; done
R=/work/runs-meas
if grep -q '^READY ALL' /work/notes/wt-base.status; then
  git merge-base --is-ancestor wt-base HEAD || git merge --no-edit wt-base || exit 1
  ./benchmarks/meas2_runs.sh $R/loss-contrastive "none xbm-batch xbn" --loss ContrastiveLoss --miner none
  ./benchmarks/meas2_runs.sh $R/loss-ms "none xbm-batch xbn" --loss MultiSimilarityLoss --miner MultiSimilarityMiner
else
  ./benchmarks/meas2_runs.sh $R/mem2 "xbm-batch xbn xbm" --memory-size 2.0
fi
