#!/usr/bin/env bash
# Deep queue memory (issues 5 and 17): fill one durable queue with COUNT persistent 1 KiB messages, then drain it
# at full speed; the broker's RSS sampled every second. Ends with one RESULT line (bench/compare.sh reads it).
#
#   bench/deep_queue_memory.sh [COUNT=1000000]
#
# TARGET=mailroom (default): starts its own Mailroom (free ports, data under a fresh temporary directory,
#   ~1.1 KB of disk per message), fills, SIGKILLs and restarts it (recovery time and RSS), then drains.
#   DROP_CACHES=1 (root): recovery and the drain read from the disk, not the page cache.
#   STEADY=N: N seconds of publishing and consuming at once on the deep queue before the drain.
# TARGET=rabbitmq: fills and drains a uniquely named queue on RABBITMQ_URL (default the local 127.0.0.1:5672),
#   sampling the RSS of RABBITMQ_PID (the beam process; RSS figures are "na" without it); no restart. The queue
#   is deleted afterwards with rabbitmqctl when it is on PATH.
# MAILROOM_BIN: the mailroom binary (default target/release/mailroom).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${MAILROOM_BIN:-$ROOT/target/release/mailroom}; COUNT=${1:-1000000}; TARGET=${TARGET:-mailroom}
LOG=$(mktemp -t deep-rss.XXXXXX.log)
sample() { while kill -0 "$1" 2>/dev/null; do echo "$2 $(date +%s) $(ps -o rss= -p "$1")" >> "$LOG"; sleep 1; done; }
rss() { if [ -n "${1:-}" ]; then ps -o rss= -p "$1" | tr -d ' '; else echo na; fi; }
peak() { awk -v p="$1" '$1==p{ if ($3>m) m=$3 } END{ if (m == "") print "na"; else print m }' "$LOG"; }
rate() { sed -n 's/.*'"$1"'=\([0-9.]*\).*/\1/p' <<<"$2"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

case "$TARGET" in
mailroom)
  PORT=$(free_port); HPORT=$(free_port)
  DATA=$(mktemp -d -t deep-data.XXXXXX); SERVER_LOG=$(mktemp -t deep-server.XXXXXX.log)
  URI=amqp://guest:guest@127.0.0.1:$PORT/%2F
  start_server() {
    "$BIN" server --amqp-listen 127.0.0.1:$PORT --http-listen 127.0.0.1:$HPORT --prometheus-listen off \
      --data-dir "$DATA" --log-level warn >> "$SERVER_LOG" 2>&1 & PID=$!
    for _ in $(seq 1 3000); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0; sleep 0.05; done
    echo "the server did not listen on $PORT (see $SERVER_LOG)" >&2; return 1
  }
  trap 'kill $PID 2>/dev/null; rm -rf "$DATA"' EXIT
  start_server || exit 2
  ;;
rabbitmq)
  URI=${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}; PID=${RABBITMQ_PID:-}
  ;;
*) echo "TARGET is mailroom or rabbitmq, not '$TARGET'" >&2; exit 2 ;;
esac
QUEUE=deep-$$-$(date +%s)

[ -n "${PID:-}" ] && { sample "$PID" fill & S=$!; }
echo "fill: $(date +%T) $TARGET $COUNT x 1 KiB into $QUEUE" >&2
fill=$("$BIN" bench --uri "$URI" --producers 1 --consumers 0 --size 1024 --persistent --confirm 1000 --count "$COUNT" \
  --queue-name "$QUEUE" ${PID:+--broker-pid "$PID"} | tail -1)
echo "$fill" >&2
rss_fill=$(rss "${PID:-}"); [ -n "${S:-}" ] && kill "$S" 2>/dev/null
echo "after fill rss_kib=$rss_fill" >&2
recovery_s=na; rss_recovered=na
if [ "$TARGET" = mailroom ]; then
  echo "segments=$(du -sh "$DATA" | cut -f1)" >&2
  kill -9 "$PID"; wait "$PID" 2>/dev/null
  [ "${DROP_CACHES:-0}" = 1 ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
  start=$(date +%s.%N); start_server || exit 2; end=$(date +%s.%N)
  sleep 2
  recovery_s=$(echo "$end - $start" | bc | xargs printf "%.3f"); rss_recovered=$(rss "$PID")
  echo "recovery_s=$recovery_s rss_after_recovery_kib=$rss_recovered" >&2
  if [ "${STEADY:-0}" -gt 0 ]; then
    sample "$PID" steady & S=$!
    "$BIN" bench --uri "$URI" --producers 1 --consumers 1 --size 1024 --persistent --confirm 1000 --prefetch 1000 \
      --multiple-ack-every 100 --duration "$STEADY" --queue-name "$QUEUE" --broker-pid "$PID" | tail -1 >&2
    kill "$S" 2>/dev/null
    echo "after steady rss_kib=$(rss "$PID")" >&2
  fi
fi
[ -n "${PID:-}" ] && { sample "$PID" drain & S=$!; }
echo "drain: $(date +%T)" >&2
drain=$("$BIN" bench --uri "$URI" --producers 0 --consumers 1 --persistent --prefetch 1000 --multiple-ack-every 100 \
  --count "$COUNT" --queue-name "$QUEUE" ${PID:+--broker-pid "$PID"} | tail -1)
echo "$drain" >&2
rss_drained=$(rss "${PID:-}"); [ -n "${S:-}" ] && kill "$S" 2>/dev/null
echo "after drain rss_kib=$rss_drained" >&2
if [ "$TARGET" = rabbitmq ] && command -v rabbitmqctl >/dev/null; then
  rabbitmqctl delete_queue "$QUEUE" >/dev/null 2>&1 || echo "could not delete $QUEUE" >&2
fi
echo "RESULT target=$TARGET count=$COUNT fill_rate=$(rate publish_rate "$fill") drain_rate=$(rate consume_rate "$drain")" \
  "peak_fill_rss_kib=$(peak fill) rss_after_fill_kib=$rss_fill recovery_s=$recovery_s" \
  "rss_after_recovery_kib=$rss_recovered peak_steady_rss_kib=$(peak steady) peak_drain_rss_kib=$(peak drain)" \
  "rss_after_drain_kib=$rss_drained"
rm -f "$LOG"
