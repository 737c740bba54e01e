#!/bin/bash
# The GPU reproduction script: the CUDA checks, the speed tables and AELF Table 2 on a GPU, in
# stages that can run one at a time. Not a test. On a GPU machine, from the repository root, with
# `.gpu/` holding pyautoattack's code (.gpu/site) and MNIST's four .gz files (.gpu/data/MNIST/raw)
# for a machine without internet access:
#
#     bash tests/gpu_reproduce.sh STAGE [STAGE ...]
#
#   short    the one prepared call of at most 9 minutes (for a machine lent briefly): check,
#            then a trimmed speed table (AT, TRADES, AELFs and ResNet-18 PGD-10, fp32 and
#            --amp) and a reduce-overhead compile probe of AT and AELF; at most 9 minutes
#   check    nvidia-smi, then tests/test_cuda.py (every script on CUDA, fp32
#            and --amp, ResNet-18 and WRN on synthetic CIFAR, AutoAttack)           ~3 min
#   table2q  the table-2 rows at a reduced protocol (1 epoch of 10,000 images, PGD as the
#            paper's) side by side, waited for: inside one call (8 minutes at most)
#   speed    tests/bench_overhead.py for every script, fp32 and --amp, full
#            cnn_b; one ResNet-18 PGD-10 row on synthetic CIFAR; bench_reference AT and TRADES
#            (this repository against the reference-style loops)                 ~6 min
#   compile  every other script trained under CUDA graphs (test_cuda.py -k cuda_graphs), then
#            AT, TRADES, AGAIN with --compile default and reduce-overhead,
#            fp32 and --amp, after their eager rows in `speed`                      ~8 min
#   table2   starts ST, AT, JT, AELFs, TRADES and AELF at the paper protocol
#            (the scripts' defaults, seed 8) side by side in the background (setsid)
#   results  the README's Results table (tests/results.sh, every row of seeds 8, 9 and 10 at
#            once) in the background (setsid); `results_poll` brings back its table and files
#   poll     one line per table-2 run (its last epoch), and their logs into $OUT
#   eval     eval.py --shift 8 (whole test set) and --autoattack (first 1,000) for every
#            finished table-2 run, in the background; `poll` brings the results back
#
# Each stage has a time limit (GPU_STAGE_SECONDS, default 540 s; the `short` stage's parts less): a
# stage that runs out is stopped and says so, and the next stage starts. Before anything runs,
# the `.gpu/` files are checked (pyautoattack's code, MNIST's .gz files).
# Everything lands in $OUT (one .log and one .jsonl per stage, table2.tar.gz).
# `check speed compile` take about 17 minutes in all (estimated, not yet run on a GPU): more
# than one call; `short` fits in one 9-minute call. Table 2 at
# the paper protocol is about 2e16 FLOP per adversarial run (3M images x ~35 passes of a
# 190-MFLOP cnn_b): read `speed`'s img/s first to know how long the six runs will take.
# For a dry run on the CPU: GPU_SESSION_DEVICE=cpu GPU_SESSION_SMALL=1 OUT=/tmp/o bash tests/gpu_reproduce.sh check speed
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DEV=${GPU_SESSION_DEVICE:-cuda}
SMALL=${GPU_SESSION_SMALL:-}
DATA=.gpu/data
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT"
LIMIT=${GPU_STAGE_SECONDS:-540}
if [ -z "$SMALL" ]; then           # preflight: what the GPU machine lacks must have travelled
    missing=()
    [ -f .gpu/site/pyautoattack/__init__.py ] || missing+=(.gpu/site/pyautoattack/__init__.py)
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        [ -f $DATA/MNIST/raw/$f.gz ] || [ -f $DATA/MNIST/raw/$f ] || missing+=($DATA/MNIST/raw/$f.gz)
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "missing ${missing[*]}: copy them as ../shared/device-notes.md shows and carry .gpu" | tee "$OUT/preflight.log"
        exit 2
    fi
fi
if [ -n "$SMALL" ]; then           # the dry run: narrow models, few batches, tiny table 2
    DATA=${GPU_SESSION_DATA:-../shared/data}; WIDTH=0.125; BATCHES=2; REPS=1
    TABLE=(--width 0.125 --train-size 256 --test-size 64 --epochs 1 --steps 2)
    AELFS=(--st-epochs 1); AA_SIZE=32; SHIFT_SIZE=(--test-size 64); SYNTH=$OUT/../synth
else
    WIDTH=1; BATCHES=50; REPS=5; TABLE=(); AELFS=(); AA_SIZE=1000; SHIFT_SIZE=(); SYNTH=.gpu/synth
fi
SCRIPTS="train_at.py train_jt.py train_trades.py train_aelf.py train_aelfs.py train_again.py train_att_id.py"

bench() {   # bench() LABEL ARGS...: one bench_overhead JSON line into speed.jsonl / compile.jsonl
    local file=$1; shift
    echo "== $*" >> "$OUT/$file.log"
    timeout "${BENCH_SECONDS:-$LIMIT}" $PY tests/bench_overhead.py --device "$DEV" --data-dir "$DATA" --width "$WIDTH" \
        --batches "$BATCHES" --reps "$REPS" "$@" 2>>"$OUT/$file.log" | tee -a "$OUT/$file.log" \
        | grep '^{' >> "$OUT/$file.jsonl" || echo "FAILED: $*" | tee -a "$OUT/$file.log"
}

for stage in "$@"; do
  t0=$(date +%s)
  case $stage in
  check)
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
      $PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")'
      ADV_TEST_DEVICE=$DEV timeout "${CHECK_SECONDS:-$LIMIT}" $PY -m pytest -q tests/test_cuda.py -k 'not cuda_graphs' 2>&1 \
          || echo "check: failures above, or stopped after ${CHECK_SECONDS:-$LIMIT} s"; } > "$OUT/check.log"
    tail -3 "$OUT/check.log" ;;
  short)
    CHECK_SECONDS=110 bash "$0" check           # short: 110 + 8 x 35 + 2 x 65 s < 9 min
    [ -d "$SYNTH" ] || $PY -c "import sys; sys.path.insert(0, 'tests'); import conftest; \
        conftest.write_cifar('$SYNTH', 10, n_per_batch=$((128 * BATCHES / 5 + 128)))"
    export BENCH_SECONDS=35
    for amp in "" --amp; do
      for s in train_at.py train_trades.py train_aelfs.py; do bench speed --script $s -- $amp; done
      bench speed --script train_at.py --data-dir "$SYNTH" -- --dataset cifar10 --model resnet18 \
          --eps 0.0314 --steps 10 --step-size 0.0157 --random-start $amp
    done
    BENCH_SECONDS=65
    for s in train_at.py train_aelf.py; do bench compile --script $s --compile reduce-overhead; done ;;
  table2q)
    mkdir -p runs/table2q
    q=(--dataset mnist --data-dir "$DATA" --device "$DEV" --epochs 1 --train-size 10000 --test-size 1000 "${TABLE[@]}")
    for row in "st train_at.py --standard" "at train_at.py" "jt train_jt.py" "aelfs train_aelfs.py --st-epochs 1" \
               "trades train_trades.py" "aelf train_aelf.py"; do
      set -- $row; name=$1; shift
      timeout $((LIMIT - 60)) $PY "$@" "${q[@]}" --out runs/table2q/$name --overwrite > runs/table2q/$name.out 2>&1 &
    done
    wait
    for f in runs/table2q/*.out; do echo "$f: $(grep -E 'done in|rror' $f | tail -n 1)"; done | tee "$OUT/table2q.log"
    tar czf "$OUT/table2q.tar.gz" runs/table2q/*.out runs/table2q/*/log.jsonl runs/table2q/*/final.json 2>/dev/null ;;
  speed)
    for s in $SCRIPTS; do
      [ $s = train_att_id.py ] && extra=(--model cnn_b) || extra=()     # its MNIST default is madry_cnn
      bench speed --script $s -- "${extra[@]}"
      bench speed --script $s -- "${extra[@]}" --amp
    done
    [ -d "$SYNTH" ] || $PY -c "import sys; sys.path.insert(0, 'tests'); import conftest; \
        conftest.write_cifar('$SYNTH', 10, n_per_batch=$((128 * BATCHES / 5 + 128)))"
    for amp in "" --amp; do    # AGAIN Table 2's model and budget: ResNet-18, PGD-10 (eps 8/255)
      bench speed --script train_at.py --data-dir "$SYNTH" -- --dataset cifar10 --model resnet18 \
          --eps 0.0314 --steps 10 --step-size 0.0157 --random-start $amp
    done
    for m in at trades; do
      $PY tests/bench_reference.py --method $m --device "$DEV" --data-dir "$DATA" --width "$WIDTH" \
          --batches "$BATCHES" 2>>"$OUT/speed.log" | grep '^{' >> "$OUT/speed.jsonl"
    done ;;
  compile)
    ADV_TEST_DEVICE=$DEV timeout $((LIMIT / 2)) $PY -m pytest -q tests/test_cuda.py -k cuda_graphs > "$OUT/compile.log" 2>&1 \
        || echo "compile: CUDA-graph test failures in compile.log, or stopped after $((LIMIT / 2)) s" | tee -a "$OUT/compile.log"
    for s in train_at.py train_trades.py train_again.py; do
      for mode in default reduce-overhead; do
        bench compile --script $s --compile $mode
        bench compile --script $s --compile $mode -- --amp
      done
    done ;;
  table2)
    mkdir -p runs/table2
    common=(--dataset mnist --data-dir "$DATA" --device "$DEV" "${TABLE[@]}")
    start() {  # start NAME SCRIPT ARGS...
      local name=$1; shift
      setsid nohup $PY "$@" "${common[@]}" --out runs/table2/$name > runs/table2/$name.out 2>&1 < /dev/null &
    }
    start st train_at.py --standard
    start at train_at.py
    start jt train_jt.py                 # JT 0.5:0.5 (its defaults)
    start aelfs train_aelfs.py "${AELFS[@]}"        # its own ST phase first (the ST protocol), then AELFs
    start trades train_trades.py
    start aelf train_aelf.py
    sleep 20; tail -n 2 runs/table2/*.out ;;
  eval)
    for d in runs/table2/*/; do
      name=$(basename $d)
      [ -f $d/final.json ] || { echo "$name: not finished"; continue; }
      [ -f runs/table2/$name.shift.out ] && continue           # started already
      setsid nohup bash -c "$PY eval.py --ckpt $d/last.pt --data-dir $DATA --device $DEV --no-table --shift 8 ${SHIFT_SIZE[*]} \
          --json runs/table2/$name.shift.json > runs/table2/$name.shift.out 2>&1; \
          $PY eval.py --ckpt $d/last.pt --data-dir $DATA --device $DEV --autoattack --test-size $AA_SIZE \
          --json runs/table2/$name.eval.json > runs/table2/$name.eval.out 2>&1" < /dev/null > /dev/null 2>&1 &
    done; sleep 5 ;;
  poll)
    for f in runs/table2/*.out; do
      echo "$f: $( (grep -E '^epoch|done in|rror' $f || tail -n 1 $f) | tail -n 1)"
    done
    tar czf "$OUT/table2.tar.gz" runs/table2/*.out runs/table2/*.json runs/table2/*/log.jsonl \
        runs/table2/*/final.json 2>/dev/null ;;
  results)
    mkdir -p runs/results
    for s in 8 9 10; do
      DEV=$DEV PYTHON=$PY setsid nohup bash tests/results.sh $s "$DATA" runs/results > runs/results/seed$s.out 2>&1 < /dev/null &
    done
    echo "results: started in the background; bash tests/gpu_reproduce.sh results_poll" | tee "$OUT/results.log" ;;
  results_poll)
    { date; tail -n 3 runs/results/seed*.out; } | tee "$OUT/results.log"
    $PY tests/results_table.py runs/results 8 9 10 > "$OUT/results_table.md" 2>&1
    tar czf "$OUT/results.tar.gz" runs/results/*.json runs/results/*.log runs/results/*.out \
        runs/results/*/log.jsonl runs/results/*/final.json 2>/dev/null ;;
  *) echo "unknown stage $stage (short check speed compile table2q table2 poll eval results results_poll)"; exit 2 ;;
  esac
  echo "[$stage: $(( $(date +%s) - t0 )) s]"
done
