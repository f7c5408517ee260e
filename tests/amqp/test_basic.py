"""basic.*: publish, get, consume, ack/nack/reject, recover, qos, cancel, return, CC/BCC."""
import datetime
import decimal
import struct
import time

import pika
import pika.exceptions as pex
import pika.spec as spec
import pytest
from pika.compat import long

from helpers import (ACCESS_REFUSED, NO_ROUTE, NOT_ALLOWED, NOT_FOUND, NOT_IMPLEMENTED,
                     PRECONDITION_FAILED, RawConn, assert_empty, consume_n, expect_channel_error,
                     expect_connection_error, get, get_bodies, message_count, publish_raw, uname, wait_count,
                     wait_until)

P = pika.BasicProperties


def publish_n(ch, q, n, prefix=""):
    for i in range(n):
        ch.basic_publish("", q, f"{prefix}{i}".encode())


# ------------------------------------------------------------ round trips

def full_properties():
    return P(
        content_type="application/json",
        content_encoding="gzip",
        headers={
            "str": "text é",
            "bytes": b"\x00\x01\xff",
            "int": 42,
            "neg": -7,
            "long": long(1 << 40),
            "int64min": long(-(1 << 63)),
            "true": True,
            "false": False,
            "decimal": decimal.Decimal("3.14"),
            "timestamp": datetime.datetime(2024, 2, 29, 12, 30, 45, tzinfo=datetime.timezone.utc),
            "void": None,
            "array": [1, "two", [3, {"four": 4}], True, None, b"x"],
            "empty-array": [],
            "table": {"nested": {"deeper": {"k": "v", "n": 1}}, "list": ["a"]},
            "empty-table": {},
        },
        delivery_mode=2,
        priority=7,
        correlation_id="corr-1",
        reply_to="reply-queue",
        expiration="60000",
        message_id="msg-1",
        timestamp=1700000000,
        type="order.created",
        user_id="guest",
        app_id="mailroom-tests",
        cluster_id="cluster-x",
    )


def assert_props_equal(got, sent):
    for attr in ("content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
                 "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id",
                 "cluster_id"):
        assert getattr(got, attr) == getattr(sent, attr), attr
    assert got.headers == sent.headers


def test_all_properties_roundtrip_get(amqp):
    q = amqp.queue()
    sent = full_properties()
    amqp.ch.basic_publish("", q, b"body", properties=sent)
    m, p, b = get(amqp.ch, q)
    assert b == b"body"
    assert_props_equal(p, sent)
    assert isinstance(p.headers["long"], int)


def test_all_properties_roundtrip_consume(amqp):
    q = amqp.queue()
    sent = full_properties()
    amqp.ch.basic_publish("", q, b"body", properties=sent)
    [(m, p, b)] = consume_n(amqp.ch, q, 1)
    assert b == b"body"
    assert_props_equal(p, sent)


def test_no_properties_roundtrip(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"plain")
    m, p, b = get(amqp.ch, q)
    assert b == b"plain"
    for attr in ("content_type", "headers", "delivery_mode", "priority", "correlation_id",
                 "expiration", "message_id", "timestamp", "user_id"):
        assert getattr(p, attr) is None, attr


def _table_entry(key, tag, value_bytes):
    k = key.encode()
    return bytes([len(k)]) + k + tag + value_bytes


def raw_headers_table():
    """A field table using every type RabbitMQ parses, built by hand."""
    entries = [
        _table_entry("b", b"b", struct.pack(">b", -5)),
        _table_entry("B", b"B", struct.pack(">B", 250)),
        _table_entry("s", b"s", struct.pack(">h", -300)),
        _table_entry("u", b"u", struct.pack(">H", 60000)),
        _table_entry("I", b"I", struct.pack(">i", -70000)),
        _table_entry("i", b"i", struct.pack(">I", 4000000000)),
        _table_entry("l", b"l", struct.pack(">q", -(1 << 50))),
        _table_entry("f", b"f", struct.pack(">f", 1.5)),
        _table_entry("d", b"d", struct.pack(">d", -2.25)),
        _table_entry("D", b"D", struct.pack(">Bi", 2, 12345)),
        _table_entry("S", b"S", struct.pack(">I", 3) + b"abc"),
        _table_entry("x", b"x", struct.pack(">I", 2) + b"\x00\xff"),
        _table_entry("t", b"t", b"\x01"),
        _table_entry("T", b"T", struct.pack(">Q", 1700000000)),
        _table_entry("V", b"V", b""),
    ]
    inner = _table_entry("k", b"I", struct.pack(">i", 1))
    entries.append(_table_entry("F", b"F", struct.pack(">I", len(inner)) + inner))
    arr = b"I" + struct.pack(">i", 1) + b"S" + struct.pack(">I", 1) + b"z" + b"b" + b"\x07"
    entries.append(_table_entry("A", b"A", struct.pack(">I", len(arr)) + arr))
    # keys deliberately not sorted: the broker must not reorder them
    entries.append(_table_entry("zz-last-but-not-sorted", b"t", b"\x00"))
    entries.append(_table_entry("aa", b"t", b"\x01"))
    body = b"".join(entries)
    return struct.pack(">I", len(body)) + body


def test_raw_content_header_bytes_roundtrip(broker):
    """Property bytes published are delivered byte for byte (no reordering or re-encoding)."""
    q = uname("raw")
    body = b"hello"
    with RawConn(broker) as rc:
        rc.handshake()
        rc.open_channel(1)
        rc.send_method(1, spec.Queue.Declare(queue=q, exclusive=True))
        rc.expect(spec.Queue.DeclareOk)
        # content-type, headers, delivery-mode, priority, message-id, timestamp
        flags = 0x8000 | 0x2000 | 0x1000 | 0x0800 | 0x0080 | 0x0040
        props = (bytes([16]) + b"application/json" + raw_headers_table() + b"\x02" + b"\x05"
                 + bytes([3]) + b"mid" + struct.pack(">Q", 1700000001))
        header_payload = struct.pack(">HHQH", 60, 0, len(body), flags) + props
        rc.send_method(1, spec.Basic.Publish(exchange="", routing_key=q))
        rc.send(struct.pack(">BHI", 2, 1, len(header_payload)) + header_payload + b"\xce")
        rc.send(pika.frame.Body(1, body).marshal())
        deadline = time.monotonic() + 5
        while True:
            rc.send_method(1, spec.Basic.Get(queue=q, no_ack=True))
            f = rc.read_method()
            if isinstance(f.method, spec.Basic.GetOk):
                break
            assert isinstance(f.method, spec.Basic.GetEmpty)
            assert time.monotonic() < deadline, "message never arrived"
            time.sleep(0.05)
        ftype, chan, payload = rc.read_raw()
        assert (ftype, chan) == (2, 1)
        assert payload == header_payload
        ftype, chan, payload = rc.read_raw()
        assert (ftype, chan, payload) == (3, 1, body)


def test_empty_body(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"", properties=P(content_type="text/plain"))
    m, p, b = get(amqp.ch, q)
    assert b == b"" and p.content_type == "text/plain"
    amqp.ch.basic_publish("", q, b"")
    [(m, p, b)] = consume_n(amqp.ch, q, 1)
    assert b == b""


def test_raw_empty_body_has_no_body_frame(broker):
    q = uname("raw")
    with RawConn(broker) as rc:
        rc.handshake()
        rc.open_channel(1)
        rc.send_method(1, spec.Queue.Declare(queue=q, exclusive=True))
        rc.expect(spec.Queue.DeclareOk)
        rc.send_method(1, spec.Basic.Publish(exchange="", routing_key=q))
        rc.send(pika.frame.Header(1, 0, P()).marshal())
        rc.send_method(1, spec.Basic.Consume(queue=q, consumer_tag="c", no_ack=True))
        rc.expect(spec.Basic.ConsumeOk)
        rc.expect(spec.Basic.Deliver)
        f = rc.read()
        assert isinstance(f, pika.frame.Header) and f.body_size == 0
        rc.send_method(1, spec.Basic.Cancel(consumer_tag="c"))
        # the next frame is cancel-ok, not an empty body frame
        rc.expect(spec.Basic.CancelOk)


def test_body_5mib(amqp):
    q = amqp.queue()
    body = bytes(range(256)) * (5 * 4096)
    assert len(body) == 5 * 1024 * 1024
    amqp.ch.basic_publish("", q, body)
    assert get(amqp.ch, q, timeout=20)[2] == body


@pytest.mark.slow
def test_body_32mib(amqp):
    q = amqp.queue()
    body = (b"0123456789abcdef" * 65536) * 32
    assert len(body) == 32 * 1024 * 1024
    amqp.ch.basic_publish("", q, body)
    assert get(amqp.ch, q, timeout=60)[2] == body


# ----------------------------------------------------------------- get

def test_get_empty(amqp):
    q = amqp.queue()
    assert amqp.ch.basic_get(q) == (None, None, None)


def test_get_missing_queue_404(amqp):
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.basic_get(uname("missing"))


def test_get_ok_fields(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 3)
    wait_until(lambda: message_count(amqp.ch, q) == 3)
    m, _, b = amqp.ch.basic_get(q, auto_ack=False)
    assert b == b"0"
    assert m.delivery_tag == 1
    assert m.redelivered is False
    assert m.exchange == "" and m.routing_key == q
    assert m.message_count == 2
    m2, _, _ = amqp.ch.basic_get(q, auto_ack=False)
    assert m2.delivery_tag == 2 and m2.message_count == 1


def test_get_fifo(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 20)
    assert get_bodies(amqp.ch, q, 20) == [str(i).encode() for i in range(20)]


# ------------------------------------------------------------- consume

def test_consume_and_ack(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 5)
    got = consume_n(amqp.ch, q, 5, auto_ack=False)
    assert [b for _, _, b in got] == [str(i).encode() for i in range(5)]
    tags = [m.delivery_tag for m, _, _ in got]
    assert tags == [1, 2, 3, 4, 5]
    for t in tags:
        amqp.ch.basic_ack(t)
    amqp.ch.close()
    assert message_count(amqp.channel(), q) == 0


def test_consume_deliver_fields(amqp):
    x = amqp.exchange("direct")
    q = amqp.bound_queue(x, "rk")
    amqp.ch.basic_publish(x, "rk", b"m")
    [(m, _, _)] = consume_n(amqp.ch, q, 1, auto_ack=False)
    assert m.exchange == x and m.routing_key == "rk" and m.redelivered is False
    assert m.delivery_tag == 1
    assert m.consumer_tag


def test_unacked_redelivered_after_channel_close(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 3)
    ch = amqp.channel()
    consume_n(ch, q, 3, auto_ack=False)
    ch.close()
    got = consume_n(amqp.ch, q, 3, auto_ack=True)
    assert [b for _, _, b in got] == [b"0", b"1", b"2"]
    assert all(m.redelivered for m, _, _ in got)


def test_reject_requeue_keeps_position(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 3)
    m0, _, _ = get(amqp.ch, q, auto_ack=False)
    m1, _, _ = get(amqp.ch, q, auto_ack=False)
    amqp.ch.basic_reject(m0.delivery_tag, requeue=True)
    amqp.ch.basic_nack(m1.delivery_tag, multiple=False, requeue=True)
    got = [get(amqp.ch, q) for _ in range(3)]
    assert [b for _, _, b in got] == [b"0", b"1", b"2"]
    assert [m.redelivered for m, _, _ in got] == [True, True, False]


def test_reject_no_requeue_drops(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 2)
    m, _, _ = get(amqp.ch, q, auto_ack=False)
    amqp.ch.basic_reject(m.delivery_tag, requeue=False)
    m, _, b = get(amqp.ch, q)
    assert b == b"1"
    assert_empty(amqp.ch, q)


def test_nack_multiple(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 4)
    tags = [get(amqp.ch, q, auto_ack=False)[0].delivery_tag for _ in range(4)]
    amqp.ch.basic_nack(tags[2], multiple=True, requeue=True)  # 1..3 back, 4 still unacked
    assert wait_count(amqp.ch, q, 3) == 3
    got = [get(amqp.ch, q) for _ in range(3)]
    assert [b for _, _, b in got] == [b"0", b"1", b"2"]
    assert all(m.redelivered for m, _, _ in got)
    amqp.ch.basic_ack(tags[3])
    assert_empty(amqp.ch, q)


def test_nack_multiple_no_requeue(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 3)
    tags = [get(amqp.ch, q, auto_ack=False)[0].delivery_tag for _ in range(3)]
    amqp.ch.basic_nack(tags[-1], multiple=True, requeue=False)
    amqp.ch.close()
    assert message_count(amqp.channel(), q) == 0


def test_nack_zero_multiple_requeues_all(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 3)
    for _ in range(3):
        get(amqp.ch, q, auto_ack=False)
    amqp.ch.basic_nack(0, multiple=True, requeue=True)
    assert get_bodies(amqp.ch, q, 3) == [b"0", b"1", b"2"]


def test_ack_multiple(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 4)
    tags = [get(amqp.ch, q, auto_ack=False)[0].delivery_tag for _ in range(4)]
    amqp.ch.basic_ack(tags[1], multiple=True)  # acks 1 and 2
    amqp.ch.close()
    ch = amqp.channel()
    got = [get(ch, q) for _ in range(2)]
    assert [b for _, _, b in got] == [b"2", b"3"]
    assert all(m.redelivered for m, _, _ in got)


def test_ack_zero_multiple_acks_all(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 3)
    for _ in range(3):
        get(amqp.ch, q, auto_ack=False)
    amqp.ch.basic_ack(0, multiple=True)
    amqp.ch.close()
    assert_empty(amqp.channel(), q)


def test_ack_unknown_tag_406(amqp):
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_ack(99)


def test_ack_zero_single_406(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    get(amqp.ch, q, auto_ack=False)
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_ack(0, multiple=False)


def test_double_ack_406(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    m, _, _ = get(amqp.ch, q, auto_ack=False)
    amqp.ch.basic_ack(m.delivery_tag)
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_ack(m.delivery_tag)


def test_ack_after_nack_406(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    m, _, _ = get(amqp.ch, q, auto_ack=False)
    amqp.ch.basic_nack(m.delivery_tag, requeue=True)
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_ack(m.delivery_tag)


def test_reject_unknown_tag_406(amqp):
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_reject(7)


def test_nack_unknown_tag_406(amqp):
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_nack(7)


def test_ack_tag_of_no_ack_get_406(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    m, _, _ = get(amqp.ch, q, auto_ack=True)
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_ack(m.delivery_tag)


def test_ack_tag_of_no_ack_consumer_406(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    [(m, _, _)] = consume_n(amqp.ch, q, 1, auto_ack=True)
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_ack(m.delivery_tag)


def test_ack_on_other_channel_406(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    m, _, _ = get(amqp.ch, q, auto_ack=False)
    ch2 = amqp.channel()
    with expect_channel_error(ch2, PRECONDITION_FAILED):
        ch2.basic_ack(m.delivery_tag)


def test_delivery_tags_per_channel(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 4)
    ch2 = amqp.channel()
    assert get(amqp.ch, q, auto_ack=False)[0].delivery_tag == 1
    assert get(ch2, q, auto_ack=False)[0].delivery_tag == 1
    assert get(amqp.ch, q, auto_ack=True)[0].delivery_tag == 2
    assert get(ch2, q, auto_ack=False)[0].delivery_tag == 2


# ------------------------------------------------------------- recover

def test_recover_requeue_redelivers(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 2)
    for _ in range(2):
        get(amqp.ch, q, auto_ack=False)
    amqp.ch.basic_recover(requeue=True)
    got = [get(amqp.ch, q) for _ in range(2)]
    assert [b for _, _, b in got] == [b"0", b"1"]
    assert all(m.redelivered for m, _, _ in got)


def test_recover_requeue_to_consumer(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 2)
    got = []
    amqp.ch.basic_consume(q, lambda ch, m, p, b: got.append((m.redelivered, b)))
    wait_until(lambda: len(got) == 2, conn=amqp.conn)
    amqp.ch.basic_recover(requeue=True)
    wait_until(lambda: len(got) == 4, conn=amqp.conn)
    assert got == [(False, b"0"), (False, b"1"), (True, b"0"), (True, b"1")]


def test_recover_no_requeue_540(amqp):
    with expect_connection_error(amqp.conn, NOT_IMPLEMENTED):
        amqp.ch.basic_recover(requeue=False)


# ----------------------------------------------------------------- qos

def _count_deliveries(amqp, ch, q, wait=0.5, auto_ack=False):
    got = []
    tag = ch.basic_consume(q, lambda c, m, p, b: got.append(m), auto_ack=auto_ack)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        amqp.conn.process_data_events(time_limit=0.05)
    return tag, got


def test_prefetch_limits_unacked(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 10)
    amqp.ch.basic_qos(prefetch_count=3)
    _, got = _count_deliveries(amqp, amqp.ch, q)
    assert len(got) == 3
    amqp.ch.basic_ack(got[0].delivery_tag)
    wait_until(lambda: len(got) == 4, timeout=2, conn=amqp.conn)
    amqp.conn.process_data_events(time_limit=0.3)
    assert len(got) == 4
    amqp.ch.basic_ack(got[-1].delivery_tag, multiple=True)
    wait_until(lambda: len(got) == 7, timeout=2, conn=amqp.conn)
    assert len(got) == 7


def test_prefetch_zero_is_unlimited(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 50)
    amqp.ch.basic_qos(prefetch_count=0)
    _, got = _count_deliveries(amqp, amqp.ch, q, wait=1.0)
    assert len(got) == 50


def test_prefetch_ignored_for_no_ack(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 10)
    amqp.ch.basic_qos(prefetch_count=1)
    _, got = _count_deliveries(amqp, amqp.ch, q, auto_ack=True)
    assert len(got) == 10


def test_qos_per_consumer(amqp):
    qa, qb = amqp.queue(), amqp.queue()
    publish_n(amqp.ch, qa, 5)
    publish_n(amqp.ch, qb, 5)
    amqp.ch.basic_qos(prefetch_count=2, global_qos=False)
    _, ga = _count_deliveries(amqp, amqp.ch, qa, wait=0.3)
    _, gb = _count_deliveries(amqp, amqp.ch, qb, wait=0.3)
    assert (len(ga), len(gb)) == (2, 2)


def test_qos_global_shared_by_channel(amqp):
    qa, qb = amqp.queue(), amqp.queue()
    publish_n(amqp.ch, qa, 5)
    publish_n(amqp.ch, qb, 5)
    amqp.ch.basic_qos(prefetch_count=3, global_qos=True)
    _, ga = _count_deliveries(amqp, amqp.ch, qa, wait=0.3)
    _, gb = _count_deliveries(amqp, amqp.ch, qb, wait=0.3)
    assert len(ga) + len(gb) == 3
    assert len(ga) == 3


def test_qos_prefetch_size_540(amqp):
    with expect_connection_error(amqp.conn, NOT_IMPLEMENTED):
        amqp.ch.basic_qos(prefetch_size=1024, prefetch_count=1)


def test_competing_consumers_round_robin(amqp):
    q = amqp.queue()
    got = {"a": [], "b": []}
    ch_a, ch_b = amqp.channel(), amqp.channel()
    ch_a.basic_consume(q, lambda c, m, p, b: got["a"].append(b), auto_ack=True)
    ch_b.basic_consume(q, lambda c, m, p, b: got["b"].append(b), auto_ack=True)
    publish_n(amqp.ch, q, 10)
    wait_until(lambda: len(got["a"]) + len(got["b"]) == 10, conn=amqp.conn)
    assert sorted(got["a"] + got["b"]) == sorted(str(i).encode() for i in range(10))
    assert len(got["a"]) == 5 and len(got["b"]) == 5
    evens = [str(i).encode() for i in range(0, 10, 2)]
    odds = [str(i).encode() for i in range(1, 10, 2)]
    assert sorted([got["a"], got["b"]]) == sorted([evens, odds])


# -------------------------------------------------------------- cancel

def test_cancel_stops_deliveries(amqp):
    q = amqp.queue()
    got = []
    tag = amqp.ch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    amqp.ch.basic_publish("", q, b"1")
    wait_until(lambda: got, conn=amqp.conn)
    amqp.ch.basic_cancel(tag)
    amqp.ch.basic_publish("", q, b"2")
    amqp.conn.process_data_events(time_limit=0.3)
    assert got == [b"1"]
    assert get(amqp.ch, q)[2] == b"2"


def test_cancel_unknown_tag_ok(amqp):
    impl = amqp.ch._impl
    # pika refuses to cancel a tag it does not know; send the method directly.
    done = []
    impl._rpc(spec.Basic.Cancel(consumer_tag="no-such-tag"), lambda f: done.append(f), [spec.Basic.CancelOk])
    wait_until(lambda: done, conn=amqp.conn)
    assert done[0].method.consumer_tag == "no-such-tag"


def test_unacked_stay_after_cancel(amqp):
    q = amqp.queue()
    publish_n(amqp.ch, q, 2)
    amqp.ch.basic_qos(prefetch_count=2)
    got = []
    tag = amqp.ch.basic_consume(q, lambda c, m, p, b: got.append(m))
    wait_until(lambda: len(got) == 2, conn=amqp.conn)
    amqp.ch.basic_cancel(tag)
    assert message_count(amqp.ch, q) == 0
    amqp.ch.basic_ack(got[1].delivery_tag, multiple=True)  # still ackable after cancel
    amqp.ch.close()
    assert_empty(amqp.channel(), q)


def test_duplicate_consumer_tag_530(broker):
    """pika refuses a duplicate tag client-side, so this one is raw."""
    q = uname("raw")
    with RawConn(broker) as rc:
        rc.handshake()
        rc.open_channel(1)
        rc.send_method(1, spec.Queue.Declare(queue=q, exclusive=True))
        rc.expect(spec.Queue.DeclareOk)
        rc.send_method(1, spec.Basic.Consume(queue=q, consumer_tag="dup"))
        rc.expect(spec.Basic.ConsumeOk)
        rc.send_method(1, spec.Basic.Consume(queue=q, consumer_tag="dup"))
        close = rc.expect_connection_close(NOT_ALLOWED)
        assert (close.class_id, close.method_id) == (60, 20)


def test_same_consumer_tag_on_two_channels_ok(amqp):
    q = amqp.queue()
    amqp.ch.basic_consume(q, lambda *a: None, consumer_tag="same")
    amqp.channel().basic_consume(q, lambda *a: None, consumer_tag="same")


def test_server_named_consumer_tag(broker):
    q = uname("raw")
    with RawConn(broker) as rc:
        rc.handshake()
        rc.open_channel(1)
        rc.send_method(1, spec.Queue.Declare(queue=q, exclusive=True))
        rc.expect(spec.Queue.DeclareOk)
        rc.send_method(1, spec.Basic.Consume(queue=q, consumer_tag=""))
        t1 = rc.expect(spec.Basic.ConsumeOk).method.consumer_tag
        rc.send_method(1, spec.Basic.Consume(queue=q, consumer_tag=""))
        t2 = rc.expect(spec.Basic.ConsumeOk).method.consumer_tag
        assert t1.startswith("amq.ctag-") and t2.startswith("amq.ctag-") and t1 != t2


def test_consume_missing_queue_404(amqp):
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.basic_consume(uname("missing"), lambda *a: None)


def test_exclusive_consumer_blocks_others_403(amqp):
    q = amqp.queue()
    amqp.ch.basic_consume(q, lambda *a: None, exclusive=True)
    ch2 = amqp.channel()
    with expect_channel_error(ch2, ACCESS_REFUSED):
        ch2.basic_consume(q, lambda *a: None)


def test_exclusive_consume_with_existing_consumer_403(amqp):
    q = amqp.queue()
    amqp.ch.basic_consume(q, lambda *a: None)
    ch2 = amqp.channel()
    with expect_channel_error(ch2, ACCESS_REFUSED):
        ch2.basic_consume(q, lambda *a: None, exclusive=True)


def test_server_cancel_on_queue_delete(amqp):
    q = amqp.queue()
    cancels = []
    amqp.ch.add_on_cancel_callback(lambda frame: cancels.append(frame.method.consumer_tag))
    tag = amqp.ch.basic_consume(q, lambda *a: None)
    other = amqp.channel()
    other.queue_delete(q)
    wait_until(lambda: cancels, conn=amqp.conn)
    assert cancels == [tag]
    assert amqp.ch.is_open
    amqp.ch.exchange_declare("amq.direct", passive=True)


def test_server_cancel_ends_consume_generator(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    ch2 = amqp.channel()
    seen = []
    for m, p, b in amqp.ch.consume(q, auto_ack=True, inactivity_timeout=3):
        if m is None:
            break
        seen.append(b)
        ch2.queue_delete(q)
    assert seen == [b"m"]  # generator ended by the broker's basic.cancel, not by the timeout


def test_consumer_priority(amqp):
    q = amqp.queue()
    got = {"low": [], "high": []}
    ch_low, ch_high = amqp.channel(), amqp.channel()
    ch_low.basic_consume(q, lambda c, m, p, b: got["low"].append(b), auto_ack=True,
                         arguments={"x-priority": 1})
    ch_high.basic_consume(q, lambda c, m, p, b: got["high"].append(b), auto_ack=True,
                          arguments={"x-priority": 10})
    publish_n(amqp.ch, q, 5)
    wait_until(lambda: len(got["high"]) == 5, conn=amqp.conn)
    assert len(got["high"]) == 5 and got["low"] == []


# ------------------------------------------------------------ priority queue

def test_priority_queue_order(amqp):
    q = amqp.queue(arguments={"x-max-priority": 5})
    for body, prio in [(b"p1", 1), (b"none", None), (b"p5", 5), (b"p9", 9), (b"p3", 3), (b"p0", 0)]:
        amqp.ch.basic_publish("", q, body, properties=P(priority=prio))
    wait_until(lambda: message_count(amqp.ch, q) == 6)
    # above-max counts as max (FIFO with p5); none counts as 0 (FIFO with p0)
    assert get_bodies(amqp.ch, q, 6) == [b"p5", b"p9", b"p3", b"p1", b"none", b"p0"]


# --------------------------------------------------------- publish errors

def test_mandatory_unroutable_returned(amqp):
    x = amqp.exchange("direct")
    returns = []
    amqp.ch.add_on_return_callback(lambda c, m, p, b: returns.append((m, p, b)))
    amqp.ch.basic_publish(x, "nowhere", b"lost", properties=P(message_id="r1"), mandatory=True)
    wait_until(lambda: returns, conn=amqp.conn)
    m, p, b = returns[0]
    assert m.reply_code == NO_ROUTE and m.reply_text == "NO_ROUTE"
    assert m.exchange == x and m.routing_key == "nowhere"
    assert b == b"lost" and p.message_id == "r1"


def test_mandatory_default_exchange_missing_queue_returned(amqp):
    returns = []
    amqp.ch.add_on_return_callback(lambda c, m, p, b: returns.append(m))
    amqp.ch.basic_publish("", uname("nobody"), b"lost", mandatory=True)
    wait_until(lambda: returns, conn=amqp.conn)
    assert returns[0].reply_code == NO_ROUTE and returns[0].exchange == ""


def test_mandatory_routable_not_returned(amqp):
    q = amqp.queue()
    returns = []
    amqp.ch.add_on_return_callback(lambda *a: returns.append(a))
    amqp.ch.basic_publish("", q, b"ok", mandatory=True)
    assert get(amqp.ch, q)[2] == b"ok"
    amqp.conn.process_data_events(time_limit=0.2)
    assert returns == []


def test_immediate_540(amqp):
    q = amqp.queue()
    with expect_connection_error(amqp.conn, NOT_IMPLEMENTED, ch=amqp.ch):
        publish_raw(amqp.ch, "", q, b"m", immediate=True)


def test_cc_and_bcc(amqp):
    x = amqp.exchange("direct")
    qa, qb, qc, qd = (amqp.bound_queue(x, k) for k in ("a", "b", "c", "d"))
    headers = {"CC": ["b"], "BCC": ["c"], "keep": 1}
    amqp.ch.basic_publish(x, "a", b"m", properties=P(headers=headers))
    for q in (qa, qb, qc):
        m, p, b = get(amqp.ch, q)
        assert b == b"m"
        assert m.routing_key == "a"
        assert p.headers == {"CC": ["b"], "keep": 1}, p.headers
    assert_empty(amqp.ch, qd)


def test_cc_overlapping_one_copy(amqp):
    x = amqp.exchange("direct")
    qa = amqp.bound_queue(x, "a")
    amqp.ch.queue_bind(qa, x, routing_key="b")
    amqp.ch.basic_publish(x, "a", b"m", properties=P(headers={"CC": ["b", "a"], "BCC": ["b"]}))
    assert get(amqp.ch, qa)[2] == b"m"
    assert_empty(amqp.ch, qa)


def test_cc_topic(amqp):
    x = amqp.exchange("topic")
    q = amqp.bound_queue(x, "news.#")
    amqp.ch.basic_publish(x, "other", b"m", properties=P(headers={"CC": ["news.sport"]}))
    m, p, b = get(amqp.ch, q)
    assert b == b"m" and m.routing_key == "other"


def test_cc_mandatory_routed_by_cc_not_returned(amqp):
    x = amqp.exchange("direct")
    q = amqp.bound_queue(x, "b")
    returns = []
    amqp.ch.add_on_return_callback(lambda *a: returns.append(a))
    amqp.ch.basic_publish(x, "a", b"m", properties=P(headers={"BCC": ["b"]}), mandatory=True)
    m, p, b = get(amqp.ch, q)
    assert p.headers == {}
    amqp.conn.process_data_events(time_limit=0.2)
    assert returns == []


def test_cc_default_exchange(amqp):
    qa, qb = amqp.queue(), amqp.queue()
    amqp.ch.basic_publish("", qa, b"m", properties=P(headers={"CC": [qb]}))
    assert get(amqp.ch, qa)[2] == b"m"
    assert get(amqp.ch, qb)[2] == b"m"


def test_user_id_mismatch_406(amqp):
    q = amqp.queue()
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_publish("", q, b"m", properties=P(user_id="not-guest"))


def test_user_id_match_ok(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m", properties=P(user_id="guest"))
    assert get(amqp.ch, q)[1].user_id == "guest"


@pytest.mark.parametrize("expiration", ["abc", "-1", "1.5", "", " 10"])
def test_invalid_expiration_406(amqp, expiration):
    q = amqp.queue()
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_publish("", q, b"m", properties=P(expiration=expiration))


def test_expiration_zero_without_consumer_dropped(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m", properties=P(expiration="0"))
    assert_empty(amqp.ch, q)


def test_publish_after_channel_close_by_client_raises(amqp):
    ch = amqp.channel()
    ch.close()
    with pytest.raises(pex.ChannelWrongStateError):
        ch.basic_publish("", "q", b"m")
