#!/usr/bin/env bash
# Set up (idempotent, test requirements included) and run the whole test suite. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test  # --test: also requirements-test.txt (PyTorch)
exec .venv/bin/python -m pytest -n 2 --dist loadgroup -q "$@" tests
