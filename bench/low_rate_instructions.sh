#!/usr/bin/env bash
# Broker instructions per message at 1,000 msg/s (1 KiB, manual ack, prefetch 100): the server runs under
# callgrind, its counters are zeroed once it listens, a 5,000-message paced run goes through, the counters are
# dumped, and the total is divided by 5,000. Instruction counts repeat where wall-clock figures do not; at
# this rate they are mostly the per-turn costs (wake-ups, polls, syscalls' user side), not the per-message work.
#
#   bench/low_rate_instructions.sh BIN     (valgrind must be installed)
set -euo pipefail
BIN=$1
PORT=${PORT:-5750}
data=$(mktemp -d /tmp/mr-callgrind.XXXX)
out=$(mktemp -d /tmp/mr-callgrind-out.XXXX)
valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" "$BIN" server --amqp-listen 127.0.0.1:$PORT \
  --http-listen 127.0.0.1:$((PORT + 10000)) --prometheus-listen 127.0.0.1:$((PORT + 11000)) --data-dir "$data" \
  --log-level warn >/dev/null 2>&1 &
vg=$!
for _ in $(seq 120); do
  sleep 1
  (echo >/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
done
callgrind_control -z $vg >/dev/null
"$BIN" bench --uri "amqp://guest:guest@127.0.0.1:$PORT/%2F" --size 1024 --rate 1000 --prefetch 100 --count 5000 2>&1 |
  grep RESULT
callgrind_control -d $vg >/dev/null
sleep 1
kill $vg
wait $vg 2>/dev/null || true
# The dump (callgrind.out.1) holds the run; the file written at exit only what came after it.
total=$(awk '/^(summary|totals):/ {print $2; exit}' "$out/callgrind.out.1")
echo "instructions per message: $((total / 5000))"
rm -rf "$data" "$out"
