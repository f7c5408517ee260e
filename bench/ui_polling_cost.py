#!/usr/bin/env python3
"""Broker CPU per message with the web UI polling and Prometheus scraping beside a load (issue 16: within
3% of the same load without them).

Starts `mailroom server` (MAILROOM_BIN, default target/release/mailroom) on free ports, declares QUEUES idle
queues (default 100, so listings and per-object scrapes have work to do), then runs `mailroom bench` RUNS
times in each mode, alternating (quiet, polled, quiet, polled, ...) so machine drift hits both alike:

- quiet:  the bench alone;
- polled: the bench while a poller does what an open UI tab does every UI_INTERVAL seconds (default 5, the
  UI's default refresh; the header's /api/overview, /api/nodes, /api/vhosts, and the queues page sorted by
  name, 50 per page) plus the bench queue's own page, and a Prometheus scrape of /metrics and
  /metrics/per-object every SCRAPE_INTERVAL seconds (default 1).

Reports each run's msgs_per_broker_cpu_s (from the bench's RESULT line) and the medians, and the change.

    cargo build --release -p mailroom-cli && python3 bench/ui_polling_cost.py
    BENCH_FLAGS="--size 16 --auto-ack" UI_INTERVAL=1 RUNS=5 python3 bench/ui_polling_cost.py
"""
import http.client
import json
import os
import shlex
import statistics
import subprocess
import threading
import time

from mailroom_server import mailroom

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("MAILROOM_BIN", os.path.join(REPO, "target", "release", "mailroom"))
QUEUES = int(os.environ.get("QUEUES", "100"))
RUNS = int(os.environ.get("RUNS", "5"))
DURATION = os.environ.get("DURATION", "10")
UI_INTERVAL = float(os.environ.get("UI_INTERVAL", "5"))
SCRAPE_INTERVAL = float(os.environ.get("SCRAPE_INTERVAL", "1"))
BENCH_FLAGS = shlex.split(os.environ.get("BENCH_FLAGS", "--size 1024 --auto-ack"))
AUTH = {"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q=", "Content-Type": "application/json"}
BENCH_QUEUE = "ui-polling-bench"


def get(conn, path, headers=AUTH):
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"GET {path}: {r.status} {body[:200]!r}")
    return len(body)


class Poller:
    """What an open UI tab and a Prometheus server do, on their timers, until stopped."""

    def __init__(self, api_port, prom_port):
        self.api_port, self.prom_port = api_port, prom_port
        self.stop = threading.Event()
        self.requests = 0
        self.threads = [threading.Thread(target=self.ui, daemon=True),
                        threading.Thread(target=self.scrape, daemon=True)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def every(self, interval, work):
        next_at = time.monotonic()
        while not self.stop.is_set():
            work()
            next_at += interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def ui(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=30)
        paths = ["/api/overview", "/api/nodes", "/api/vhosts",
                 "/api/queues?page=1&page_size=50&name=&use_regex=&sort=name&sort_reverse=",
                 f"/api/queues/%2F/{BENCH_QUEUE}"]

        def tick():
            for p in paths:
                get(conn, p)
                self.requests += 1
        self.every(UI_INTERVAL, tick)

    def scrape(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.prom_port, timeout=30)

        def tick():
            for p in ("/metrics", "/metrics/per-object"):
                get(conn, p, headers={})
                self.requests += 1
        self.every(SCRAPE_INTERVAL, tick)


def bench(amqp, pid):
    cmd = [BIN, "bench", "--uri", f"amqp://guest:guest@127.0.0.1:{amqp}/%2F", "--duration", DURATION,
           "--queue-name", BENCH_QUEUE, "--broker-pid", str(pid), *BENCH_FLAGS]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def main():
    with mailroom(BIN, "mailroom-ui-polling-") as (proc, amqp, api_port, prom):
        conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=30)
        for name in [f"idle-{i:05d}" for i in range(QUEUES)]:
            conn.request("PUT", f"/api/queues/%2F/{name}", json.dumps({"durable": False}), AUTH)
            r = conn.getresponse()
            r.read()
            assert r.status in (201, 204), (name, r.status)
        print(f"# {time.strftime('%FT%TZ', time.gmtime())} {os.cpu_count()} cpus, load "
              f"{os.getloadavg()[0]:.2f}; bench {' '.join(BENCH_FLAGS)} for {DURATION}s; {QUEUES} idle queues; "
              f"UI every {UI_INTERVAL}s, scrape every {SCRAPE_INTERVAL}s", flush=True)
        bench(amqp, proc.pid)  # warm-up: declares the bench queue; first allocations, page cache
        per_cpu = {"quiet": [], "polled": []}
        for run in range(RUNS):
            for mode in ("quiet", "polled"):
                if mode == "polled":
                    with Poller(api_port, prom) as poller:
                        res = bench(amqp, proc.pid)
                    extra = f" ({poller.requests} HTTP requests)"
                else:
                    res = bench(amqp, proc.pid)
                    extra = ""
                v = float(res["msgs_per_broker_cpu_s"])
                per_cpu[mode].append(v)
                print(f"run {run + 1} {mode:6} msgs_per_broker_cpu_s={v:.0f} consume_rate={res['consume_rate']} "
                      f"broker_cpu_s={res['broker_cpu_s']}{extra}", flush=True)
        quiet, polled = statistics.median(per_cpu["quiet"]), statistics.median(per_cpu["polled"])
        print(f"RESULT quiet_msgs_per_broker_cpu_s={quiet:.0f} polled_msgs_per_broker_cpu_s={polled:.0f} "
              f"change_pct={(polled - quiet) / quiet * 100:+.2f}")


if __name__ == "__main__":
    main()
