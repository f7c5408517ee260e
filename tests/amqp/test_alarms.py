"""Resource alarms: past the memory high watermark, publishing connections are blocked (and told so with
connection.blocked), consumer-only connections keep flowing, and everything resumes below it.

RabbitMQ's watermark is set per node (not per test), so these run against a dedicated Mailroom started with
a tiny watermark; RabbitMQ's own blocked-connection behaviour is the reference for what pika sees."""
import time

import pika
import pytest

from brokers import start_mailroom
from helpers import uname

WATERMARK = 200_000


@pytest.fixture
def small_mailroom(broker):
    if broker.name != "mailroom":
        pytest.skip("needs a broker started with a tiny memory watermark")
    with start_mailroom(["--memory-high-watermark", str(WATERMARK)]) as b:
        yield b


def test_publisher_blocked_past_watermark_consumer_flows_then_unblocked(small_mailroom):
    events = []
    pub_conn = pika.BlockingConnection(small_mailroom.params())
    pub_conn.add_on_connection_blocked_callback(lambda c, m: events.append(("blocked", m.method.reason)))
    pub_conn.add_on_connection_unblocked_callback(lambda c, m: events.append(("unblocked", None)))
    pub = pub_conn.channel()
    q = uname("q")
    pub.queue_declare(q)
    body = b"x" * 100_000
    for _ in range(3):  # 300 KB held > 200 KB watermark
        pub.basic_publish("", q, body)
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        pub_conn.process_data_events(0.05)
    assert events and events[0] == ("blocked", "low on memory")

    # A consumer-only connection is not blocked: it drains the queue.
    cons_conn = pika.BlockingConnection(small_mailroom.params())
    cons = cons_conn.channel()
    got = 0
    deadline = time.monotonic() + 5
    while got < 3 and time.monotonic() < deadline:
        m, _, _ = cons.basic_get(q, auto_ack=True)
        got += m is not None
    assert got == 3

    deadline = time.monotonic() + 5
    while ("unblocked", None) not in events and time.monotonic() < deadline:
        pub_conn.process_data_events(0.05)
    assert ("unblocked", None) in events
    pub.basic_publish("", q, b"after")  # flows again
    deadline = time.monotonic() + 5
    m = None
    while m is None and time.monotonic() < deadline:
        m, _, b = cons.basic_get(q, auto_ack=True)
    assert m is not None and b == b"after"
    cons.queue_delete(q)
    cons_conn.close()
    pub_conn.close()
