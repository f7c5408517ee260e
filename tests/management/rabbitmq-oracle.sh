#!/bin/sh
# A throwaway RabbitMQ node with the management and Prometheus plugins, for comparing Mailroom's management
# API and metrics with RabbitMQ's: AMQP on 127.0.0.1:25999, management on 127.0.0.1:35672 (not 15672, which
# Mailroom's default HTTP port and other tests use; not 25672, the shared node's distribution port),
# Prometheus on 127.0.0.1:35692 (not 15692, the shared node's and Mailroom's default). Its data lives in
# /tmp/mailroom-rmq-oracle; the shared RabbitMQ on 5672 is not touched.
#   rabbitmq-oracle.sh start   # waits until the management API answers; prints its URL
#   rabbitmq-oracle.sh stop
#   rabbitmq-oracle.sh status  # exit 0 if a RabbitMQ management API answers there
# Then: RABBITMQ_MGMT_URL=http://127.0.0.1:35672 pytest tests/amqp/test_management_api.py
set -eu
dir=/tmp/mailroom-rmq-oracle
node=mailroom-oracle@localhost
url=http://127.0.0.1:35672
# GET $url/api/overview as guest; prints the body. python3, not curl: a fresh Debian has no curl.
overview() {
    python3 - "$url/api/overview" <<'PY' 2>/dev/null
import base64, sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
print(urllib.request.urlopen(req, timeout=5).read().decode())
PY
}
case "${1:-start}" in
start)
    if overview | grep -q '"product_name":"RabbitMQ"'; then
        echo "$url"; exit 0
    fi
    rm -rf "$dir" && mkdir -p "$dir"
    echo '[rabbitmq_management,rabbitmq_prometheus].' > "$dir/enabled_plugins"
    printf '%s\n' 'listeners.tcp.default = 127.0.0.1:25999' 'management.tcp.port = 35672' \
        'management.tcp.ip = 127.0.0.1' 'prometheus.tcp.port = 35692' 'prometheus.tcp.ip = 127.0.0.1' \
        > "$dir/rabbitmq.conf"
    echo '[].' > "$dir/advanced.config"
    cat > "$dir/run.sh" <<RUN
#!/bin/sh
export RABBITMQ_NODENAME=$node RABBITMQ_NODE_PORT=25999 RABBITMQ_DIST_PORT=26999
export RABBITMQ_MNESIA_BASE=$dir/mnesia RABBITMQ_LOG_BASE=$dir/log RABBITMQ_PID_FILE=$dir/pid
export RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins RABBITMQ_CONFIG_FILE=$dir/rabbitmq
export RABBITMQ_ADVANCED_CONFIG_FILE=$dir/advanced
exec rabbitmq-server
RUN
    chmod +x "$dir/run.sh"
    if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then
        chown -R rabbitmq "$dir"
        nohup su rabbitmq -s /bin/sh -c "$dir/run.sh" > "$dir/out.log" 2>&1 &
    else
        nohup "$dir/run.sh" > "$dir/out.log" 2>&1 &
    fi
    i=0
    until overview >/dev/null; do
        i=$((i + 1)); [ $i -gt 120 ] && { echo "the oracle node did not start; see $dir/log" >&2; exit 1; }
        sleep 1
    done
    echo "$url"
    ;;
status)
    overview | grep -q '"product_name":"RabbitMQ"'
    ;;
stop)
    [ -f "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null || true
    ;;
esac
