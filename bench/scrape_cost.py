#!/usr/bin/env python3
"""Broker CPU per Prometheus scrape with many queues (issue 16: a /metrics/per-object scrape of 10,000
queues costs under 50 ms of broker CPU).

Starts `mailroom server` (MAILROOM_BIN, default target/release/mailroom) on free ports, declares QUEUES
queues (default 10,000) through the management API, each holding one message, then scrapes
/metrics/per-object and /metrics SCRAPES times each (default 20) and reports the broker's CPU time per
scrape (utime + stime of the broker process, from /proc/<pid>/stat), wall time and page size.

    cargo build --release -p mailroom-cli && python3 bench/scrape_cost.py
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("MAILROOM_BIN", os.path.join(REPO, "target", "release", "mailroom"))
QUEUES = int(os.environ.get("QUEUES", "10000"))
SCRAPES = int(os.environ.get("SCRAPES", "20"))
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def wait_port(port, proc):
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"mailroom exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listening on {port}")


def main():
    amqp, api_port, prom = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="mailroom-scrape-") as data:
        proc = subprocess.Popen([BIN, "server", "--amqp-listen", f"127.0.0.1:{amqp}", "--http-listen",
                                 f"127.0.0.1:{api_port}", "--prometheus-listen", f"127.0.0.1:{prom}",
                                 "--data-dir", data, "--log-level", "warn"], stdout=subprocess.DEVNULL)
        try:
            wait_port(api_port, proc)
            wait_port(prom, proc)
            conn = http_client(api_port)
            auth = {"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q=", "Content-Type": "application/json"}
            body = json.dumps({"routing_key": "", "payload": "x", "payload_encoding": "string", "properties": {}})
            for i in range(QUEUES):
                name = f"scrape-{i:05d}"
                conn.request("PUT", f"/api/queues/%2F/{name}", json.dumps({"durable": False}), auth)
                r = conn.getresponse()
                r.read()
                assert r.status in (201, 204), (name, r.status)
                conn.request("POST", "/api/exchanges/%2F/amq.default/publish",
                             body.replace('"routing_key": ""', f'"routing_key": "{name}"'), auth)
                r = conn.getresponse()
                assert b'"routed":true' in r.read(), name
            scraper = http_client(prom)
            for path in ("/metrics/per-object", "/metrics"):
                scraper.request("GET", path)
                size = len(scraper.getresponse().read())  # warm-up
                cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
                for _ in range(SCRAPES):
                    scraper.request("GET", path)
                    scraper.getresponse().read()
                cpu = (cpu_seconds(proc.pid) - cpu0) / SCRAPES
                wall = (time.monotonic() - wall0) / SCRAPES
                print(f"{path}: {QUEUES} queues, {size} bytes, broker CPU {cpu * 1e3:.1f} ms/scrape, "
                      f"wall {wall * 1e3:.1f} ms/scrape ({SCRAPES} scrapes, {os.path.basename(os.path.dirname(BIN))} build)")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def http_client(port):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=60)


if __name__ == "__main__":
    main()
