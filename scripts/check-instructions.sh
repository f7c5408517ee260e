#!/usr/bin/env bash
# Counts the instructions of the hot paths (parse a publish, route it to one and to four queues, deliver,
# ack) under callgrind and compares them with bench/instructions.baseline. Instruction counts, never
# wall-clock time: they repeat on a noisy shared machine.
#
#   scripts/check-instructions.sh                  compare; exit 1 if a scenario costs > 3% more per operation
#   scripts/check-instructions.sh --tolerance 2    ... with another limit (percent; may be negative)
#   scripts/check-instructions.sh --record         rewrite the baseline from this run
#   scripts/check-instructions.sh --baseline FILE  use another baseline file
#   scripts/check-instructions.sh --runs 5         run each scenario 5 times and take the median
#
# The workloads are crates/mailroom-hotpath (one subcommand per scenario, a fixed warm-up then a fixed number
# of operations inside a `measure_<scenario>` function); callgrind counts only that function and its callees
# (--collect-atstart=no --toggle-collect). Per operation = the count / the operations. Most scenarios count
# the same on every run; a scenario that inserts into a hash map with a randomly seeded hasher may vary a
# little (when tables rehash). The queue's per-message maps (bodies, unacked) use an unseeded id hasher;
# deliver_ack still runs 400 rounds (it once varied by 0.8% over 50); --runs takes a median over several runs.
#
# Counts depend on the compiler: when rustc's version differs from the baseline's, the table is shown but
# nothing fails (re-record with --record on the commit you compare against). Installs valgrind (apt-get,
# as root on Debian) when it is missing; exit 2 when it cannot, or on any other setup failure.
set -euo pipefail
cd "$(dirname "$0")/.."

BASELINE=bench/instructions.baseline
TOLERANCE=3
RECORD=0
RUNS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --record) RECORD=1 ;;
    --tolerance) TOLERANCE="${2:?--tolerance needs a percentage}"; shift ;;
    --tolerance=*) TOLERANCE="${1#*=}" ;;
    --baseline) BASELINE="${2:?--baseline needs a file}"; shift ;;
    --baseline=*) BASELINE="${1#*=}" ;;
    --runs) RUNS="${2:?--runs needs a count}"; shift ;;
    --runs=*) RUNS="${1#*=}" ;;
    -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$TOLERANCE" =~ ^-?[0-9]+(\.[0-9]+)?$ ]]; then
  echo "--tolerance takes a number of percent, not '$TOLERANCE'" >&2
  exit 2
fi
if ! [[ "$RUNS" =~ ^[1-9][0-9]*$ ]]; then
  echo "--runs takes a positive count, not '$RUNS'" >&2
  exit 2
fi

if ! command -v valgrind >/dev/null 2>&1; then
  source scripts/services.sh
  svc_install "valgrind (for callgrind instruction counts)" valgrind || {
    echo "valgrind is missing and cannot be installed here: no instruction counts" >&2
    exit 2
  }
fi

# The release profile keeps line-level debug info (debug = 1), so callgrind sees function names. The
# workspace target dir is reused: only the harness and what it depends on are built.
export CARGO_INCREMENTAL=0
cargo build --release --locked --quiet -p mailroom-hotpath
BIN=target/release/mailroom-hotpath

RUSTC="$(rustc --version)"
VALGRIND="$(valgrind --version)"
COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
# Uncommitted changes to what is built make the counts those of no commit.
if [ -n "$(git status --porcelain --untracked-files=no -- crates Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  COMMIT="$COMMIT+uncommitted"
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Scenario lines: name, function, operations, what it does (tab-separated).
"$BIN" list >"$WORK/scenarios"
: >"$WORK/now"
# count NAME FUNCTION OPS: one callgrind run; prints the instructions counted in FUNCTION.
count() {
  local name="$1" function="$2" ops="$3" out="$WORK/$1.callgrind" total
  if ! valgrind --tool=callgrind --collect-atstart=no --toggle-collect="*::$function" \
    --callgrind-out-file="$out" "$BIN" "$name" </dev/null >"$WORK/$name.stdout" 2>"$WORK/$name.log"; then
    echo "$name: the harness failed under valgrind:" >&2
    tail -n 20 "$WORK/$name.log" >&2
    return 2
  fi
  total="$(awk '$1 == "totals:" {print $2}' "$out")"
  if [ -z "$total" ] || [ "$total" = 0 ]; then
    echo "$name: callgrind counted nothing in $function (renamed, or inlined away?)" >&2
    return 2
  fi
  if ! grep -qx "$name	iterations=$ops" "$WORK/$name.stdout"; then
    echo "$name: the harness did not report $ops operations" >&2
    return 2
  fi
  echo "$total"
}

# "now" lines: scenario, instructions per operation (median of the runs), spread of the runs in percent.
while IFS=$'\t' read -r name function ops _about; do
  totals=()
  for ((run = 0; run < RUNS; run++)); do
    total="$(count "$name" "$function" "$ops")" || exit 2
    totals+=("$total")
  done
  printf '%s\n' "${totals[@]}" | sort -n | awk -v n="$name" -v o="$ops" '
    { t[NR] = $1 }
    END {
      m = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
      printf "%s %.1f %.2f\n", n, m / o, (t[NR] - t[1]) / m * 100
    }' >>"$WORK/now"
done <"$WORK/scenarios"

if [ "$RECORD" = 1 ]; then
  {
    echo "# Hot-path instructions per operation (callgrind Ir / operations), written by"
    echo "# scripts/check-instructions.sh --record and compared by scripts/check-instructions.sh."
    echo "# Re-record when rustc changes. The scenarios and their operations: target/release/mailroom-hotpath list."
    echo "rustc $RUSTC"
    echo "valgrind $VALGRIND"
    echo "commit $COMMIT"
    echo "runs $RUNS (median)"
    awk '{print "scenario", $1, $2}' "$WORK/now"
  } >"$BASELINE"
  echo "recorded $BASELINE ($RUSTC, commit $COMMIT, median of $RUNS run(s)):"
  awk -v runs="$RUNS" '{printf "  %-18s %12.1f%s\n", $1, $2, (runs > 1) ? sprintf("   spread %.2f%%", $3) : ""}' "$WORK/now"
  exit 0
fi

if [ ! -f "$BASELINE" ]; then
  echo "no baseline at $BASELINE: record one with --record" >&2
  awk '{printf "  %-18s %12.1f\n", $1, $2}' "$WORK/now"
  exit 2
fi
base_rustc="$(sed -n 's/^rustc //p' "$BASELINE")"
base_valgrind="$(sed -n 's/^valgrind //p' "$BASELINE")"
base_commit="$(sed -n 's/^commit //p' "$BASELINE")"
echo "baseline: $BASELINE (commit $base_commit, $base_rustc, $base_valgrind)"
echo "now:      commit $COMMIT, $RUSTC, $VALGRIND; median of $RUNS run(s); tolerance ${TOLERANCE}%"
[ "$base_valgrind" = "$VALGRIND" ] || echo "note: another valgrind version than the baseline's"

# One row per scenario in the baseline or now; a regression is a scenario over the tolerance, or one the
# baseline has and the harness no longer runs (a hot path that stopped being measured).
set +e
awk -v tol="$TOLERANCE" -v runs="$RUNS" '
  FNR == NR { if ($1 == "scenario") { base[$2] = $3; order[++n] = $2 } ; next }
  { now[$1] = $2; spread[$1] = $3; if (!($1 in base)) order[++n] = $1 }
  END {
    printf "%-18s %12s %12s %9s%s\n", "scenario", "baseline", "now", "delta", (runs > 1) ? "   spread" : ""
    bad = 0
    for (i = 1; i <= n; i++) {
      s = order[i]
      if (!(s in now)) { printf "%-18s %12.1f %12s %9s  MISSING\n", s, base[s], "-", "-"; bad = 1; continue }
      if (!(s in base)) { printf "%-18s %12s %12.1f %9s  new (not in the baseline)\n", s, "-", now[s], "-"; continue }
      d = (now[s] - base[s]) / base[s] * 100
      flag = ""
      if (d > tol) { flag = "  REGRESSION"; bad = 1 }
      sp = (runs > 1) ? sprintf(" %8.2f%%", spread[s]) : ""
      printf "%-18s %12.1f %12.1f %+8.2f%%%s%s\n", s, base[s], now[s], d, sp, flag
    }
    exit bad
  }' "$BASELINE" "$WORK/now"
worse=$?
set -e

if [ "$base_rustc" != "$RUSTC" ]; then
  echo "rustc differs from the baseline's ($RUSTC, baseline: $base_rustc): counts are not comparable," \
    "so nothing fails; re-record the baseline with --record"
  exit 0
fi
if [ "$worse" != 0 ]; then
  echo "FAILED: instructions per operation rose more than ${TOLERANCE}% (or a scenario went missing)"
  exit 1
fi
echo "OK: every scenario within ${TOLERANCE}% of the baseline"
