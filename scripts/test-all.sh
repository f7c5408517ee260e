#!/usr/bin/env bash
# Runs every test: Rust unit/integration/property tests (nextest + doctests), then the pika, celery and
# (when present) client-compatibility suites against a freshly built Mailroom and the RabbitMQ at
# $RABBITMQ_URL (the oracle).
#
# Installs what it needs: cargo-nextest if missing, a Python venv with tests/requirements.txt, and
# (as root on Debian) a C compiler, RabbitMQ and PostgreSQL when they are missing, which it starts on
# free ports and stops at the end (scripts/services.sh), plus whatever tests/compat/setup.sh and
# tests/ui/setup.sh (Chromium, playwright-core) install, and valgrind for the hot-path instruction
# counts (scripts/check-instructions.sh).
# A service that is missing and cannot be installed: the tests that need it are skipped (one line
# each) and the summary says so; with CI=true that is an error.
#
# Knobs: RABBITMQ_URL, MAILROOM_PG_URL (use these services, install nothing for them), AMQP_TARGETS
# (the Python suites' targets), MAILROOM_INSTALL=0 (never install), CI=true (every service required).
# Every phase runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
trap svc_stop_all EXIT
trap 'exit 130' INT TERM

export CARGO_TERM_COLOR=never
LOGS=target/test-all
mkdir -p "$LOGS"
FAILED=()    # phases that failed
started=$SECONDS

# run NAME CMD...: runs a phase, output to the terminal and $LOGS/NAME.log; records a failure.
run() {
  local name="$1"
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || FAILED+=("$name (exit $rc)")
  return "$rc"
}

# A stopped phase a later one cannot do without: summary and exit.
give_up() {
  echo "== stopping: $*" >&2
  exit 1
}

echo "== tools"
# The debug and release builds take several GiB; say so up front rather than fail mid-link.
free_kib=$(df -Pk . | awk 'NR==2 {print $4}')
echo "free disk here: $((free_kib / 1024 / 1024)) GiB"
[ "${free_kib:-0}" -ge $((8 * 1024 * 1024)) ] || echo "WARNING: under 8 GiB free; the builds may run out of disk" >&2
command -v cc >/dev/null || svc_install "a C compiler (cc, to link the Rust tests)" gcc libc6-dev || give_up "no cc"
python3 -c 'import ensurepip' 2>/dev/null || svc_install "python3 -m venv" python3-venv || give_up "no python3 venv"
command -v promtool >/dev/null || svc_install "promtool (checks the Prometheus pages in the metrics tests)" prometheus || echo "no promtool: the metrics tests skip their promtool check"
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install --locked cargo-nextest || give_up "cargo install cargo-nextest failed"
fi

echo "== services"
have_rabbitmq=1 have_postgres=1
svc_rabbitmq || have_rabbitmq=0
svc_postgres || have_postgres=0
if [ "${CI:-}" = "true" ] && [ ${#SVC_SKIPPED[@]} -gt 0 ]; then
  printf 'CI=true requires every service: %s\n' "${SVC_SKIPPED[@]}" >&2
  exit 1
fi
for s in "${SVC_SKIPPED[@]}"; do
  echo "WARNING: $s: the tests that need it are skipped" >&2
done
# The Rust tests probe these themselves (and skip with one line when unreachable); a service found
# missing here is missing for them too, whatever answers on its default port.
missing=()
[ "$have_rabbitmq" = 0 ] && missing+=(rabbitmq)
[ "$have_postgres" = 0 ] && missing+=(postgres)
MAILROOM_MISSING_SERVICES="$(IFS=,; echo "${missing[*]}")"
export MAILROOM_MISSING_SERVICES
export RABBITMQ_URL="${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}"
export MAILROOM_PG_URL="${MAILROOM_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"

# rabbitmqadmin v2 for tests/amqp/test_rabbitmqadmin.py (cargo install on a fresh machine), and a
# throwaway RabbitMQ node with the management plugin that the management API tests compare against
# (never the shared node's plugins: see tests/management/rabbitmq-oracle.sh).
export PATH="$HOME/.cargo/bin:$PATH"
# Stop the oracle at the end only if this run started it (another run may be using one already there).
oracle_was_up=0
sh tests/management/rabbitmq-oracle.sh status && oracle_was_up=1
if run management-setup sh tests/management/setup.sh oracle; then
  export RABBITMQ_MGMT_URL="${RABBITMQ_MGMT_URL:-http://127.0.0.1:35672}"
  [ "$oracle_was_up" = 1 ] || SVC_STOPS+=("sh tests/management/rabbitmq-oracle.sh stop")
fi

# --all-features: the SDK's `postgres` feature is off by default; its tests need it.
run build cargo build --workspace --all-targets --all-features --locked || give_up "the build failed"

# Tests that return early because a service is missing write one line each here (tests/common).
export MAILROOM_SKIP_LOG="$PWD/$LOGS/rust-skipped.txt"
: >"$MAILROOM_SKIP_LOG"
run rust cargo nextest run --workspace --all-features --locked --no-fail-fast
run doctests cargo test --workspace --all-features --doc --locked
# The SDK as a dependency: scratch applications (default / AMQP-only features), cargo package, MSRV.
run sdk-consumers scripts/check-sdk-consumers.sh
run msrv scripts/check-msrv.sh
# Hot-path instruction counts (callgrind) against bench/instructions.baseline: fails on a scenario over 3%.
# A release build of crates/mailroom-hotpath in the shared target dir, then about a minute under valgrind.
if command -v valgrind >/dev/null 2>&1 || svc_install "valgrind (for the hot-path instruction counts)" valgrind; then
  run instructions scripts/check-instructions.sh
else
  SVC_SKIPPED+=("valgrind: the hot-path instruction counts (scripts/check-instructions.sh) were not checked")
  [ "${CI:-}" = "true" ] && FAILED+=("instructions (valgrind missing and CI=true)")
fi
# Fuzzing, briefly (FUZZ_SECONDS per target, default 60) on stable Rust; long runs are in SECURITY.md.
if command -v c++ >/dev/null 2>&1 || svc_install "a C++ compiler (builds libFuzzer for the fuzz targets)" g++; then
  run fuzz scripts/fuzz-brief.sh
else
  SVC_SKIPPED+=("c++: the fuzz targets (scripts/fuzz-brief.sh) were not run, libFuzzer needs a C++ compiler")
  [ "${CI:-}" = "true" ] && FAILED+=("fuzz (no C++ compiler and CI=true)")
fi

echo "== Python environment"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || give_up "python3 -m venv failed"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt || give_up "pip install failed"

# RabbitMQ is the oracle: every protocol test runs against it too when it is there.
if [ -z "${AMQP_TARGETS:-}" ]; then
  if [ "$have_rabbitmq" = 1 ]; then
    export AMQP_TARGETS=mailroom,rabbitmq
  else
    export AMQP_TARGETS=mailroom
  fi
fi
suites=(tests/amqp tests/celery tests/management)
if [ -d tests/compat ]; then
  # After the venv: the compat setup checks aio-pika there.
  run compat-setup bash tests/compat/setup.sh
  suites+=(tests/compat)
fi
run python .venv/bin/pytest "${suites[@]}" -q -p no:cacheprovider
# The web UI in Debian's headless Chromium (setup installs it and playwright-core as root; else the test
# skips with the reason).
run ui-setup sh tests/ui/setup.sh
run ui .venv/bin/pytest tests/ui -q -p no:cacheprovider -rs

echo
echo "== summary ($((SECONDS - started)) s)"
nextest_line="$(grep -E '^ *Summary \[' "$LOGS/rust.log" 2>/dev/null | tail -n 1 | sed 's/^ *//')"
echo "Rust (nextest): ${nextest_line:-no summary line, see $LOGS/rust.log}"
skipped_rust=$(wc -l <"$MAILROOM_SKIP_LOG")
if [ "$skipped_rust" -gt 0 ]; then
  echo "  of those, $skipped_rust returned early, skipped for a missing service:"
  sed -E 's/^SKIP .*: needs ([A-Za-z]+) \(.*/needs \1/' "$MAILROOM_SKIP_LOG" | sort | uniq -c | sed 's/^ */    /'
  echo "  (each line: $MAILROOM_SKIP_LOG)"
fi
echo "Doctests: $(grep -E '^test result:' "$LOGS/doctests.log" 2>/dev/null | awk '{p+=$4; f+=$6; i+=$8} END {print p" passed, "f" failed, "i" ignored"}')"
[ -f "$LOGS/instructions.log" ] && echo "Instructions: $(tail -n 1 "$LOGS/instructions.log")"
echo "Python ($AMQP_TARGETS; ${suites[*]}): $(tail -n 1 "$LOGS/python.log" 2>/dev/null | tr -d '=' | sed 's/^ *//')"
echo "Web UI (tests/ui, Chromium): $(tail -n 1 "$LOGS/ui.log" 2>/dev/null | tr -d '=' | sed 's/^ *//')"
if [ "$AMQP_TARGETS" = mailroom ] && [ "$have_rabbitmq" = 0 ]; then
  echo "  the RabbitMQ (oracle) half of every Python test was skipped: RabbitMQ is missing"
fi
for s in "${SVC_SKIPPED[@]}"; do
  echo "Skipped for a missing service: $s"
done
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "OK"
