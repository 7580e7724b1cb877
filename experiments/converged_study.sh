#!/usr/bin/env bash
# Issue 15's converged study on the 30-epoch ResNet-20 baselines, one seed at a time:
#
#   bash scripts/background.sh ~/taylor_jax_runs/seed1.log bash experiments/converged_study.sh 1
#
# A seed's steps, most needed first (each a command of experiments/README.md, "The rest of the
# converged study"):
#   1. its 30-epoch baseline (experiments/converged_baselines.py);
#   2. Taylor-FO-BN at 40% fewer FLOPs (the issue's target, over seeds);
#   3. Torch-Pruning's GroupTaylor from the same weights at the same MACs (peer_torch_pruning.py);
#   4. taylor_jax's weight-Taylor criterion (GroupTaylor's |w * dL/dw|) in the same protocol:
#      why GroupTaylor came out ahead on seed 0;
#   5. the oracle correlation on this baseline;
#   6. the accuracy-vs-FLOPs grid: Taylor-FO-BN at 25% and 60%, weight L2, BN scale and random at
#      25/40/60% (the compared criteria on one seed where the CPU budget allows no more);
#   7. Torch-Pruning's magnitude and BN-scale importances from the same weights (its GroupTaylor
#      is step 3).
# `bash experiments/converged_study.sh summary [SEEDS]` writes the study's tables from what has
# finished, at any time (results/methods_converged.*, peer_torch_pruning.*; what has not is listed
# under the tables); SEEDS: those the compared criteria ran on (default 1).
#
# Every step resumes from its workdir and skips what is finished. A session's machine may be a
# fresh one: checkpoints are never committed, so finished steps are read back from the committed
# results (converged_baselines.csv, results/runs/*.json, peer_torch_pruning.csv), and a seed whose
# baseline is gone can only go on by training it again, which on XLA:CPU gives another network
# (not bit-reproducible across machines): its earlier pruned rows are then refused, not mixed
# (compare_methods.read_record). So run a seed's steps in one session, in this order.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD  # the experiment scripts import taylor_jax from this checkout
R=${TAYLOR_JAX_RUNS:-$HOME/taylor_jax_runs}
PY=.venv/bin/python
RES=experiments/results
GRID=(--baseline_dir="$R/converged/resnet20_e30_s{seed}" --epochs=30
      --methods=taylor_fo_bn,estimator/weight_l2,estimator/bn_scale,estimator/random
      --reductions=0.25,0.4,0.6 --runs_dir="$R/methods_e30")
log() { echo "$(date '+%F %T') $*"; }

# The seeds' 40% Taylor runs Torch-Pruning is compared on: those here or measured before.
peer_runs() {
  for s in 0 1 2; do
    local run="$R/methods_e30/taylor_fo_bn_r40_s$s"
    if [ -f "$run/report.json" ] || grep -qs "^taylor_fo_bn_r40_s$s,taylor," "$RES/peer_torch_pruning.csv"; then
      echo "$run"
    fi
  done
}

# One compound command ending in exit: bash has read all of it before it runs, so editing this
# file while a study runs cannot change what it does next.
{
case "${1:-}" in
  0|1|2)
    S=$1
    log "seed $S: 1. baseline (30 epochs)"
    $PY experiments/converged_baselines.py --runs=15:0,30:0,chosen:$S --runs_dir="$R/converged"
    log "seed $S: 2. Taylor-FO-BN, 40%"
    $PY experiments/compare_methods.py "${GRID[@]}" --methods=taylor_fo_bn --reductions=0.4 \
        --seeds=$S --results_name=methods_converged_s$S
    log "seed $S: 3. Torch-Pruning GroupTaylor from the same weights"
    $PY experiments/peer_torch_pruning.py $(peer_runs) --importances=taylor \
        --work="$R/peer_torch_pruning_e30" --out=$RES/peer_torch_pruning
    log "seed $S: 4. the weight-Taylor criterion in the same protocol"
    $PY experiments/compare_methods.py "${GRID[@]}" --reductions=0.4 --seeds=$S \
        --methods=taylor_fo_bn,estimator/taylor_fo_weight --results_name=why_grouptaylor_converged_s$S
    log "seed $S: 5. oracle correlation"
    $PY experiments/oracle_correlation.py --configs=configs/fashion_mnist_baseline.py \
        --epochs=resnet20=30 --baseline_dir="$R/converged/resnet20_e{epochs:g}_s{seed}" \
        --seeds=$S --prefix=oracle_correlation_converged_s$S
    log "seed $S: 6. the grid"
    $PY experiments/compare_methods.py "${GRID[@]}" --seeds=$S --results_name=methods_converged_s$S
    log "seed $S: 7. Torch-Pruning's magnitude and BN-scale importances"
    $PY experiments/peer_torch_pruning.py $(peer_runs) --importances=taylor,magnitude,bn_scale \
        --work="$R/peer_torch_pruning_e30" --out=$RES/peer_torch_pruning
    log "seed $S done" ;;
  summary)
    # Only reads: runs finished here or recorded; the others are listed under the table.
    $PY experiments/compare_methods.py "${GRID[@]}" --seeds=0,1,2 --other_seeds=${2:-1} \
        --recorded_only --results_name=methods_converged
    $PY experiments/peer_torch_pruning.py $(peer_runs) --importances=taylor,magnitude,bn_scale \
        --work="$R/peer_torch_pruning_e30" --out=$RES/peer_torch_pruning ;;
  *)
    echo "usage: bash experiments/converged_study.sh 0|1|2|summary (see the comment at the top)" >&2
    exit 2 ;;
esac
exit
}
