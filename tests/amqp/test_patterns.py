"""Messaging patterns as clients use them: request-reply, direct reply-to, scatter-gather,
publish/subscribe, competing consumers."""
import uuid

import pika
import pika.exceptions as pex
import pytest

from helpers import PRECONDITION_FAILED, assert_empty, expect_channel_error, get, wait_until

P = pika.BasicProperties
REPLY_TO = "amq.rabbitmq.reply-to"


def test_request_reply_explicit_queue(amqp):
    requests = amqp.queue()
    replies = amqp.queue(exclusive=True)
    responder = amqp.connect().channel()
    corr = str(uuid.uuid4())
    amqp.ch.basic_publish("", requests, b"2+2", properties=P(reply_to=replies, correlation_id=corr))
    m, p, body = get(responder, requests, auto_ack=False)
    assert p.reply_to == replies and p.correlation_id == corr
    responder.basic_publish("", p.reply_to, b"4", properties=P(correlation_id=p.correlation_id))
    responder.basic_ack(m.delivery_tag)
    m, p, body = get(amqp.ch, replies)
    assert body == b"4" and p.correlation_id == corr


def _direct_reply_consumer(amqp):
    got = []
    tag = amqp.ch.basic_consume(REPLY_TO, lambda c, m, p, b: got.append((m, p, b)), auto_ack=True)
    return tag, got


def test_direct_reply_to(amqp):
    requests = amqp.queue()
    tag, replies = _direct_reply_consumer(amqp)
    amqp.ch.basic_publish("", requests, b"ping", properties=P(reply_to=REPLY_TO, correlation_id="c1"))
    responder = amqp.connect().channel()
    m, p, body = get(responder, requests)
    assert body == b"ping"
    assert p.reply_to.startswith(REPLY_TO + ".") and len(p.reply_to) > len(REPLY_TO) + 1
    assert p.correlation_id == "c1"
    responder.basic_publish("", p.reply_to, b"pong", properties=P(correlation_id="c1"))
    wait_until(lambda: replies, conn=amqp.conn)
    m, rp, rbody = replies[0]
    assert rbody == b"pong" and rp.correlation_id == "c1"
    assert m.consumer_tag == tag
    assert m.exchange == "" and m.routing_key == p.reply_to
    assert m.redelivered is False


def test_direct_reply_to_many_requests(amqp):
    requests = amqp.queue()
    _, replies = _direct_reply_consumer(amqp)
    for i in range(5):
        amqp.ch.basic_publish("", requests, str(i).encode(),
                              properties=P(reply_to=REPLY_TO, correlation_id=f"c{i}"))
    responder = amqp.connect().channel()
    for _ in range(5):
        m, p, body = get(responder, requests)
        responder.basic_publish("", p.reply_to, b"re:" + body, properties=P(correlation_id=p.correlation_id))
    wait_until(lambda: len(replies) == 5, conn=amqp.conn)
    assert sorted((p.correlation_id, b) for _, p, b in replies) == [(f"c{i}", f"re:{i}".encode()) for i in range(5)]


def test_direct_reply_to_consume_with_ack_406(amqp):
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_consume(REPLY_TO, lambda *a: None, auto_ack=False)


def test_direct_reply_to_publish_without_consumer_406(amqp):
    q = amqp.queue()
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_publish("", q, b"req", properties=P(reply_to=REPLY_TO))


def test_direct_reply_to_consumer_on_other_channel_406(amqp):
    """The reply-to consumer must be on the channel that publishes the request."""
    q = amqp.queue()
    _direct_reply_consumer(amqp)
    other = amqp.channel()
    with expect_channel_error(other, PRECONDITION_FAILED):
        other.basic_publish("", q, b"req", properties=P(reply_to=REPLY_TO))


def test_direct_reply_to_after_cancel_406(amqp):
    q = amqp.queue()
    tag, _ = _direct_reply_consumer(amqp)
    amqp.ch.basic_cancel(tag)
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.basic_publish("", q, b"req", properties=P(reply_to=REPLY_TO))


def test_direct_reply_to_stale_reply_dropped(amqp):
    requests = amqp.queue()
    requester = amqp.connect()
    rch = requester.channel()
    rch.basic_consume(REPLY_TO, lambda *a: None, auto_ack=True)
    rch.basic_publish("", requests, b"req", properties=P(reply_to=REPLY_TO))
    m, p, _ = get(amqp.ch, requests)
    requester.close()
    amqp.ch.basic_publish("", p.reply_to, b"late")  # dropped, no error
    amqp.ch.exchange_declare("amq.direct", passive=True)
    amqp.ch.confirm_delivery()
    with pytest.raises(pex.UnroutableError):
        amqp.ch.basic_publish("", p.reply_to, b"late", mandatory=True)


def test_scatter_gather_fanout(amqp):
    x = amqp.exchange("fanout")
    responders = []
    for i in range(3):
        q = amqp.bound_queue(x)
        responders.append((f"r{i}", q, amqp.connect().channel()))
    replies = amqp.queue(exclusive=True)
    corr = "scatter-1"
    amqp.ch.basic_publish(x, "", b"quote?", properties=P(reply_to=replies, correlation_id=corr))
    amqp.ch.basic_publish(x, "", b"noise", properties=P(reply_to=replies, correlation_id="other"))
    for name, q, ch in responders:
        for _ in range(2):
            m, p, body = get(ch, q)
            ch.basic_publish("", p.reply_to, f"{name}:{body.decode()}".encode(),
                             properties=P(correlation_id=p.correlation_id))
    gathered = {}
    for _ in range(6):
        m, p, body = get(amqp.ch, replies)
        gathered.setdefault(p.correlation_id, []).append(body)
    assert sorted(gathered[corr]) == [b"r0:quote?", b"r1:quote?", b"r2:quote?"]
    assert sorted(gathered["other"]) == [b"r0:noise", b"r1:noise", b"r2:noise"]
    assert_empty(amqp.ch, replies)


def test_scatter_gather_direct_reply_to(amqp):
    x = amqp.exchange("fanout")
    qs = [amqp.bound_queue(x) for _ in range(3)]
    _, replies = _direct_reply_consumer(amqp)
    amqp.ch.basic_publish(x, "", b"vote?", properties=P(reply_to=REPLY_TO, correlation_id="v1"))
    responder = amqp.connect().channel()
    for i, q in enumerate(qs):
        m, p, body = get(responder, q)
        responder.basic_publish("", p.reply_to, f"yes-{i}".encode(), properties=P(correlation_id="v1"))
    wait_until(lambda: len(replies) == 3, conn=amqp.conn)
    assert sorted(b for _, _, b in replies) == [b"yes-0", b"yes-1", b"yes-2"]


@pytest.mark.parametrize("xtype", ["direct", "fanout", "topic", "headers"])
def test_pub_sub(amqp, xtype):
    x = amqp.exchange(xtype)
    if xtype == "headers":
        subs = {
            "eu": amqp.bound_queue(x, arguments={"x-match": "all", "region": "eu"}),
            "orders": amqp.bound_queue(x, arguments={"x-match": "any", "kind": "order", "vip": True}),
        }
        events = [({"region": "eu", "kind": "order"}, b"e1"), ({"region": "us", "kind": "refund"}, b"e2"),
                  ({"region": "us", "vip": True}, b"e3")]
        for headers, body in events:
            amqp.ch.basic_publish(x, "", body, properties=P(headers=headers))
        expected = {"eu": [b"e1"], "orders": [b"e1", b"e3"]}
    else:
        keys = {"direct": ("orders", "refunds"), "fanout": ("", ""), "topic": ("orders.*", "*.eu")}[xtype]
        subs = {"a": amqp.bound_queue(x, keys[0]), "b": amqp.bound_queue(x, keys[1])}
        events = {"direct": ["orders", "refunds", "other"],
                  "fanout": ["k1", "k2"],
                  "topic": ["orders.eu", "orders.us", "refunds.eu", "misc"]}[xtype]
        for i, key in enumerate(events):
            amqp.ch.basic_publish(x, key, f"e{i}".encode())
        expected = {"direct": {"a": [b"e0"], "b": [b"e1"]},
                    "fanout": {"a": [b"e0", b"e1"], "b": [b"e0", b"e1"]},
                    "topic": {"a": [b"e0", b"e1"], "b": [b"e0", b"e2"]}}[xtype]
    for name, q in subs.items():
        got = [get(amqp.ch, q)[2] for _ in expected[name]]
        assert got == expected[name], name
        assert_empty(amqp.ch, q, wait=0.1)


def test_competing_consumers_each_message_once(amqp):
    q = amqp.queue()
    n = 60
    seen = {}
    chans = []
    for w in range(3):
        ch = amqp.channel()
        ch.basic_qos(prefetch_count=5)

        def on_msg(c, m, p, b, w=w):
            seen.setdefault(b, []).append(w)
            c.basic_ack(m.delivery_tag)

        ch.basic_consume(q, on_msg)
        chans.append(ch)
    for i in range(n):
        amqp.ch.basic_publish("", q, str(i).encode())
    wait_until(lambda: len(seen) == n, timeout=10, conn=amqp.conn)
    amqp.conn.process_data_events(time_limit=0.3)
    assert sorted(seen) == sorted(str(i).encode() for i in range(n))
    assert all(len(v) == 1 for v in seen.values()), "a message went to two consumers"
    workers = [w for v in seen.values() for w in v]
    assert all(workers.count(w) > 0 for w in range(3)), "a worker got nothing"
