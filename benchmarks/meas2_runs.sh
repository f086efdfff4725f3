#!/bin/bash
# Issue 23 section 2, second series (docs/results/settings.md), seed-major: the runs a `compare` would
# train (same options: `python -m metric train ... --method M --seed S --threads 1`, into
# FOLDER/<method>-seed<S>), two at a time, ordered seed 0 of every method first, so that a series cut
# short still pairs whole seeds. A finished run is skipped; `compare --resume` on FOLDER renders its table.
# Usage: meas2_runs.sh FOLDER "METHODS" [train options...]     (touch /work/runs-meas/STOP-meas2 to stop)
cd /work/wt-meas2 || exit 1
export PYTHONPATH=/work/wt-meas2 OUT=$1 EXTRA="${*:3}"
methods=$2
mkdir -p "$OUT"
one() {  # one METHOD SEED
  local d=$OUT/$1-seed$2
  [ -e /work/runs-meas/STOP-meas2 ] && return 0
  grep -q "finished at step" $d.log 2>/dev/null && return 0
  echo "=== $(date -u +%T) start $d"
  nice -n 5 python -m metric train --dataset omniglot --method $1 --seed $2 --threads 1 --no-progress \
    --resume auto --output-dir $d $EXTRA >> $d.log 2>&1
  echo "=== $(date -u +%T) end $d rc=$?"
}
export -f one
for s in 0 1 2; do for m in $methods; do echo "$m $s"; done; done | xargs -P 2 -L 1 bash -c 'one $0 $1'
