"""Publisher confirms and transactions."""
import pika
import pika.exceptions as pex
import pika.spec as spec
import pytest

from helpers import (NO_ROUTE, PRECONDITION_FAILED, RawConn, assert_empty, expect_channel_error, get,
                     get_bodies, message_count, uname)


# ---------------------------------------------------------------- confirms

def test_confirm_publish_acked(amqp):
    q = amqp.queue()
    amqp.ch.confirm_delivery()
    for i in range(5):
        amqp.ch.basic_publish("", q, str(i).encode())  # returns only after the ack
    assert message_count(amqp.ch, q) == 5


def test_confirm_select_twice_ok(amqp):
    amqp.ch.confirm_delivery()
    amqp.ch._impl.confirm_delivery(lambda f: None)  # second confirm.select on the same channel


def test_confirm_persistent_durable(amqp):
    q = amqp.queue(durable=True)
    amqp.ch.confirm_delivery()
    amqp.ch.basic_publish("", q, b"p", properties=pika.BasicProperties(delivery_mode=2))
    assert get(amqp.ch, q)[2] == b"p"


def test_confirm_unroutable_not_mandatory_acked(amqp):
    x = amqp.exchange("direct")
    amqp.ch.confirm_delivery()
    amqp.ch.basic_publish(x, "nowhere", b"m")  # no exception: acked


def test_confirm_unroutable_mandatory_returned_then_acked(amqp):
    x = amqp.exchange("direct")
    amqp.ch.confirm_delivery()
    with pytest.raises(pex.UnroutableError) as ei:
        amqp.ch.basic_publish(x, "nowhere", b"m", mandatory=True)
    [ret] = ei.value.messages
    assert ret.method.reply_code == NO_ROUTE and ret.body == b"m"


def _raw_confirm_channel(broker):
    rc = RawConn(broker).handshake()
    rc.open_channel(1)
    rc.send_method(1, spec.Confirm.Select())
    rc.expect(spec.Confirm.SelectOk)
    return rc


def _publish(rc, exchange, key, body=b"m", mandatory=False):
    rc.send_method(1, spec.Basic.Publish(exchange=exchange, routing_key=key, mandatory=mandatory))
    rc.send_content(1, body)


def _collect_acks(rc, n):
    """Read until tags 1..n are all confirmed; returns (acked set, list of methods seen in order)."""
    acked, seen = set(), []
    while acked != set(range(1, n + 1)):
        f = rc.read()
        if not isinstance(f, pika.frame.Method):
            continue
        seen.append(f.method)
        if isinstance(f.method, spec.Basic.Ack):
            tag = f.method.delivery_tag
            if f.method.multiple:
                acked |= set(range(1, tag + 1))
            else:
                acked.add(tag)
        else:
            assert isinstance(f.method, spec.Basic.Return), f"unexpected {f.method!r}"
    return acked, seen


def test_raw_confirm_tags_count_from_one(broker):
    q = uname("raw")
    with _raw_confirm_channel(broker) as rc:
        rc.send_method(1, spec.Queue.Declare(queue=q, exclusive=True))
        rc.expect(spec.Queue.DeclareOk)
        for i in range(10):
            _publish(rc, "", q, str(i).encode())
        acked, seen = _collect_acks(rc, 10)
        assert max(m.delivery_tag for m in seen) == 10


def test_raw_return_before_ack(broker):
    with _raw_confirm_channel(broker) as rc:
        _publish(rc, "amq.direct", uname("nowhere"), b"r", mandatory=True)
        f = rc.read_method()
        assert isinstance(f.method, spec.Basic.Return) and f.method.reply_code == NO_ROUTE
        hdr = rc.read()
        assert isinstance(hdr, pika.frame.Header)
        body = rc.read()
        assert isinstance(body, pika.frame.Body) and body.fragment == b"r"
        ack = rc.expect(spec.Basic.Ack).method
        assert ack.delivery_tag == 1


def test_raw_confirm_mixed_routable_unroutable(broker):
    q = uname("raw")
    with _raw_confirm_channel(broker) as rc:
        rc.send_method(1, spec.Queue.Declare(queue=q, exclusive=True))
        rc.expect(spec.Queue.DeclareOk)
        _publish(rc, "", q)
        _publish(rc, "amq.direct", uname("nowhere"), mandatory=True)
        _publish(rc, "amq.direct", uname("nowhere"))
        _publish(rc, "", q)
        acked, seen = _collect_acks(rc, 4)
        assert sum(isinstance(m, spec.Basic.Return) for m in seen) == 1
        assert not any(isinstance(m, spec.Basic.Nack) for m in seen)


def test_confirm_after_tx_406(amqp):
    amqp.ch.tx_select()
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.confirm_delivery()


def test_tx_after_confirm_406(amqp):
    amqp.ch.confirm_delivery()
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.tx_select()


# ---------------------------------------------------------------------- tx

def test_tx_commit_publishes(amqp):
    q = amqp.queue()
    ch = amqp.channel()
    ch.tx_select()
    ch.basic_publish("", q, b"1")
    ch.basic_publish("", q, b"2")
    assert_empty(amqp.ch, q)
    ch.tx_commit()
    assert get_bodies(amqp.ch, q, 2) == [b"1", b"2"]


def test_tx_rollback_discards_publishes(amqp):
    q = amqp.queue()
    ch = amqp.channel()
    ch.tx_select()
    ch.basic_publish("", q, b"1")
    ch.tx_rollback()
    ch.tx_commit()
    assert_empty(amqp.ch, q)


def test_tx_stays_on_after_commit(amqp):
    q = amqp.queue()
    ch = amqp.channel()
    ch.tx_select()
    ch.basic_publish("", q, b"1")
    ch.tx_commit()
    ch.basic_publish("", q, b"2")
    ch.tx_rollback()
    assert get_bodies(amqp.ch, q, 1) == [b"1"]
    assert_empty(amqp.ch, q)


def test_tx_select_twice_ok(amqp):
    amqp.ch.tx_select()
    amqp.ch.tx_select()


def test_tx_commit_without_select_406(amqp):
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.tx_commit()


def test_tx_rollback_without_select_406(amqp):
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.tx_rollback()


def test_tx_acks_applied_on_commit(amqp):
    q = amqp.queue()
    for i in range(2):
        amqp.ch.basic_publish("", q, str(i).encode())
    ch = amqp.channel()
    ch.tx_select()
    m0, _, _ = get(ch, q, auto_ack=False)
    m1, _, _ = get(ch, q, auto_ack=False)
    ch.basic_ack(m0.delivery_tag)
    ch.tx_commit()
    ch.basic_ack(m1.delivery_tag)
    ch.close()  # m1's ack was never committed: it comes back
    m, _, b = get(amqp.ch, q)
    assert b == b"1" and m.redelivered
    assert_empty(amqp.ch, q)


def test_tx_rollback_ack_leaves_unacked(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    ch = amqp.channel()
    ch.tx_select()
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_ack(m.delivery_tag)
    ch.tx_rollback()
    assert message_count(amqp.ch, q) == 0  # still unacked, not requeued
    ch.close()
    m, _, b = get(amqp.ch, q)
    assert b == b"m" and m.redelivered


def test_tx_rolled_back_ack_can_be_acked_again(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    ch = amqp.channel()
    ch.tx_select()
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_ack(m.delivery_tag)
    ch.tx_rollback()
    ch.basic_ack(m.delivery_tag)
    ch.tx_commit()
    ch.close()
    assert_empty(amqp.ch, q)


def test_tx_reject_applied_on_commit(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    ch = amqp.channel()
    ch.tx_select()
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_reject(m.delivery_tag, requeue=True)
    assert message_count(amqp.ch, q) == 0
    ch.tx_commit()
    m, _, b = get(amqp.ch, q)
    assert b == b"m" and m.redelivered


def test_tx_mandatory_unroutable_returned(amqp):
    x = amqp.exchange("direct")
    ch = amqp.channel()
    returns = []
    ch.add_on_return_callback(lambda c, m, p, b: returns.append(m))
    ch.tx_select()
    ch.basic_publish(x, "nowhere", b"m", mandatory=True)
    ch.tx_commit()
    amqp.conn.process_data_events(time_limit=0.3)
    assert [r.reply_code for r in returns] == [NO_ROUTE]
