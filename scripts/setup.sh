#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine: Debian's Fashion-MNIST, a virtual environment from
# requirements.txt, and the prepared TFDS dataset. Every step is skipped when already done.
# --test: also the test-only requirements-test.txt (PyTorch), as scripts/run_tests.sh asks.
set -euo pipefail
WITH_TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

if [ ! -f "$FMNIST" ]; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
STAMP=.venv/.requirements.sha256
WANT=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing requirements.txt into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$WANT" > "$STAMP"
fi
if [ "$WITH_TEST" = 1 ]; then
  TEST_STAMP=.venv/.requirements-test.sha256
  TEST_WANT=$(sha256sum requirements-test.txt | cut -d' ' -f1)
  if [ ! -f "$TEST_STAMP" ] || [ "$(cat "$TEST_STAMP")" != "$TEST_WANT" ]; then
    echo "[setup] installing requirements-test.txt into .venv"
    .venv/bin/python -m pip install -q -r requirements-test.txt
    echo "$TEST_WANT" > "$TEST_STAMP"
  fi
fi

# taylor_jax itself, editable (pyproject.toml): scripts and a user's own code import this checkout
# without PYTHONPATH. -I: the check must not find it through the current directory.
if ! .venv/bin/python -I -c "import sys, taylor_jax; sys.exit(not taylor_jax.__file__.startswith('$ROOT/'))" 2>/dev/null; then
  echo "[setup] installing taylor_jax (editable) into .venv"
  # setuptools warns about the flat layout on every editable build: shown only on failure.
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . > .venv/editable.log 2>&1 \
    || { cat .venv/editable.log; exit 1; }
fi

# Prepares the project's TFDS builder for Debian's IDX files (no-op when already prepared).
.venv/bin/python -m taylor_jax.data.prepare
