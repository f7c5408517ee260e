#!/usr/bin/env bash
# Runs the standard `mailroom bench` scenarios against Mailroom and RabbitMQ back to back
# (interleaved run by run, so load drift on the machine hits both alike), RUNS times each,
# and prints the medians side by side. Raw RESULT lines go to $LOG.
#
# Environment:
#   MAILROOM_URL   default amqp://guest:guest@127.0.0.1:5673/%2F
#   RABBITMQ_URL   default amqp://guest:guest@127.0.0.1:5672/%2F
#   MAILROOM_PID / RABBITMQ_PID   broker pids, to report broker CPU seconds (optional)
#   MAILROOM_BIN   the bench binary (default: built with cargo in release mode)
#   DURATION       seconds per run (default 10);  RUNS  runs per broker (default 3)
#   ONLY           run only scenarios whose name contains this string
#   DEEP_COUNT     messages in the deep-queue row (default 1000000; 0 skips it). That row runs
#                  bench/deep_queue_memory.sh once per target (memory does not need a median): Mailroom
#                  in a server of its own (MAILROOM_URL/PID unused), RabbitMQ on RABBITMQ_URL with the
#                  RSS of RABBITMQ_PID
#   TARGETS        "mailroom rabbitmq" (default), or just one of them
#   SETTLE_MAX     longest wait, in seconds, for both brokers to go idle before each run (default 30)
#   MAILROOM_METRICS_URL   e.g. http://127.0.0.1:15673/metrics: report Mailroom's fsyncs/s (optional)
#   RABBITMQ_METRICS_URL   e.g. http://guest:guest@127.0.0.1:15672/api/nodes (management plugin), or
#   RABBITMQ_FSYNCS_CMD    a command printing RabbitMQ's sync count, e.g.
#                          rabbitmqctl eval '{_, N} = lists:keyfind({io_sync,count}, 1, file_handle_cache_stats:get()), N.'
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MAILROOM_URL=${MAILROOM_URL:-amqp://guest:guest@127.0.0.1:5673/%2F}
RABBITMQ_URL=${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}
DURATION=${DURATION:-10}
RUNS=${RUNS:-3}
TARGETS=${TARGETS:-mailroom rabbitmq}
LOG=${LOG:-$(mktemp -t bench-compare.XXXXXX.log)}

if [[ -z ${MAILROOM_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release -q -p mailroom-cli)
    MAILROOM_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/mailroom
fi

# name | bench flags | metrics to compare (keys of the RESULT line). Flags "@deep" run
# bench/deep_queue_memory.sh instead of one bench (DEEP_COUNT messages, one run per target).
# msgs_per_broker_cpu_s: messages (deliveries when consumed) per broker CPU-second, issue 17's efficiency
# figure; it needs MAILROOM_PID / RABBITMQ_PID.
CPU="broker_cpu_s msgs_per_broker_cpu_s"
DEEP_COUNT=${DEEP_COUNT:-1000000}
SCENARIOS=(
    "1p1c-16B-transient-autoack|--size 16 --auto-ack|consume_rate publish_rate p99_ms $CPU"
    "1p1c-1KiB-transient-autoack|--size 1024 --auto-ack|consume_rate publish_rate p99_ms $CPU"
    "fanout4q-4c-1KiB-transient-autoack|--size 1024 --auto-ack --fanout --queues 4 --consumers 4|consume_rate publish_rate p99_ms $CPU"
    "10p10c-1q-1KiB-transient-prefetch100-manualack|--size 1024 --producers 10 --consumers 10 --prefetch 100|consume_rate publish_rate p99_ms $CPU"
    "latency-1000rps-1KiB-manualack|--size 1024 --rate 1000 --prefetch 100|p50_ms p99_ms p999_ms max_ms $CPU"
    "latency-100krps-1KiB-manualack|--size 1024 --rate 100000 --prefetch 100|p50_ms p99_ms p999_ms max_ms consume_rate $CPU"
    "1KiB-persistent-confirm100-prefetch100|--size 1024 --persistent --confirm 100 --prefetch 100|consume_rate publish_rate confirm_p99_ms fsyncs_per_s msgs_per_fsync $CPU"
    "1KiB-persistent-confirm1000-prefetch100|--size 1024 --persistent --confirm 1000 --prefetch 100|consume_rate publish_rate confirm_p99_ms fsyncs_per_s msgs_per_fsync $CPU"
    "4p4c4q-1KiB-persistent-confirm250-prefetch100|--size 1024 --persistent --confirm 250 --prefetch 100 --producers 4 --consumers 4 --queues 4|consume_rate publish_rate confirm_p99_ms fsyncs_per_s msgs_per_fsync $CPU"
    "deep-queue-1KiB-persistent|@deep|fill_rate drain_rate peak_fill_rss_kib rss_after_fill_kib peak_drain_rss_kib recovery_s rss_after_recovery_kib"
)

url_of() { if [[ $1 == mailroom ]]; then echo "$MAILROOM_URL"; else echo "$RABBITMQ_URL"; fi; }
pid_of() { if [[ $1 == mailroom ]]; then echo "${MAILROOM_PID:-}"; else echo "${RABBITMQ_PID:-}"; fi; }
# cpu_ticks PID: the process's user + system CPU in clock ticks (0 if it is gone).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# settle: waits (at most SETTLE_MAX seconds, default 30) until every known broker spends under a tenth of a core
# over half a second, and prints how long it waited. A broker that fell behind in its own run keeps working
# after the bench stops (RabbitMQ drains and deletes a backlog of hundreds of thousands of messages at
# 100,000 msg/s), and its leftovers would land in the next run, the other broker's.
settle() {
    local start=$SECONDS pids=() pid busy
    for pid in ${MAILROOM_PID:-} ${RABBITMQ_PID:-}; do pids+=("$pid"); done
    ((${#pids[@]})) || { echo 0; return; }
    local hz
    hz=$(getconf CLK_TCK)
    while ((SECONDS - start < ${SETTLE_MAX:-30})); do
        local before=() i=0
        for pid in "${pids[@]}"; do before+=("$(cpu_ticks "$pid")"); done
        sleep 0.5
        busy=0
        for pid in "${pids[@]}"; do
            (($(cpu_ticks "$pid") - before[i] > hz / 20)) && busy=1
            i=$((i + 1))
        done
        ((busy)) || break
    done
    echo $((SECONDS - start))
}
# fsync_flags TARGET: the bench flags that read the target's fsync counter, if configured.
fsync_flags() {
    if [[ $1 == mailroom ]]; then
        [[ -n ${MAILROOM_METRICS_URL:-} ]] && printf '%s\n' --metrics-url "$MAILROOM_METRICS_URL"
    elif [[ -n ${RABBITMQ_METRICS_URL:-} ]]; then
        printf '%s\n' --metrics-url "$RABBITMQ_METRICS_URL"
    elif [[ -n ${RABBITMQ_FSYNCS_CMD:-} ]]; then
        printf '%s\n' --fsyncs-cmd "$RABBITMQ_FSYNCS_CMD"
    fi
    return 0
}

# value KEY LINE: the value of KEY=... in a RESULT line.
value() { tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p"; }

# median of the numbers on stdin ("n/a" if none).
median() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "n/a"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

declare -A RESULTS   # "<scenario>|<target>" -> newline-separated RESULT lines

echo "# $(date -u +%FT%TZ) $(nproc) cpus, load: $(cut -d' ' -f1-3 /proc/loadavg); log: $LOG" | tee -a "$LOG" >&2
for sc in "${SCENARIOS[@]}"; do
    IFS='|' read -r name flags _ <<<"$sc"
    [[ -n ${ONLY:-} && $name != *"$ONLY"* ]] && continue
    if [[ $flags == @deep ]]; then
        [[ $DEEP_COUNT == 0 ]] && continue
        for target in $TARGETS; do
            echo "## $name $target (load $(cut -d' ' -f1 /proc/loadavg)): bench/deep_queue_memory.sh $DEEP_COUNT" | tee -a "$LOG" >&2
            if line=$(TARGET=$target MAILROOM_BIN=$MAILROOM_BIN bash "$ROOT/bench/deep_queue_memory.sh" "$DEEP_COUNT" \
                2>>"$LOG" | grep '^RESULT'); then
                echo "$line" | tee -a "$LOG" >&2
                RESULTS["$name|$target"]+="$line"$'\n'
            else
                echo "   failed (see $LOG)" | tee -a "$LOG" >&2
            fi
        done
        continue
    fi
    for run in $(seq 1 "$RUNS"); do
        for target in $TARGETS; do
            pid=$(pid_of "$target")
            # shellcheck disable=SC2086  # flags are meant to split
            fsync=()
            if [[ $name == *persistent* ]]; then mapfile -t fsync < <(fsync_flags "$target"); fi
            cmd=("$MAILROOM_BIN" bench --uri "$(url_of "$target")" --duration "$DURATION" $flags ${pid:+--broker-pid "$pid"} "${fsync[@]}")
            waited=$(settle)
            echo "## $name $target run $run (load $(cut -d' ' -f1 /proc/loadavg), settled ${waited}s): ${cmd[*]}" | tee -a "$LOG" >&2
            if line=$("${cmd[@]}" 2>>"$LOG" | grep '^RESULT'); then
                echo "$line" | tee -a "$LOG" >&2
                RESULTS["$name|$target"]+="$line"$'\n'
            else
                echo "   failed (see $LOG)" | tee -a "$LOG" >&2
            fi
        done
    done
done

printf '\n%-48s %-22s' scenario metric
for target in $TARGETS; do printf ' %14s' "$target"; done
printf '\n'
for sc in "${SCENARIOS[@]}"; do
    IFS='|' read -r name flags metrics <<<"$sc"
    [[ -n ${ONLY:-} && $name != *"$ONLY"* ]] && continue
    [[ $flags == @deep && $DEEP_COUNT == 0 ]] && continue
    for m in $metrics; do
        printf '%-48s %-22s' "$name" "$m"
        for target in $TARGETS; do
            med=$(while IFS= read -r l; do
                      if [[ -n $l ]]; then value "$m" "$l"; fi
                  done <<<"${RESULTS["$name|$target"]:-}" | { grep -v '^na$' || true; } | median)
            printf ' %14s' "$med"
        done
        printf '\n'
    done
done
echo "(medians of $RUNS runs of ${DURATION}s; raw lines in $LOG)"
