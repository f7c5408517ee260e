#!/usr/bin/env bash
# Reports import cycles between the modules of mailroom-broker, mailroom-amqp, mailroom and mailroom-http
# (strongly connected components of the module graph); exits 1 if there is any. Run from the repo root.
# `--graph` also prints every edge. See scripts/check_cycles.py for what counts as an edge.
set -euo pipefail
exec python3 "$(dirname "$0")/check_cycles.py" "$@"
