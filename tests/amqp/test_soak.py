"""Soak test (issue 15), bounded in time: thousands of connections opening and closing, channels churning,
consumers cancelling while messages flow and permission denials mixed in (the workload: soak.py).

Afterwards the broker must be back where it started: the open file descriptors (/proc/<pid>/fd) and the
tasks alive on its Tokio runtime (`mailroom_runtime_alive_tasks` on /metrics) equal their baseline, and its
resident memory 30 s after the load stopped is within 10% of its baseline. The baseline is taken after a
short warm-up of every lane (lazily created state: the users' permission caches, the durable queue's store
files, thread pools) and an idle settle; the queues are purged after the load, as they were empty then.

Mailroom only (it reads the server's /proc). Knobs: MAILROOM_SOAK_SECONDS (default 150, CI),
MAILROOM_SOAK_BURST (connections per burst, default 400), MAILROOM_SOAK_REPORT (write the figures as JSON
there). The figures of a longer run are in SECURITY.md ("Soak test").
"""
import asyncio
import json
import os
import resource
import threading
import time

import pytest

import soak as load
from brokers import free_port, start_mailroom, targets

SOAK_SECONDS = float(os.environ.get("MAILROOM_SOAK_SECONDS", "150"))
WARMUP_SECONDS = 8.0
RSS_SETTLE_S = 30.0  # RSS is compared this long after the load stopped
RSS_TOLERANCE = 0.10
LEAK_WAIT_S = 20.0  # how long descriptors and tasks may take to come back to their baseline

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(int(SOAK_SECONDS + WARMUP_SECONDS + RSS_SETTLE_S + 240)),
    pytest.mark.skipif("mailroom" not in targets(), reason="Mailroom only (reads the server's /proc)"),
]


def raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard limit (the server does this itself too, crates/mailroom-amqp/src/fds.rs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Process:
    """The server's resource use, read from /proc and its /metrics page."""

    def __init__(self, pid, admin):
        self.pid, self.admin = pid, admin

    def fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_targets(self):
        """What each open descriptor is (a file path, socket:[inode], anon_inode:...), for a failure message."""
        out = []
        for fd in sorted(os.listdir(f"/proc/{self.pid}/fd"), key=int):
            try:
                out.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
            except OSError:
                pass
        return out

    def rss(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def tasks(self):
        return int(self.admin.metrics()["mailroom_runtime_alive_tasks"])

    def connections(self):
        return int(self.admin.metrics()["rabbitmq_connections"])

    def settled(self, timeout=LEAK_WAIT_S):
        """Waits for no connection and for two equal readings of descriptors and tasks 0.5 s apart; returns
        the last of them with the RSS. Each descriptor count is read 0.5 s after the previous metrics scrape,
        whose own HTTP connection holds a descriptor until the server sees it close."""
        deadline = time.monotonic() + timeout
        while self.connections() and time.monotonic() < deadline:
            time.sleep(0.2)
        last = None
        while True:
            time.sleep(0.5)
            now = (self.fds(), self.tasks())
            if now == last or time.monotonic() > deadline:
                break
            last = now
        return {"fds": now[0], "tasks": now[1], "rss": self.rss()}


def wait_equal(read, want, timeout=LEAK_WAIT_S):
    """The reading once it equals `want`, or the last one after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = read()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


def soak(seconds):
    """Starts a Mailroom, warms it up, takes the baseline, runs the soak, measures; returns the figures."""
    raise_nofile()
    http_port = free_port()
    args = ["--http-listen", f"127.0.0.1:{http_port}", "--prometheus-listen", f"127.0.0.1:{free_port()}"]
    with start_mailroom(args, preexec_fn=raise_nofile) as broker:
        admin = load.Admin(http_port)
        pid = int(admin.call("GET", "/api/nodes")[0]["os_pid"])
        proc = Process(pid, admin)
        target = load.Target(broker.port, admin)
        load.prepare(target)
        asyncio.run(load.declare_topology(target))

        warm = asyncio.run(load.run(target, WARMUP_SECONDS, bursts=False))
        assert not warm.errors, f"warm-up errors: {warm.errors[:10]}"
        asyncio.run(load.purge_all(target))
        time.sleep(3)
        base = proc.settled()
        base_fd_targets = proc.fd_targets()

        peak = {"fds": 0, "rss": 0}
        sampling = threading.Event()

        def sample():  # the highest descriptor count and RSS during the load, for the record
            while not sampling.wait(0.5):
                try:
                    peak["fds"], peak["rss"] = max(peak["fds"], proc.fds()), max(peak["rss"], proc.rss())
                except OSError:
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            stats = asyncio.run(load.run(target, seconds))
        finally:
            sampling.set()
            sampler.join()
        asyncio.run(load.purge_all(target))
        stopped = time.monotonic()

        after = proc.settled()
        after["fds"] = wait_equal(proc.fds, base["fds"])
        after["tasks"] = wait_equal(proc.tasks, base["tasks"])
        time.sleep(max(0.0, stopped + RSS_SETTLE_S - time.monotonic()))
        after["rss"] = proc.rss()
        if after["fds"] != base["fds"]:
            after["fd_targets"] = {"before": base_fd_targets, "after": proc.fd_targets()}
        return {
            "seconds": round(stopped - started, 1),
            "stats": stats.figures(),
            "errors": stats.errors[:20],
            "baseline": base,
            "peak": peak,
            "after": after,
        }


def test_soak_returns_to_baseline():
    figures = soak(SOAK_SECONDS)
    report = os.environ.get("MAILROOM_SOAK_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=2))
    s, base, after = figures["stats"], figures["baseline"], figures["after"]
    assert not figures["errors"], f"{s['errors']} unexpected errors, first: {figures['errors']}"
    # The load was what it claims to be.
    assert s["connections"] >= 1000, s
    assert s["channels"] >= 1000 and s["consumers"] >= 100 and s["cancels"] >= 100, s
    assert s["published"] >= 10000 and s["delivered"] >= 1000, s
    for kind in ("declare-403", "publish-403", "consume-403", "bind-403", "login-403", "vhost-530",
                 "max-channels-530"):
        assert s["denials"].get(kind, 0) > 0, f"no {kind} denial: {s['denials']}"
    # And left nothing behind.
    assert after["fds"] == base["fds"], (
        f"open descriptors: {base['fds']} before, {after['fds']} after: {after.get('fd_targets')}")
    assert after["tasks"] == base["tasks"], f"runtime tasks: {base['tasks']} before, {after['tasks']} after"
    assert after["rss"] <= base["rss"] * (1 + RSS_TOLERANCE), (
        f"RSS {RSS_SETTLE_S:.0f} s after the load: {after['rss'] >> 10} KiB, baseline {base['rss'] >> 10} KiB")
