# shellcheck shell=bash
# The services and tools the test suites need: detect, install (Debian packages, as root), start on
# free ports, stop. Sourced by scripts/test-all.sh; every function is prefixed `svc_`.
#
#   svc_rabbitmq      RabbitMQ at $RABBITMQ_URL, or installed and started; exports RABBITMQ_URL (and
#                     RABBITMQ_NODENAME etc., so `rabbitmqctl` in the suites reaches that node).
#   svc_postgres      PostgreSQL at $MAILROOM_PG_URL, or installed and started with a `test`
#                     database; exports MAILROOM_PG_URL.
#   svc_install WHAT PKG...   installs the Debian packages PKG (providing WHAT) if root on Debian.
#   svc_stop_all      stops what svc_rabbitmq / svc_postgres started (test-all.sh traps EXIT).
#
# A service on the default URL counts as present when it answers and is installed here (rabbitmqctl,
# PostgreSQL's binaries): a chroot or container sharing the host's network sees the host's ports.
# A service is installed only when its URL variable is unset (a URL you give is the one to use), the
# script runs as root on Debian (apt-get) and MAILROOM_INSTALL is not 0. When a service is neither
# reachable nor installable, svc_rabbitmq / svc_postgres return 1 and append the reason to
# SVC_SKIPPED; the caller decides (CI=true: fail).

SVC_SKIPPED=()     # "Service: why it is missing", for the summary
SVC_STOPS=()       # commands that stop what we started, run in reverse order
SVC_APT_UPDATED=0

svc_say() { echo "== services: $*"; }

# svc_open HOST PORT: true when a TCP connection to HOST:PORT succeeds within 2 s.
svc_open() {
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# svc_host_port URL DEFAULT_PORT: prints "host port" of scheme://[user[:pass]@]host[:port][/path].
svc_host_port() {
  local rest="${1#*://}"
  rest="${rest%%/*}"
  rest="${rest%%\?*}"
  rest="${rest##*@}"
  local host="${rest%:*}" port="${rest##*:}"
  if [ "$host" = "$rest" ] || [ -z "$port" ]; then port="$2"; host="${rest%:}"; fi
  host="${host#[}"
  host="${host%]}"
  echo "${host:-127.0.0.1} $port"
}

# svc_port PREFERRED: PREFERRED (non-zero) if it can be bound on every address (IPv4 and IPv6: a listener on
# [::] only does not answer on 127.0.0.1 but still takes the port), else a free port from the kernel.
svc_port() {
  python3 - "$1" <<'PY'
import socket, sys
def free(port):
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
        except OSError:
            return False
        finally:
            s.close()
    return True
port = int(sys.argv[1])
if port == 0 or not free(port):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
print(port)
PY
}

# svc_why_no_install [VAR]: empty when we may install packages (for the service VAR points at), else
# the reason.
svc_why_no_install() {
  if [ -n "${1:-}" ] && [ -n "${!1:-}" ]; then
    echo "$1 is set, so that one is used and nothing is installed"
  elif [ "${MAILROOM_INSTALL:-1}" = "0" ]; then
    echo "MAILROOM_INSTALL=0"
  elif [ "$(id -u)" != 0 ]; then
    echo "not root, so it cannot be installed (run as root on Debian to install it)"
  elif ! command -v apt-get >/dev/null 2>&1 || [ ! -f /etc/debian_version ]; then
    echo "no apt-get (not Debian), so it cannot be installed"
  fi
}

# svc_apt_install PKG...: installs Debian packages without starting their services (policy-rc.d
# 101 while apt runs: we start our own instance on free ports instead of the packaged one).
svc_apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  svc_say "installing Debian packages: ${missing[*]}"
  if [ "$SVC_APT_UPDATED" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
    SVC_APT_UPDATED=1
  fi
  local policy=0 rc=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  [ "$policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return "$rc"
}

# svc_install WHAT PKG...: installs the Debian packages PKG (which provide WHAT) when we may (root
# on Debian); otherwise says what to install and returns 1.
svc_install() {
  local what="$1" why
  shift
  why="$(svc_why_no_install)"
  if [ -n "$why" ]; then
    svc_say "$what is missing and $why: install $* yourself"
    return 1
  fi
  svc_say "$what is missing"
  svc_apt_install "$@"
}

svc_stop_all() {
  local i
  for ((i = ${#SVC_STOPS[@]} - 1; i >= 0; i--)); do
    eval "${SVC_STOPS[$i]}" || true
  done
  SVC_STOPS=()
}

# ---- RabbitMQ ----------------------------------------------------------------------------------

svc_rabbitmq() {
  local url="${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}" host port why
  read -r host port <<<"$(svc_host_port "$url" 5672)"
  if svc_open "$host" "$port"; then
    if [ -n "${RABBITMQ_URL:-}" ] || command -v rabbitmqctl >/dev/null 2>&1 || [ -n "$(svc_why_no_install)" ]; then
      svc_say "RabbitMQ reachable at $host:$port: using it"
      export RABBITMQ_URL="$url"
      svc_rabbitmq_consistent_hash "$host"
      return 0
    fi
    # The suites administer the oracle with rabbitmqctl (policies, restart): one answering on the
    # default port without rabbitmqctl here is not this machine's (a chroot or container sharing the
    # host's network sees the host's ports), so we install and start our own on free ports.
    svc_say "RabbitMQ answers on $host:$port but is not installed here (no rabbitmqctl): starting our own"
  fi
  why="$(svc_why_no_install RABBITMQ_URL)"
  if [ -n "$why" ]; then
    SVC_SKIPPED+=("RabbitMQ: nothing listens on $host:$port and $why")
    return 1
  fi
  if ! svc_apt_install rabbitmq-server; then
    SVC_SKIPPED+=("RabbitMQ: not reachable at $host:$port and apt-get install rabbitmq-server failed")
    return 1
  fi
  svc_rabbitmq_start
}

# The ordered-processing and consistent-hash suites need rabbitmq_consistent_hash_exchange (issue 18).
# On a node this machine administers, enable it (online, idempotent, no restart; the management plugin
# stays off: its API tests use a throwaway node of their own). Without rabbitmq-plugins, those tests skip.
svc_rabbitmq_consistent_hash() {
  case "$1" in 127.*|localhost|::1) ;; *) return 0 ;; esac   # rabbitmq-plugins acts on the local node
  command -v rabbitmq-plugins >/dev/null 2>&1 || return 0
  if rabbitmq-plugins list -e -m 2>/dev/null | grep -qx rabbitmq_consistent_hash_exchange; then
    return 0
  fi
  svc_say "enabling rabbitmq_consistent_hash_exchange on the local RabbitMQ"
  rabbitmq-plugins enable rabbitmq_consistent_hash_exchange >/dev/null 2>&1 ||
    svc_say "could not enable rabbitmq_consistent_hash_exchange: the consistent-hash tests skip on RabbitMQ"
}

# Starts a RabbitMQ node of our own: its own name, data dir, config and ports (the default ones when
# free), with the plugins the suites use; exports what the tests and rabbitmqctl need to reach it.
svc_rabbitmq_start() {
  local dir node_port dist_port mgmt_port prom_port epmd_was_up=0 i
  dir="$(mktemp -d /tmp/mailroom-rabbitmq.XXXXXX)"
  node_port="$(svc_port 5672)"
  # The other listeners take ports from the kernel: a default one free now may be taken by another
  # node (sharing this network) while a test restarts ours with rabbitmqctl stop_app / start_app.
  dist_port="$(svc_port 0)"
  mgmt_port="$(svc_port 0)"
  prom_port="$(svc_port 0)"
  svc_open 127.0.0.1 "${ERL_EPMD_PORT:-4369}" && epmd_was_up=1
  mkdir -p "$dir/mnesia" "$dir/log"
  cat >"$dir/rabbitmq.conf" <<EOF
management.tcp.port = $mgmt_port
management.tcp.ip = 127.0.0.1
prometheus.tcp.port = $prom_port
prometheus.tcp.ip = 127.0.0.1
EOF
  echo '[rabbitmq_management,rabbitmq_prometheus,rabbitmq_consistent_hash_exchange].' >"$dir/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$dir"
  # The Debian wrappers (rabbitmq-server, rabbitmqctl) run as the rabbitmq user and keep these.
  export RABBITMQ_NODENAME="mailroom-test-$$@localhost"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$node_port"
  export RABBITMQ_DIST_PORT="$dist_port"
  export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
  export RABBITMQ_MNESIA_BASE="$dir/mnesia"
  export RABBITMQ_LOG_BASE="$dir/log"
  svc_say "starting RabbitMQ $RABBITMQ_NODENAME on 127.0.0.1:$node_port (dist $dist_port, management $mgmt_port, prometheus $prom_port; logs $dir/log)"
  (cd / && setsid rabbitmq-server >"$dir/server.out" 2>&1 &)
  SVC_STOPS+=("svc_rabbitmq_stop '$dir' $epmd_was_up")
  for ((i = 0; i < 120; i++)); do
    svc_open 127.0.0.1 "$node_port" && break
    sleep 1
  done
  if ! rabbitmqctl await_startup --timeout 60 >/dev/null 2>&1; then
    svc_say "RabbitMQ did not start; last lines of its log:"
    tail -n 20 "$dir"/log/*.log "$dir/server.out" 2>/dev/null
    SVC_SKIPPED+=("RabbitMQ: installed but did not start (see $dir/log)")
    return 1
  fi
  export RABBITMQ_URL="amqp://guest:guest@127.0.0.1:$node_port/%2F"
  svc_say "RabbitMQ up: RABBITMQ_URL=$RABBITMQ_URL, plugins: $(rabbitmq-plugins list -e -m -q 2>/dev/null | tr '\n' ' ')"
}

svc_rabbitmq_stop() {
  local dir="$1" epmd_was_up="$2"
  svc_say "stopping RabbitMQ $RABBITMQ_NODENAME"
  # With the node's pid file, `stop` also waits for the Erlang VM to exit.
  rabbitmqctl stop "$RABBITMQ_MNESIA_BASE/$RABBITMQ_NODENAME.pid" >/dev/null 2>&1 || true
  # epmd is started by the first Erlang node; stop it only if it was not running before us.
  [ "$epmd_was_up" = 0 ] && epmd -kill >/dev/null 2>&1
  rm -rf "$dir"
}

# ---- PostgreSQL --------------------------------------------------------------------------------

svc_postgres() {
  local url="${MAILROOM_PG_URL:-postgres://postgres@127.0.0.1:5432/test}" host port why
  read -r host port <<<"$(svc_host_port "$url" 5432)"
  if svc_open "$host" "$port"; then
    if [ -n "${MAILROOM_PG_URL:-}" ] || svc_pg_installed || [ -n "$(svc_why_no_install)" ]; then
      svc_say "PostgreSQL reachable at $host:$port: using it"
      export MAILROOM_PG_URL="$url"
      return 0
    fi
    # As for RabbitMQ: the default port answering without PostgreSQL installed here is another
    # system's (one whose `test` database and trust auth we cannot rely on): start our own.
    svc_say "PostgreSQL answers on $host:$port but is not installed here: starting our own"
  fi
  why="$(svc_why_no_install MAILROOM_PG_URL)"
  if [ -n "$why" ]; then
    SVC_SKIPPED+=("PostgreSQL: nothing listens on $host:$port and $why")
    return 1
  fi
  if ! svc_apt_install postgresql; then
    SVC_SKIPPED+=("PostgreSQL: not reachable at $host:$port and apt-get install postgresql failed")
    return 1
  fi
  svc_postgres_start
}

# True when a PostgreSQL server (Debian layout) or psql is installed on this machine.
svc_pg_installed() {
  command -v psql >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

# Starts a cluster of our own (initdb in a temporary directory, trust auth, user postgres) on 5432 or a
# free port, with a database `test`; exports MAILROOM_PG_URL.
svc_postgres_start() {
  local bin dir port
  bin="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)"
  dir="$(mktemp -d /tmp/mailroom-postgres.XXXXXX)"
  port="$(svc_port 5432)"
  chown postgres:postgres "$dir"
  svc_say "starting PostgreSQL ($bin) on 127.0.0.1:$port (data $dir/data)"
  local pg=(runuser -u postgres -- env -C /)  # postgres may not enter the current directory
  if ! "${pg[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >"$dir/initdb.log" 2>&1 ||
    ! "${pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null; then
    tail -n 20 "$dir/initdb.log" "$dir/server.log" 2>/dev/null
    SVC_SKIPPED+=("PostgreSQL: installed but did not start (see $dir)")
    return 1
  fi
  SVC_STOPS+=("svc_postgres_stop '$bin' '$dir'")
  "${pg[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres test
  export MAILROOM_PG_URL="postgres://postgres@127.0.0.1:$port/test"
  svc_say "PostgreSQL up: MAILROOM_PG_URL=$MAILROOM_PG_URL"
}

svc_postgres_stop() {
  svc_say "stopping PostgreSQL ($2)"
  runuser -u postgres -- env -C / "$1/pg_ctl" -D "$2/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$2"
}
