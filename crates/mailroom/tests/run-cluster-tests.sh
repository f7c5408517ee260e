#!/usr/bin/env bash
# Runs the SDK's cluster tests (tests/cluster.rs) against a 3-node RabbitMQ cluster on this machine:
# brings it up with ../shared/tools/rmq-cluster.sh (nodes on 127.0.0.1:5681-5683), runs the tests,
# and brings it down again, whatever the outcome. Extra arguments go to `cargo test`.
#   MAILROOM_CLUSTER_CTL   the cluster script (default: <repo>/../shared/tools/rmq-cluster.sh)
#   KEEP_CLUSTER=1         leave the cluster running afterwards
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
ctl="${MAILROOM_CLUSTER_CTL:-$repo/../shared/tools/rmq-cluster.sh}"
[ -x "$ctl" ] || { echo "cluster script not found: $ctl (set MAILROOM_CLUSTER_CTL)" >&2; exit 2; }
export MAILROOM_CLUSTER_CTL="$ctl"

if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
  trap '"$ctl" down || true' EXIT
fi
"$ctl" up
MAILROOM_CLUSTER_URLS="$("$ctl" urls | paste -sd, -)"
export MAILROOM_CLUSTER_URLS
echo "cluster: $MAILROOM_CLUSTER_URLS" >&2

cd "$repo"
# One test at a time (they kill nodes), with their progress lines shown.
timeout 1200 cargo test -p mailroom --test cluster "$@" -- --test-threads=1 --nocapture
