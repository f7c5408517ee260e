#!/bin/sh
# Prepares what the client-compatibility suite (pytest tests/compat) needs on this machine; safe to re-run.
#  - Node: `npm ci` in tests/compat/node (amqplib, pinned by package-lock.json).
#  - Go: builds tests/compat/go offline against Debian's amqp091-go into tests/compat/go/bin (gitignored).
#  - C: amqp-tools from Debian.
#  - Python: aio-pika comes from tests/requirements.txt (pip install -r into the venv).
# Missing Debian packages are installed when running as root with apt; otherwise one line per missing tool
# says what to install. Then every tests/compat/setup.d/*.sh runs (other stacks add theirs there).
set -u
here=$(cd "$(dirname "$0")" && pwd)
status=0

can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

# Installs the Debian packages given when missing and possible; returns 1 if any stays missing.
need_debs() {
    absent=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || absent="$absent $p"
    done
    [ -z "$absent" ] && return 0
    if can_apt; then
        # A fresh machine's package lists may be empty or old: refresh them once per run.
        if [ -z "${apt_updated:-}" ]; then
            apt-get update -q >/dev/null 2>&1 || true
            apt_updated=1
        fi
        echo "compat setup: apt-get install -y$absent"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $absent >/dev/null && return 0
    fi
    for p in $absent; do echo "compat setup: missing Debian package $p (apt-get install $p)"; done
    return 1
}

# Node (amqplib).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    command -v dpkg-query >/dev/null 2>&1 && need_debs nodejs npm
fi
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    if (cd "$here/node" && npm ci --no-audit --no-fund --silent); then
        echo "compat setup: node $(node --version), amqplib installed in tests/compat/node"
    else
        echo "compat setup: npm ci failed in tests/compat/node"; status=1
    fi
else
    echo "compat setup: missing node and npm (Node 18+; e.g. apt-get install nodejs npm)"; status=1
fi

# Go (amqp091-go from Debian, built offline).
if command -v dpkg-query >/dev/null 2>&1; then
    need_debs golang-go golang-github-rabbitmq-amqp091-go-dev || status=1
fi
if command -v go >/dev/null 2>&1 && [ -d /usr/share/gocode/src/github.com/rabbitmq/amqp091-go ]; then
    if sh "$here/go/build.sh"; then
        echo "compat setup: built tests/compat/go/bin/compat-go ($(go version | cut -d' ' -f3))"
    else
        echo "compat setup: the Go program failed to build"; status=1
    fi
else
    echo "compat setup: missing go or amqp091-go (golang-go, golang-github-rabbitmq-amqp091-go-dev)"; status=1
fi

# C (amqp-tools).
if command -v dpkg-query >/dev/null 2>&1; then
    need_debs amqp-tools || status=1
elif ! command -v amqp-publish >/dev/null 2>&1; then
    echo "compat setup: missing amqp-tools (amqp-publish, amqp-consume, amqp-get, amqp-declare-queue)"; status=1
fi

# Python (aio-pika): installed with tests/requirements.txt.
py="$here/../../.venv/bin/python"
[ -x "$py" ] || py=python3
if ! "$py" -c "import aio_pika" 2>/dev/null; then
    echo "compat setup: missing aio-pika for $py (pip install -r tests/requirements.txt)"; status=1
fi

for extra in "$here"/setup.d/*.sh; do
    [ -e "$extra" ] || continue
    echo "compat setup: running setup.d/$(basename "$extra")"
    # Each script names its own interpreter (java.sh needs bash).
    if [ -x "$extra" ]; then "$extra" || status=1; else sh "$extra" || status=1; fi
done
exit $status
