#!/bin/bash
# The README's "AELFs' beta on the paper's norm" table: the paper's model (full-width CNN_B) from
# one ST init, each beta on ||f||_2 for 2 epochs of 8,000 images (0.1 and 0.2 also for 8), and AT
# from the same init; PGD(0.3, 16, 0.02), the paper's MNIST attack. Not a test. From the
# repository root (one thread per run: OMP_NUM_THREADS=1 taskset -c N bash tests/...):
#
#     bash tests/sweep_aelfs_beta.sh [DATA_DIR] [OUT]      # defaults: ../shared/data, runs/sweep-l2
set -eu
D=${1:-../shared/data}; R=${2:-runs/sweep-l2}; PY=${PYTHON:-python}
$PY train_at.py --standard --data-dir "$D" --train-size 8000 --epochs 3 --milestones 2 --val-size 0 \
    --test-size 1000 --device cpu --seed 8 --out "$R/st"
A=(--data-dir "$D" --train-size 8000 --val-size 500 --test-size 500 --device cpu --seed 8 --init "$R/st/last.pt")
for B in 0.05 0.1 0.2 0.3 0.5; do
    $PY train_aelfs.py "${A[@]}" --epochs 2 --milestones --beta $B --out "$R/b$B"
done
for B in 0.1 0.2; do
    $PY train_aelfs.py "${A[@]}" --epochs 8 --milestones 4 6 --beta $B --out "$R/b$B-8ep"
done
$PY train_at.py "${A[@]}" --epochs 2 --milestones --out "$R/at"
# the table's columns: PGD-20 / CW-inf on 300 images (200 for 8 epochs), AutoAttack on 200
for run in b0.05 b0.1 b0.2 b0.3 b0.5 at; do
    $PY eval.py --ckpt "$R/$run/last.pt" --data-dir "$D" --test-size 300
done
for run in b0.05 b0.1 b0.1-8ep b0.2 b0.2-8ep b0.3 at; do     # b0.5 collapsed: no AutoAttack
    $PY eval.py --ckpt "$R/$run/last.pt" --data-dir "$D" --test-size 200 --autoattack
done
