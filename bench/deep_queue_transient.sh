#!/usr/bin/env bash
# Transient deep queue (issue 5): fill a non-durable queue with COUNT transient 1 KiB messages (confirmed),
# then drain; bodies past the budget go to <data dir>/paging.
#
#   bench/deep_queue_transient.sh [COUNT=2000000]
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${MAILROOM_BIN:-$ROOT/target/release/mailroom}; COUNT=${1:-2000000}; PORT=5694; HPORT=15694
DATA=/tmp/deep-t; rm -rf $DATA; mkdir -p $DATA
LOG=/tmp/deep-t-rss-$COUNT.log; : > $LOG
sample() { while kill -0 $1 2>/dev/null; do echo "$2 $(date +%s) $(ps -o rss= -p $1)" >> $LOG; sleep 1; done; }
wait_port() { for _ in $(seq 1 3000); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0; sleep 0.05; done; return 1; }
$BIN server --amqp-listen 127.0.0.1:$PORT --http-listen 127.0.0.1:$HPORT --data-dir $DATA --log-level warn > /tmp/deep-t-server.log 2>&1 & PID=$!
wait_port; sample $PID fill & S=$!
$BIN bench --uri amqp://guest:guest@127.0.0.1:$PORT/%2F --producers 1 --consumers 0 --size 1024 --confirm 1000 --count $COUNT --queue-name tdeep --broker-pid $PID | tail -1
echo "after fill rss_kib=$(ps -o rss= -p $PID) paging=$(du -sh $DATA/paging 2>/dev/null | cut -f1) $(curl -s -u guest:guest http://127.0.0.1:$HPORT/api/queues | grep -o "\"message_bytes_ram\":[0-9]*")"
kill $S; sample $PID drain & S=$!
$BIN bench --uri amqp://guest:guest@127.0.0.1:$PORT/%2F --producers 0 --consumers 1 --prefetch 1000 --multiple-ack-every 100 --count $COUNT --queue-name tdeep --broker-pid $PID | tail -1
echo "after drain rss_kib=$(ps -o rss= -p $PID) paging=$(du -sh $DATA/paging 2>/dev/null | cut -f1)"
kill $PID; wait $PID 2>/dev/null; kill $S 2>/dev/null
for phase in fill drain; do echo "peak $phase rss_kib=$(awk -v p=$phase '$1==p{ if ($3>m) m=$3 } END{print m}' $LOG)"; done
rm -rf $DATA
