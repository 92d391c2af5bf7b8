#!/usr/bin/env bash
# Install what is missing, prepare the real CIFAR-10, run the whole test suite.
# Extra arguments go to pytest (e.g. ./scripts/test.sh -k comm).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/install.sh
source scripts/env.sh
prepare_cifar10
exec python -m pytest tests "$@"
