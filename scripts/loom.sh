#!/usr/bin/env bash
# Runs the loom models of the driver's shared-memory primitives (sync/tests/loom.rs): the crate
# `sabot-sync` alone, built with `--cfg loom` in its own target directory (a loom build
# recompiles every dependency it has; this crate has only loom's). Fails if any model fails.
# Each model has its own preemption bound (see the test file); LOOM_MAX_PREEMPTIONS overrides them.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sabot/target}-loom"
export RUSTFLAGS="--cfg loom"
started=$SECONDS
# One test thread: the models are CPU-bound and the machine may be shared.
cargo test --release -p sabot-sync --test loom -- --test-threads=1 --nocapture "$@"
echo "loom models passed in $((SECONDS - started)) s"
