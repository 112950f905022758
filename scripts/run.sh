#!/usr/bin/env bash
# Sets up the machine if needed, then runs `sabot run` (release build) with the given flags.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
set -euo pipefail
exec cargo run --release --quiet --bin sabot -- run "$@"
