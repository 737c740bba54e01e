#!/bin/bash
# The README's results table: every method at --quick on real MNIST, trained and evaluated, then
# printed by tests/results_table.py. Not a test. From the repository root:
#
#     bash tests/results.sh [SEED] [DATA_DIR] [OUT]      # defaults: 8, ../shared/data, runs/results
#     python tests/results_table.py runs/results 8
#
# On the CPU two queues, one per core (one thread each); with DEV=cuda every row at once on the
# GPU (AELFs and JT* after ST), so that the three seeds can run side by side:
#     for s in 8 9 10; do DEV=cuda bash tests/results.sh $s DATA runs/results & done; wait
# Per method: training (--quick: its own final test on the first 1,000 test images), natural
# accuracy on the whole test set and its shifted copies, the attack table with shifted PGD on
# the first 1,000, AutoAttack (standard) and the per-image worst case on the first AA_SIZE
# (default 500) for last.pt and best.pt. AELFs and JT* start from the ST row's model (the --quick
# ST phase they would otherwise run is that same run).
set -u
S=${1:-8}; D=${2:-../shared/data}; R=${3:-runs/results}; DEV=${DEV:-cpu}; AA=${AA_SIZE:-500}
FLAGS=${FLAGS:-}   # added to every training run, e.g. FLAGS="--eps 0.3 --step-size 0.02"
PY=${PYTHON:-python}
mkdir -p "$R"

one() {   # one() CORE NAME SCRIPT [FLAGS...]: train, then the three evaluations; a step whose
          # output exists is skipped, a training cut short resumes, so a stopped queue restarts
    local core=$1 name=$2; shift 2
    local o=$R/$name-s$S pin=() resume=()
    [ "$DEV" = cpu ] && pin=(env OMP_NUM_THREADS=1 taskset -c "$core")
    if [ ! -f "$o/final.json" ]; then
        [ -f "$o/last.pt" ] && resume=(--resume)
        "${pin[@]}" $PY "$@" --quick $FLAGS --data-dir "$D" --seed "$S" --device "$DEV" --out "$o" \
            "${resume[@]}" >> "$o.log" 2>&1 || { echo "$name: training failed, see $o.log"; return 1; }
    fi
    [ -f "$o.nat.json" ] || "${pin[@]}" $PY eval.py --ckpt "$o/last.pt" --data-dir "$D" --device "$DEV" \
        --no-table --shift 8 --no-shift-attack --json "$o.nat.json" > "$o.nat.log" 2>&1 ||
        { echo "$name: see $o.nat.log"; return 1; }
    [ -f "$o.eval.json" ] || "${pin[@]}" $PY eval.py --ckpt "$o/last.pt" --data-dir "$D" --device "$DEV" \
        --test-size 1000 --shift 8 --json "$o.eval.json" > "$o.eval.log" 2>&1 ||
        { echo "$name: see $o.eval.log"; return 1; }
    [ -f "$o.aa.json" ] || "${pin[@]}" $PY eval.py --ckpt "$o/last.pt" "$o/best.pt" --data-dir "$D" \
        --device "$DEV" --test-size "$AA" --autoattack --json "$o.aa.json" > "$o.aa.log" 2>&1 ||
        { echo "$name: see $o.aa.log"; return 1; }
    echo "$name done: $(tail -n 1 "$o.log")"
}

ST=$R/st-s$S/last.pt
if [ "$DEV" != cpu ]; then
  export OMP_NUM_THREADS=1
  ( one 0 st train_at.py --standard
    one 0 aelfs train_aelfs.py --init "$ST" &
    one 0 jtstar train_jt.py --init "$ST" &
    wait ) &
  for row in "at train_at.py" "aelf train_aelf.py" "trades train_trades.py" "jt train_jt.py" \
             "again train_again.py" "at-id train_att_id.py"; do
    one 0 $row &
  done
  wait
  echo "all runs in $R: python tests/results_table.py $R $S"
  exit 0
fi
( one 0 st train_at.py --standard
  one 0 aelfs train_aelfs.py --init "$ST"
  one 0 jtstar train_jt.py --init "$ST"
  one 0 at train_at.py
  one 0 aelf train_aelf.py ) &
( one 1 trades train_trades.py
  one 1 jt train_jt.py
  one 1 again train_again.py
  one 1 at-id train_att_id.py ) &
wait
echo "all runs in $R: python tests/results_table.py $R $S"
