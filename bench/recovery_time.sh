#!/usr/bin/env bash
# Measures Mailroom's recovery time: fills a durable queue with persistent messages (confirmed), kills the
# broker with SIGKILL, restarts it on the same data dir and times until it accepts connections again.
#
#   bench/recovery_time.sh [GIB=1] [SIZE=1024]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GIB=${1:-1}
SIZE=${2:-1024}
BIN=${MAILROOM_BIN:-$ROOT/target/release/mailroom}
PORT=${PORT:-5677}
DATA=$(mktemp -d -t mailroom-recovery.XXXXXX)
COUNT=$(( GIB * 1024 * 1024 * 1024 / SIZE ))
trap 'kill -9 $PID 2>/dev/null || true; rm -rf "$DATA"' EXIT

wait_port() { for _ in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0; sleep 0.05; done; return 1; }

"$BIN" server --amqp-listen 127.0.0.1:$PORT --data-dir "$DATA" --log-level warn & PID=$!
wait_port
"$BIN" bench --uri amqp://guest:guest@127.0.0.1:$PORT/%2F --producers 1 --consumers 0 --size "$SIZE" \
    --persistent --confirm 1000 --count "$COUNT" --queue-name recovery | tail -1
echo "segments: $(du -sh "$DATA/msgs" | cut -f1)"
kill -9 $PID; wait $PID 2>/dev/null || true
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(page cache not dropped: not root?)"
start=$(date +%s.%N)
"$BIN" server --amqp-listen 127.0.0.1:$PORT --data-dir "$DATA" --log-level warn & PID=$!
wait_port
end=$(date +%s.%N)
echo "RESULT messages=$COUNT size=$SIZE recovery_s=$(echo "$end - $start" | bc) rss_kib=$(awk '/VmRSS/{print $2}' /proc/$PID/status)"
