#!/usr/bin/env bash
# Idle connections (issue 17): open CONNS connections to a fresh Mailroom, each with one channel and
# heartbeat 60 s (the clients' default), leave them idle, and report the broker's RSS growth and the CPU
# it burns while they idle (utime+stime from /proc/<pid>/stat over IDLE_S seconds).
#
#   bench/idle_connections.sh [CONNS=10000] [IDLE_S=30]
#   MAILROOM_BIN=... (default target/release/mailroom, else target/debug/mailroom)
#   HEARTBEAT=60     heartbeat the clients ask for
#   PID=<pid> URI_HOST=127.0.0.1 URI_PORT=5672   measure an already running broker (e.g. RabbitMQ's beam.smp)
#                    instead of starting a Mailroom; never point this at a shared broker with many CONNS.
#
# The client is one Python asyncio process speaking raw AMQP frames (no library), so 10,000 connections
# cost it little; it answers nothing but sends a heartbeat on every connection each HEARTBEAT/2 s, as real
# clients do. Both sides raise `ulimit -n` to the hard limit (Mailroom does so itself, see
# crates/mailroom-amqp/src/fds.rs). Ends with one `RESULT key=value ...` line.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONNS=${1:-10000}; IDLE_S=${2:-30}; HEARTBEAT=${HEARTBEAT:-60}
if [ -z "${MAILROOM_BIN:-}" ]; then
  MAILROOM_BIN=$ROOT/target/release/mailroom
  [ -x "$MAILROOM_BIN" ] || MAILROOM_BIN=$ROOT/target/debug/mailroom
fi
ulimit -n "$(ulimit -Hn)"
need=$((CONNS + 64))
if [ "$(ulimit -n)" -lt "$need" ]; then
  echo "ulimit -n is $(ulimit -n) (hard $(ulimit -Hn)): $CONNS connections need $need descriptors" >&2; exit 1
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 3000); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; return 1; }
ticks() { awk '{ s=$0; sub(/.*\) /, "", s); split(s, f, " "); print f[12] + f[13] }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
threads() { awk '/^Threads:/ { print $2 }' "/proc/$1/status"; }
HZ=$(getconf CLK_TCK)

OWN=0
if [ -z "${PID:-}" ]; then
  OWN=1
  URI_HOST=127.0.0.1; URI_PORT=$(free_port)
  DATA=$(mktemp -d /tmp/idle-conns.XXXXXX)
  "$MAILROOM_BIN" server --amqp-listen "127.0.0.1:$URI_PORT" --http-listen "127.0.0.1:$(free_port)" \
      --prometheus-listen "127.0.0.1:$(free_port)" --data-dir "$DATA" --log-level warn > "$DATA.log" 2>&1 &
  PID=$!
  trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA" "$DATA.log"' EXIT
  wait_port "$URI_PORT" || { echo "mailroom did not start (log: $DATA.log)" >&2; exit 1; }
  echo "mailroom: $MAILROOM_BIN (pid $PID, port $URI_PORT)"
fi
sleep 2
rss0=$(rss_kib "$PID")

FIFO=$(mktemp -u /tmp/idle-conns-ctl.XXXXXX); mkfifo "$FIFO"
python3 - "$URI_HOST" "$URI_PORT" "$CONNS" "$HEARTBEAT" > "$FIFO" <<'PY' &
import asyncio, struct, sys, time

host, port, conns, heartbeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def shortstr(s): b = s.encode(); return bytes([len(b)]) + b
def longstr(s): b = s.encode() if isinstance(s, str) else s; return struct.pack(">I", len(b)) + b
def method(ch, cls, mth, args=b""):
    p = struct.pack(">HH", cls, mth) + args
    return struct.pack(">BHI", 1, ch, len(p)) + p + b"\xce"
HEARTBEAT_FRAME = struct.pack(">BHI", 8, 0, 0) + b"\xce"

async def expect(reader, cls, mth):
    while True:
        t, ch, size = struct.unpack(">BHI", await reader.readexactly(7))
        payload = await reader.readexactly(size + 1)
        if t == 1 and struct.unpack(">HH", payload[:4]) == (cls, mth):
            return payload[4:-1]
        if t == 1 and payload[:4] == struct.pack(">HH", 10, 50):
            raise RuntimeError("connection.close: %r" % payload)

async def open_one():
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"AMQP\x00\x00\x09\x01")
    await expect(reader, 10, 10)
    writer.write(method(0, 10, 11, struct.pack(">I", 0) + shortstr("PLAIN") + longstr("\0guest\0guest") + shortstr("en_US")))
    tune = await expect(reader, 10, 30)
    channel_max, frame_max, _ = struct.unpack(">HIH", tune[:8])
    writer.write(method(0, 10, 31, struct.pack(">HIH", channel_max, frame_max, heartbeat)))
    writer.write(method(0, 10, 40, shortstr("/") + shortstr("") + b"\x00"))
    await expect(reader, 10, 41)
    writer.write(method(1, 20, 10, shortstr("")))
    await expect(reader, 20, 11)
    return reader, writer

async def drain(reader, state):
    # Reads (and drops) the server's heartbeats; a closed connection is counted.
    try:
        while await reader.read(4096):
            pass
    except (ConnectionError, OSError):
        pass
    state["closed"] += 1

async def main():
    sem = asyncio.Semaphore(100)
    state = {"closed": 0}
    writers, tasks = [], []
    async def one():
        async with sem:
            r, w = await open_one()
        writers.append(w)
        tasks.append(asyncio.ensure_future(drain(r, state)))
    t0 = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(conns)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"opened={len(writers)} failed={len(failed)} open_s={time.monotonic() - t0:.1f}"
          + (f" first_error={failed[0]!r}" if failed else ""), flush=True)
    while True:
        await asyncio.sleep(max(1, heartbeat // 2))
        for w in writers:
            w.write(HEARTBEAT_FRAME)
        print(f"alive={len(writers) - state['closed']}", flush=True)

asyncio.run(main())
PY
CLIENT=$!
trap 'kill $CLIENT 2>/dev/null; rm -f "$FIFO"; if [ $OWN = 1 ]; then kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA" "$DATA.log"; fi' EXIT
exec 4< "$FIFO"
read -r line <&4 || { echo "client failed" >&2; exit 1; }
echo "client: $line"
opened=$(echo "$line" | sed -n 's/.*opened=\([0-9]*\).*/\1/p')
sleep 5  # let the accept burst settle
rss1=$(rss_kib "$PID"); t1=$(ticks "$PID"); s1=$(date +%s.%N)
sleep "$IDLE_S"
rss2=$(rss_kib "$PID"); t2=$(ticks "$PID"); s2=$(date +%s.%N)
alive=$opened
while read -r -t 0.1 line <&4; do alive=$(echo "$line" | sed -n 's/alive=//p'); done
cpu_s=$(echo "($t2 - $t1) / $HZ" | bc -l)
wall_s=$(echo "$s2 - $s1" | bc -l)
printf 'broker rss: %d KiB before, %d KiB with %d connections (+%.1f MiB, %.0f B per connection), %d KiB after %ds idle; threads %d\n' \
  "$rss0" "$rss1" "$opened" "$(echo "($rss1 - $rss0) / 1024" | bc -l)" "$(echo "($rss1 - $rss0) * 1024 / ($opened + ($opened == 0))" | bc -l)" \
  "$rss2" "$IDLE_S" "$(threads "$PID")"
printf 'broker cpu while idle: %.2f s over %.1f s = %.2f%% of a core\n' "$cpu_s" "$wall_s" "$(echo "100 * $cpu_s / $wall_s" | bc -l)"
printf 'RESULT conns=%d alive=%s rss_before_kib=%d rss_open_kib=%d rss_idle_kib=%d rss_growth_mib=%.1f idle_cpu_s=%.2f idle_wall_s=%.1f idle_cpu_pct=%.2f\n' \
  "$opened" "$alive" "$rss0" "$rss1" "$rss2" "$(echo "($rss2 - $rss0) / 1024" | bc -l)" "$cpu_s" "$wall_s" "$(echo "100 * $cpu_s / $wall_s" | bc -l)"
