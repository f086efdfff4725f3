#!/bin/bash
# Issue 23 section 2, second series (docs/results/settings.md): a queue of training runs, two lanes.
# Each line of QUEUE is `FOLDER METHOD SEED [train options...]`; a lane takes the first line (under a
# lock, so the file may be edited while it runs), trains `python -m metric train --dataset omniglot
# --method METHOD --seed SEED --threads 1 [options]` into FOLDER/METHOD-seedSEED (the options and folder
# names a `compare` gives its runs; a finished run is skipped), and takes the next. `compare --resume`
# on FOLDER renders its table afterwards. Usage: meas2_queue.sh QUEUE [PID_A PID_B] (a lane first waits
# for its PID: a run already training). touch /work/runs-meas/STOP-meas2 to stop after the running runs.
cd /work/wt-meas2 || exit 1
export PYTHONPATH=/work/wt-meas2
Q=$(realpath "$1")
pop() { flock "$Q.lock" bash -c "head -n 1 '$Q'; sed -i 1d '$Q'"; }
lane() {
  while kill -0 "$1" 2>/dev/null; do sleep 5; done
  while [ ! -e /work/runs-meas/STOP-meas2 ]; do
    line=$(pop); [ -z "$line" ] && break
    set -- $line; d=$1/$2-seed$3; mkdir -p "$1"
    if grep -q "finished at step" $d.log 2>/dev/null; then continue; fi
    echo "=== $(date -u +%T) start $d ${*:4}"
    nice -n 5 python -m metric train --dataset omniglot --method $2 --seed $3 --threads 1 --no-progress \
      --resume auto --output-dir $d "${@:4}" >> $d.log 2>&1
    echo "=== $(date -u +%T) end $d rc=$?"
  done
}
lane "${2:-0}" & lane "${3:-0}" & wait
