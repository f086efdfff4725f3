#!/bin/bash
# Issue 23 section 2, second measurement series (docs/results/settings.md): the experiments in priority
# order, each a `compare` into its own folder under /work/runs-meas (a rerun only trains what is missing).
# touch /work/runs-meas/STOP-meas2 to end after the running phase.
cd /work/wt-meas2 || exit 1
export PYTHONPATH=/work/wt-meas2
R=/work/runs-meas
run() {  # run NAME compare-options...
  [ -e $R/STOP-meas2 ] && { echo "STOP-meas2: not starting $1"; exit 0; }
  local name=$1; shift
  echo "=== $(date -u +%T) start $name: $*"
  /usr/bin/time -f "$name wall %e s" nice -n 5 python -m metric compare --dataset omniglot --seeds 3 --jobs 2 \
    --no-progress --resume --output-dir $R/$name "$@"
  echo "=== $(date -u +%T) end $name rc=$?"
}
ready_all() { grep -q '^READY ALL' /work/notes/wt-base.status; }
merge_base() {  # the --loss / --miner options, once wt-base says READY ALL (between phases only)
  git merge-base --is-ancestor wt-base HEAD || git merge --no-edit wt-base
}
loss_phases() {
  run loss-contrastive --methods none,xbm-batch,xbn --loss ContrastiveLoss --miner none
  run loss-ms --methods none,xbm-batch,xbn --loss MultiSimilarityLoss --miner MultiSimilarityMiner
}
run star --methods xbn-batch,axbn-batch
run rot4 --methods none,xbm,xbm-batch,xbn --omniglot-rotations 4 --epochs 3
if ready_all; then merge_base && loss_phases; run mem2 --methods xbm,xbm-batch,xbn --memory-size 2.0
else
  run mem2 --methods xbm,xbm-batch,xbn --memory-size 2.0
  while ! ready_all; do [ -e $R/STOP-meas2 ] && exit 0; sleep 30; done
  merge_base && loss_phases
fi
echo "=== $(date -u +%T) chain done"
