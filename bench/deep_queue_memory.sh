#!/usr/bin/env bash
# Deep queue memory (issue 5): fill one durable queue with COUNT persistent 1 KiB messages, SIGKILL + restart
# (recovery time and RSS), then drain at full speed; server RSS sampled every second.
#
#   bench/deep_queue_memory.sh [COUNT=1000000]   (needs ~1.1 KB of disk per message under /tmp/deep)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${MAILROOM_BIN:-$ROOT/target/release/mailroom}; COUNT=${1:-1000000}; PORT=5693; HPORT=15693
DATA=/tmp/deep; rm -rf $DATA; mkdir -p $DATA
LOG=/tmp/deep-rss-$COUNT.log; : > $LOG
sample() { while kill -0 $1 2>/dev/null; do echo "$2 $(date +%s) $(ps -o rss= -p $1)" >> $LOG; sleep 1; done; }
wait_port() { for _ in $(seq 1 3000); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0; sleep 0.05; done; return 1; }
$BIN server --amqp-listen 127.0.0.1:$PORT --http-listen 127.0.0.1:$HPORT --data-dir $DATA --log-level warn > /tmp/deep-server.log 2>&1 & PID=$!
wait_port; sample $PID fill & S=$!
echo "fill: $(date +%T)"
$BIN bench --uri amqp://guest:guest@127.0.0.1:$PORT/%2F --producers 1 --consumers 0 --size 1024 --persistent --confirm 1000 --count $COUNT --queue-name deep --broker-pid $PID | tail -1
echo "after fill rss_kib=$(ps -o rss= -p $PID) segments=$(du -sh $DATA/msgs | cut -f1)"
kill -9 $PID; wait $PID 2>/dev/null; kill $S 2>/dev/null
# DROP_CACHES=1 (root): recovery and the drain read from the disk, not the page cache.
[ "${DROP_CACHES:-0}" = 1 ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
start=$(date +%s.%N)
$BIN server --amqp-listen 127.0.0.1:$PORT --http-listen 127.0.0.1:$HPORT --data-dir $DATA --log-level warn >> /tmp/deep-server.log 2>&1 & PID=$!
wait_port; end=$(date +%s.%N)
sleep 2
echo "recovery_s=$(echo "$end - $start" | bc) rss_after_recovery_kib=$(ps -o rss= -p $PID)"
# STEADY=N: first N seconds of publishing and consuming at once on the deep queue (its index ring cycles).
if [ "${STEADY:-0}" -gt 0 ]; then
  sample $PID steady & S=$!
  $BIN bench --uri amqp://guest:guest@127.0.0.1:$PORT/%2F --producers 1 --consumers 1 --size 1024 --persistent \
      --confirm 1000 --prefetch 1000 --multiple-ack-every 100 --duration $STEADY --queue-name deep --broker-pid $PID | tail -1
  kill $S 2>/dev/null
  echo "after steady rss_kib=$(ps -o rss= -p $PID)"
fi
sample $PID drain & S=$!
echo "drain: $(date +%T)"
$BIN bench --uri amqp://guest:guest@127.0.0.1:$PORT/%2F --producers 0 --consumers 1 --persistent --prefetch 1000 --multiple-ack-every 100 --count $COUNT --queue-name deep --broker-pid $PID | tail -1
echo "after drain rss_kib=$(ps -o rss= -p $PID)"
kill $PID; wait $PID 2>/dev/null; kill $S 2>/dev/null
for phase in fill steady drain; do echo "peak $phase rss_kib=$(awk -v p=$phase '$1==p{ if ($3>m) m=$3 } END{print m}' $LOG)"; done
rm -rf $DATA
