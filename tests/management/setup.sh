#!/bin/sh
# Prepares what the management API tests (tests/amqp/test_management_api.py, test_rabbitmqadmin.py) need;
# safe to re-run.
#  - rabbitmqadmin v2 (RabbitMQ's CLI for the management API) from crates.io into ~/.cargo/bin; it builds
#    for several minutes, at low priority.
#  - `setup.sh oracle` also starts a throwaway RabbitMQ node with the management plugin (see
#    rabbitmq-oracle.sh) when no RabbitMQ management API answers at $RABBITMQ_MGMT_URL: the tests compare
#    Mailroom's answers with it.
set -u
here=$(cd "$(dirname "$0")" && pwd)
RABBITMQADMIN_VERSION=2.35.0
status=0

if command -v rabbitmqadmin >/dev/null 2>&1 && rabbitmqadmin --version 2>/dev/null | grep -q "^rabbitmqadmin 2\."; then
    echo "management setup: $(rabbitmqadmin --version)"
elif [ -x "$HOME/.cargo/bin/rabbitmqadmin" ]; then
    echo "management setup: $("$HOME/.cargo/bin/rabbitmqadmin" --version) in ~/.cargo/bin"
elif command -v cargo >/dev/null 2>&1; then
    echo "management setup: cargo install rabbitmqadmin@$RABBITMQADMIN_VERSION (takes a while)"
    nice -n 19 cargo install --locked "rabbitmqadmin@$RABBITMQADMIN_VERSION" -j 1 || status=1
else
    echo "management setup: missing cargo (needed to install rabbitmqadmin v2)"; status=1
fi

if [ "${1:-}" = oracle ]; then
    "$here/rabbitmq-oracle.sh" start || status=1
fi
exit $status
