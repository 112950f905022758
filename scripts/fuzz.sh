#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/README.md) for a fixed time each, from a fixed seed, and
# fails if any of them crashes (a panic, a sanitizer report, a timeout, running out of memory).
#
#   bash scripts/fuzz.sh [seconds per target, default 20]
#
# Each target starts from its checked-in seeds (fuzz/corpus/<target>/seed-*) in a fresh corpus
# directory, so a run neither depends on nor changes what earlier runs found. A crash is saved
# under fuzz/artifacts/<target>/ and the command that replays it is printed. Builds use their own
# target directory, ${CARGO_TARGET_DIR:-$HOME/.cache/sabot/target}-fuzz (nightly, sanitizers).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: bash scripts/fuzz.sh [seconds per target]" >&2
  exit 2
fi
started=$SECONDS
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sabot/target}-fuzz"

# cargo-fuzz needs nightly features: the nightly toolchain if there is one, else the stable one
# told to allow them.
if cargo +nightly --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cd fuzz
echo "== building every target (${CARGO_TARGET_DIR})"
"${fuzz[@]}" build
mapfile -t targets < <("${fuzz[@]}" list)

# Per target libFuzzer options. The cluster target's inputs are fault plans: without length
# control its inputs reach their full size at once (a run is too short to grow them).
options_of() {
  case "$1" in
    cluster) echo "-len_control=0 -max_len=256" ;;
    *) echo "" ;;
  esac
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
summary=()
for target in "${targets[@]}"; do
  echo "== ${target}: ${seconds} s"
  mkdir -p "$work/$target" "corpus/$target"
  log="$work/$target.log"
  # shellcheck disable=SC2046 # the options are words
  if "${fuzz[@]}" run "$target" "$work/$target" "corpus/$target" -- \
    -seed=1 -max_total_time="$seconds" -print_final_stats=1 $(options_of "$target") >"$log" 2>&1; then
    stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 | sed -E 's/^#([0-9]+).*exec\/s: ([0-9]+).*/\1 runs, \2 exec\/s/')
    summary+=("${target}: ${stats:-no stats}")
    echo "   ${stats:-no stats}"
  else
    failed+=("$target")
    summary+=("${target}: CRASHED")
    tail -n 60 "$log"
    artifact=$(grep -oE 'fuzz/artifacts/[^ ]+' "$log" | tail -1 || true)
    echo "   ${target} crashed; replay: cd fuzz && cargo +nightly fuzz run ${target} ${artifact#fuzz/}"
  fi
done

echo "== done in $((SECONDS - started)) s"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "crashed: ${failed[*]}"
  exit 1
fi
