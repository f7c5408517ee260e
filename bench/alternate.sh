#!/usr/bin/env bash
# Compares mailroom binaries on the issue 17 scenarios: for each scenario, ROUNDS rounds, each binary in turn
# on a fresh server and data dir (so drift on a noisy machine hits every binary alike), one summary line per
# run. The bench client is each binary's own.
#
#   bench/alternate.sh ROUNDS BIN...        e.g. bench/alternate.sh 2 /tmp/mr-old target/release/mailroom
#
# Environment: DURATION (seconds per run, default 6), PORT (default 5740; PORT+10000 and PORT+11000 are used
# for HTTP and Prometheus), SCENARIOS (lines of "name|bench flags", default below).
set -uo pipefail
ROUNDS=$1
shift
DURATION=${DURATION:-6}
PORT=${PORT:-5740}
SCENARIOS=${SCENARIOS:-"16B|--size 16 --auto-ack
1KiB|--size 1024 --auto-ack
fanout|--size 1024 --auto-ack --fanout --queues 4 --consumers 4
10p10c|--size 1024 --producers 10 --consumers 10 --prefetch 100
lat1k|--size 1024 --rate 1000 --prefetch 100
lat100k|--size 1024 --rate 100000 --prefetch 100"}
while IFS= read -r line; do
  name=${line%%|*}
  flags=${line#*|}
  for _ in $(seq "$ROUNDS"); do
    for bin in "$@"; do
      data=$(mktemp -d /tmp/mr-alternate.XXXX)
      "$bin" server --amqp-listen 127.0.0.1:$PORT --http-listen 127.0.0.1:$((PORT + 10000)) \
        --prometheus-listen 127.0.0.1:$((PORT + 11000)) --data-dir "$data" --log-level warn >/dev/null 2>&1 &
      pid=$!
      sleep 0.7
      # shellcheck disable=SC2086 # the flags are words
      result=$("$bin" bench --uri "amqp://guest:guest@127.0.0.1:$PORT/%2F" $flags --duration "$DURATION" \
        --broker-pid $pid 2>&1 | grep RESULT)
      echo "$name $bin $(grep -o 'consume_rate=[0-9]*\|p50_ms=[0-9.]* p99_ms=[0-9.]*\|msgs_per_broker_cpu_s=[0-9]*' <<<"$result" | tr '\n' ' ')"
      kill $pid
      wait $pid 2>/dev/null
      rm -rf "$data"
    done
  done
done <<<"$SCENARIOS"
