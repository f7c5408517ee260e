"""A full disk: publishers of persistent messages are nacked (never a crash or a hang), the broker keeps
serving, and publishing resumes when space returns; the free-disk alarm blocks publishers before that.
Mailroom-only: needs a tiny filesystem (a tmpfs, mounted as root) under a dedicated broker."""
import os
import subprocess
import tempfile
import time

import pika
import pytest

from brokers import start_mailroom
from helpers import uname

PERSISTENT = pika.BasicProperties(delivery_mode=2)


@pytest.fixture
def tiny_fs(broker):
    if broker.name != "mailroom":
        pytest.skip("needs a broker whose data dir is on a tiny filesystem")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tempfile.mkdtemp(prefix="mailroom-tinyfs-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", d], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], capture_output=True)
        os.rmdir(d)


def test_full_disk_nacks_then_recovers(tiny_fs):
    with start_mailroom(["--disk-free-limit", "0"], data_dir=tiny_fs) as b:
        params = b.params()
        # A store that cannot write raises the store alarm (checked every 200 ms), which blocks publishing
        # connections as RabbitMQ's alarms do; when it catches this loop mid-way, the publisher is blocked
        # instead of nacked, and gives up after the timeout (a race the test used to lose by hanging).
        params.blocked_connection_timeout = 5
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.confirm_delivery()
        q = uname("full")
        ch.queue_declare(q, durable=True)
        body = b"x" * (1024 * 1024)
        acked = nacked = 0
        blocked = False
        for _ in range(60):  # 60 MiB into a 24 MiB filesystem
            try:
                ch.basic_publish("", q, body, properties=PERSISTENT)
                acked += 1
            except pika.exceptions.NackError:
                nacked += 1
            except pika.exceptions.AMQPConnectionError:
                blocked = True
                break
        assert acked > 0 and (nacked > 0 or blocked), (acked, nacked, blocked)
        # The broker still serves a connection that does not publish: drain everything, which settles the
        # records and frees the segments.
        admin = pika.BlockingConnection(b.params())
        other = admin.channel()
        assert other.queue_declare(q, passive=True).method.message_count >= acked
        other.queue_purge(q)
        admin.close()
        deadline = time.monotonic() + 10
        recovered = False
        while not recovered and time.monotonic() < deadline:
            try:
                if blocked or not conn.is_open:
                    conn = pika.BlockingConnection(params)
                    ch = conn.channel()
                    ch.confirm_delivery()
                    blocked = False
                ch.basic_publish("", q, b"after", properties=PERSISTENT)
                recovered = True
            except pika.exceptions.NackError:
                time.sleep(0.2)
            except pika.exceptions.AMQPConnectionError:
                blocked = True
                time.sleep(0.2)
        assert recovered, "publishing did not resume after space returned"
        conn.close()


def test_free_disk_alarm_blocks_publishers(broker):
    if broker.name != "mailroom":
        pytest.skip("needs a broker started with an unreachable free-disk limit")
    with start_mailroom(["--disk-free-limit", str(10**18)]) as b:
        events = []
        conn = pika.BlockingConnection(b.params())
        conn.add_on_connection_blocked_callback(lambda c, m: events.append(m.method.reason))
        ch = conn.channel()
        q = uname("dq")
        ch.queue_declare(q)
        ch.basic_publish("", q, b"m")
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            conn.process_data_events(0.05)
        assert events == ["low on disk"]
        # No graceful close: a blocked connection is not read (as in RabbitMQ), so connection.close would wait
        # for the alarm to clear. The broker's shutdown closes it.
