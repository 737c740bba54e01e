#!/bin/bash
# AGAIN's robust generalization gap (AGAIN Sec. 5.6, Fig. 3) at --quick: AT, AGAIN, plain MART and
# AGAIN-MART for each seed, then eval.py --gen-gap on every last.pt. Not a test. From the repository root:
#
#     bash tests/gen_gap.sh [DATA_DIR] [OUT] [SEEDS...]     # defaults: ../shared/data, runs/gap, 8 9 10
#
# Two queues, one per core (one thread each). Plain MART is train_again.py --base mart --no-ase
# --no-hff: without the ASE head and HFF an AGAIN step is MART's step (the i/N coin still draws).
# A run whose final.json exists is skipped, one cut short resumes.
set -u
D=${1:-../shared/data}; R=${2:-runs/gap}; shift 2 2>/dev/null; SEEDS=${*:-8 9 10}
PY=${PYTHON:-python}
mkdir -p "$R"
train() {   # train CORE NAME SEED SCRIPT [FLAGS...]
    local core=$1 name=$2 s=$3; shift 3
    local o=$R/$name-s$s resume=()
    [ -f "$o/final.json" ] && return 0
    [ -f "$o/last.pt" ] && resume=(--resume)
    env OMP_NUM_THREADS=1 taskset -c "$core" $PY "$@" --quick --data-dir "$D" --seed "$s" --device cpu \
        --out "$o" "${resume[@]}" >> "$o.log" 2>&1 || echo "$name-s$s: training failed, see $o.log"
}
jobs=()
for s in $SEEDS; do
    jobs+=("at $s train_at.py" "again $s train_again.py" "mart $s train_again.py --base mart --no-ase --no-hff"
           "again-mart $s train_again.py --base mart")
done
( for ((k = 0; k < ${#jobs[@]}; k += 2)); do train 0 ${jobs[k]}; done ) &
( for ((k = 1; k < ${#jobs[@]}; k += 2)); do train 1 ${jobs[k]}; done ) &
wait
ckpts=(); for s in $SEEDS; do for m in at again mart again-mart; do ckpts+=("$R/$m-s$s/last.pt"); done; done
$PY eval.py --ckpt "${ckpts[@]}" --data-dir "$D" --device cpu --gen-gap 1000 --no-table \
    --json "$R/gap.json" > "$R/gap.txt" && $PY tests/gap_table.py "$R/gap.json"
