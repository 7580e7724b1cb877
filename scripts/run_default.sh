#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default data (Fashion-MNIST).
# Report: runs/default/report.json. Extra flags go to taylor_jax.main, e.g. --config.train.epochs=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m taylor_jax.main --config=configs/default.py --workdir=runs/default "$@"
