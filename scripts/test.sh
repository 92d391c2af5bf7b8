#!/usr/bin/env bash
# Install what is missing, prepare the real CIFAR-10 and Imagenette, run the whole test suite.
# --quick runs only the fast tier (unit tests and one 2-rank end-to-end run, under 5 minutes).
# Extra arguments go to pytest (e.g. ./scripts/test.sh -k comm).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/install.sh
source scripts/env.sh
prepare_cifar10
prepare_imagenette
if [ "${1:-}" = "--quick" ]; then
  shift
  exec python -m pytest tests -m quick "$@"
fi
exec python -m pytest tests "$@"
