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
import time

from mailroom_server import cpu_seconds, mailroom

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("MAILROOM_BIN", os.path.join(REPO, "target", "release", "mailroom"))
QUEUES = int(os.environ.get("QUEUES", "10000"))
SCRAPES = int(os.environ.get("SCRAPES", "20"))


def main():
    with mailroom(BIN, "mailroom-scrape-") as (proc, _amqp, api_port, prom):
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


def http_client(port):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=60)


if __name__ == "__main__":
    main()
