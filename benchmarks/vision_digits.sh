#!/usr/bin/env bash
# MatViT on scikit-learn's 8x8 digits: the numbers and plots of docs/vision.md.
#
# Equal compute (arXiv 2310.07707, sec. 3.2): each of the 4 dense baselines trains X steps, MatViT in
# sample mode 4X steps (one granularity per step), MatViT in joint mode X steps (all four
# granularities on every batch). Preset vit-digits (4 layers, 4 heads, patch 4, GELU FFN with
# d_ff = 4 d_model; S/M/L/XL = d_ff/8 .. d_ff), batch 64, lr 3e-3, fp32, no augmentation (the
# default on 8x8 images).
#
#   bash benchmarks/vision_digits.sh [X] [SEEDS...]      default: 500 0 1 2
#   D_MODEL=16 bash benchmarks/vision_digits.sh           a narrow ViT (S has 8 FFN units)
#   TRAIN_ONLY=1 ...                                      skip the reports
#
# Runs go to runs/vision/d$D_MODEL/seed$SEED; seed 0 also gets the retrieval and Mix'n'Match
# reports, and the plots are copied to docs/. About 3 minutes per seed for d_model 64 and 1.5
# for 16 on 2 busy CPU cores (OMP_NUM_THREADS=1 is faster on a shared machine).
set -euo pipefail
cd "$(dirname "$0")/.."
X=${1:-500}; shift || true
SEEDS=${*:-0 1 2}
D=${D_MODEL:-64}
M=".venv/bin/matformer"
B=runs/vision/d$D
for seed in $SEEDS; do
  R=$B/seed$seed
  common=(--preset vit-digits --d-model "$D" --data digits --seed "$seed" --no-progress
          --eval-interval 250)
  [ -f $R/matvit/latest ] || $M vision train "${common[@]}" --mode sample --steps $((4 * X)) \
      --out $R/matvit
  [ -f $R/joint/latest ] || $M vision train "${common[@]}" --mode joint --steps "$X" --out $R/joint
  for g in S M L XL; do
    [ -f $R/base-$g/latest ] || $M vision train "${common[@]}" --mode baseline --granularity $g \
        --steps "$X" --out $R/base-$g
  done
  [ -n "${TRAIN_ONLY:-}" ] || $M vision eval $R/matvit $R/joint --labels "MatViT sample,MatViT joint" \
      --baselines $R/base-{S,M,L,XL} --json > $R/eval.json
  [ -n "${TRAIN_ONLY:-}" ] || $M vision retrieve $R/matvit --baselines $R/base-{S,M,L,XL} \
      --no-latency --json --out $R/retrieval > /dev/null
done
[ -z "${TRAIN_ONLY:-}" ] || exit 0
R=$B/seed0
$M vision eval $R/matvit $R/joint --labels "MatViT sample (4X steps),MatViT joint (X steps)" \
    --baselines $R/base-{S,M,L,XL} --plot docs/vision_accuracy_d$D.png
$M --threads 1 vision retrieve $R/matvit --baselines $R/base-{S,M,L,XL} --mixnmatch \
    --out $B/retrieval
$M --threads 1 vision retrieve $R/joint --baselines $R/base-{S,M,L,XL} --no-latency \
    --out $B/retrieval-joint
$M --threads 1 vision mixnmatch $R/matvit --baselines $R/base-{S,M,L,XL} \
    --patterns rule,decreasing,random --out $B/mixnmatch
cp $B/retrieval/retrieval.png docs/vision_retrieval_d$D.png
cp $B/mixnmatch/mixnmatch.png docs/vision_mixnmatch_d$D.png
