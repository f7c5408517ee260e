"""Durable delayed-message and deduplicating exchanges across a Mailroom restart on the same data dir:
persistent delayed messages fire after the restart with their remaining delay (also after SIGKILL, once
confirmed), transient ones do not survive, a disk-persisted deduplication cache survives and a memory
one does not. The local RabbitMQ has neither plugin, so these are Mailroom-only."""
import signal
import subprocess
import tempfile
import time

import pika
import pytest

from brokers import _wait_listening, free_port, mailroom_bin, start_mailroom
from helpers import uname

P = pika.BasicProperties
# Slack for a debug build under load: a message may arrive this much after its due time.
LATE_TOLERANCE_S = 0.6


@pytest.fixture
def data_dir(broker):
    if broker.name != "mailroom":
        pytest.skip("the local RabbitMQ has no delayed-message or deduplication plugin (and no restart here)")
    with tempfile.TemporaryDirectory(prefix="mailroom-plugins-restart-") as d:
        yield d


def declare_delayed(ch, x, q):
    ch.exchange_declare(x, "x-delayed-message", durable=True, arguments={"x-delayed-type": "direct"})
    ch.queue_declare(q, durable=True)
    ch.queue_bind(q, x, "k")


def publish_delayed(ch, x, messages):
    """Publishes (body, delay_ms, persistent) with confirms; returns the monotonic time before the first."""
    ch.confirm_delivery()
    start = time.monotonic()
    for body, delay, persistent in messages:
        ch.basic_publish(x, "k", body, properties=P(headers={"x-delay": delay}, delivery_mode=2 if persistent else 1))
    return start


def collect(ch, q, until):
    """basic.get until `until` (monotonic): [(body, arrival time, x-delay header)]."""
    got = []
    while time.monotonic() < until:
        m, p, b = ch.basic_get(q, auto_ack=True)
        if m is None:
            time.sleep(0.01)
            continue
        got.append((b, time.monotonic(), (p.headers or {}).get("x-delay")))
    return got


def test_delayed_messages_fire_after_restart_with_remaining_delay(data_dir):
    x, q = uname("dx"), uname("dq")
    port = free_port()
    with start_mailroom(data_dir=data_dir, port=port) as b:
        conn = pika.BlockingConnection(b.params())
        ch = conn.channel()
        declare_delayed(ch, x, q)
        publish_delayed(ch, x, [(b"before", 100, True)])
        # Released and consumed before the (clean) stop: it must not be released again after the restart.
        assert [g[0] for g in collect(ch, q, time.monotonic() + 0.5)] == [b"before"]
        start = publish_delayed(ch, x, [(b"early", 300, True), (b"late", 2500, True), (b"transient", 2500, False)])
        m, _, _ = ch.basic_get(q, auto_ack=True)
        assert m is None, "nothing released yet"
        conn.close()
    time.sleep(max(0.0, start + 0.5 - time.monotonic()))  # down past "early"'s due time
    with start_mailroom(data_dir=data_dir, port=port) as b:
        conn = pika.BlockingConnection(b.params())
        ch = conn.channel()
        got = collect(ch, q, start + 2.5 + LATE_TOLERANCE_S + 0.5)
        conn.close()
    assert [g[0] for g in got] == [b"early", b"late"], "persistent ones survive, the transient one does not"
    (_, early_at, early_delay), (_, late_at, late_delay) = got
    assert early_at - start < 0.5 + 2.0, "overdue message fires at once after the restart"
    assert late_at - start >= 2.5, "fired before its due time"
    assert late_at - start <= 2.5 + LATE_TOLERANCE_S, f"remaining delay not kept: {late_at - start:.3f} s"
    assert (early_delay, late_delay) == (-300, -2500), "x-delay negated on release"


def test_confirmed_delayed_messages_survive_sigkill(data_dir):
    x, q = uname("dx"), uname("dq")
    port = free_port()
    cmd = [mailroom_bin(), "server", "--amqp-listen", f"127.0.0.1:{port}", "--data-dir", data_dir,
           "--log-level", "warn"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, 20)
        conn = pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{port}/%2F"))
        ch = conn.channel()
        declare_delayed(ch, x, q)
        # Every publish returned only after its confirm: the delay records are on disk.
        start = publish_delayed(ch, x, [(f"m{i}".encode(), 1500 + 10 * i, True) for i in range(50)])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with start_mailroom(data_dir=data_dir, port=port) as b:
        conn = pika.BlockingConnection(b.params())
        ch = conn.channel()
        got = collect(ch, q, start + 2.0 + LATE_TOLERANCE_S + 0.5)
        conn.close()
    assert [g[0] for g in got] == [f"m{i}".encode() for i in range(50)], "all confirmed, all back, in due order"
    for i, (_, at, _) in enumerate(got):
        assert at - start >= 1.5 + 0.01 * i, f"m{i} fired early"


def test_disk_dedup_cache_survives_restart_and_memory_cache_does_not(data_dir):
    port = free_port()
    names = {p: (uname(f"dedup-{p}"), uname(f"dedupq-{p}")) for p in ("disk", "memory")}

    def publish(ch, x, value):
        ch.basic_publish(x, "", value.encode(), properties=P(headers={"x-deduplication-header": value}))

    with start_mailroom(data_dir=data_dir, port=port) as b:
        conn = pika.BlockingConnection(b.params())
        ch = conn.channel()
        ch.confirm_delivery()
        for persistence, (x, q) in names.items():
            ch.exchange_declare(x, "x-message-deduplication", durable=True,
                                arguments={"x-cache-size": 100, "x-cache-ttl": 60000,
                                           "x-cache-persistence": persistence})
            ch.queue_declare(q, durable=True)
            ch.queue_bind(q, x)
            publish(ch, x, "order-1")
            publish(ch, x, "order-1")  # duplicate: dropped, still confirmed
            ch.basic_get(q, auto_ack=True)
        conn.close()
    with start_mailroom(data_dir=data_dir, port=port) as b:
        conn = pika.BlockingConnection(b.params())
        ch = conn.channel()
        ch.confirm_delivery()
        got = {}
        for persistence, (x, q) in names.items():
            publish(ch, x, "order-1")
            publish(ch, x, "order-2")
            got[persistence] = []
            while True:
                m, _, body = ch.basic_get(q, auto_ack=True)
                if m is None:
                    break
                got[persistence].append(body)
        conn.close()
    assert got["disk"] == [b"order-2"], "the disk cache remembered order-1 across the restart"
    assert got["memory"] == [b"order-1", b"order-2"], "the memory cache starts empty after a restart"


def test_confirmed_dedup_values_survive_sigkill(data_dir):
    """A confirmed message's cache entry is on disk no later than its confirm: after SIGKILL its value is
    still remembered."""
    x, q = uname("dedupx"), uname("dedupq")
    port = free_port()
    cmd = [mailroom_bin(), "server", "--amqp-listen", f"127.0.0.1:{port}", "--data-dir", data_dir,
           "--log-level", "warn"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, 20)
        conn = pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{port}/%2F"))
        ch = conn.channel()
        ch.exchange_declare(x, "x-message-deduplication", durable=True,
                            arguments={"x-cache-size": 1000, "x-cache-persistence": "disk"})
        ch.queue_declare(q, durable=True)
        ch.queue_bind(q, x)
        ch.confirm_delivery()
        for i in range(100):
            ch.basic_publish(x, "", b"first", properties=P(headers={"x-deduplication-header": f"v{i}"}))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with start_mailroom(data_dir=data_dir, port=port) as b:
        conn = pika.BlockingConnection(b.params())
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_purge(q)
        for i in range(101):
            ch.basic_publish(x, "", f"again-{i}".encode(), properties=P(headers={"x-deduplication-header": f"v{i}"}))
        m, _, body = ch.basic_get(q, auto_ack=True)
        assert body == b"again-100", "the 100 confirmed values were remembered, the new one was not"
        assert ch.basic_get(q, auto_ack=True)[0] is None
        conn.close()
