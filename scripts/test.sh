#!/usr/bin/env bash
# Sets up the machine if needed, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
set -euo pipefail
exec cargo test --workspace "$@"
