#!/usr/bin/env bash
# Shallow-queue throughput of one mailroom binary (compare two by running this alternately for each):
# the persistent 1 KiB confirmed run and the transient 16 B run of BENCHMARKS.md, 8 s each, on a fresh
# server and data dir.
#
#   bench/shallow_ab.sh BIN LABEL
BIN=$1; LABEL=${2:-$1}; PORT=5691; HPORT=15691
DATA=$(mktemp -d /tmp/mr-shallow.XXXX)
$BIN server --amqp-listen 127.0.0.1:$PORT --http-listen 127.0.0.1:$HPORT --data-dir $DATA --log-level warn >/dev/null 2>&1 & PID=$!
sleep 1
echo "== $LABEL persistent 1KiB confirm 100 ($(uptime | sed 's/.*load/load/'))"
$BIN bench --uri amqp://guest:guest@127.0.0.1:$PORT/%2F --size 1024 --persistent --confirm 100 --prefetch 100 --duration 8 --broker-pid $PID 2>&1 | tail -1
echo "== $LABEL transient 16B ($(uptime | sed 's/.*load/load/'))"
$BIN bench --uri amqp://guest:guest@127.0.0.1:$PORT/%2F --size 16 --duration 8 --broker-pid $PID 2>&1 | tail -1
kill $PID; wait $PID 2>/dev/null; rm -rf $DATA
