#!/usr/bin/env bash
# Runs every test: Rust unit/integration/property tests (nextest + doctests), then the pika and celery
# suites against a freshly built Mailroom and the RabbitMQ at $RABBITMQ_URL (the oracle).
# Installs what it needs: cargo-nextest if missing, a Python venv with tests/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# --all-features: the SDK's `postgres` feature is off by default; its tests need it.
echo "== building (debug; the Python suites use target/debug/mailroom)"
cargo build --workspace --all-targets --all-features --locked

echo "== Rust tests"
cargo nextest run --workspace --all-features --locked --no-fail-fast
cargo test --workspace --all-features --doc --locked

echo "== SDK packaging: scratch applications (default / AMQP-only features), cargo package, MSRV"
scripts/check-sdk-consumers.sh
scripts/check-msrv.sh

echo "== Python environment"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt

# RabbitMQ is the oracle: every protocol test runs against it too. Without it (a laptop with no
# RabbitMQ), run Mailroom only, loudly; CI always has it and requires it.
RABBITMQ_URL="${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}"
export RABBITMQ_URL
if [ -z "${AMQP_TARGETS:-}" ]; then
  if .venv/bin/python -c "import pika,sys; pika.BlockingConnection(pika.URLParameters(sys.argv[1])).close()" "$RABBITMQ_URL" 2>/dev/null; then
    export AMQP_TARGETS=mailroom,rabbitmq
  elif [ "${CI:-}" = "true" ]; then
    echo "RabbitMQ is not reachable at $RABBITMQ_URL; CI requires it" >&2
    exit 1
  else
    echo "WARNING: RabbitMQ not reachable at $RABBITMQ_URL: running the protocol suites against Mailroom only" >&2
    export AMQP_TARGETS=mailroom
  fi
fi

echo "== protocol suites (targets: $AMQP_TARGETS)"
.venv/bin/pytest tests/amqp tests/celery -q -p no:cacheprovider
