"""Delayed-message and deduplicating exchanges, following the rabbitmq-delayed-message-exchange and
rabbitmq-message-deduplication plugins' documented behaviour. Mailroom has them built in; the local
RabbitMQ has neither plugin, so these run against Mailroom only."""
import time

import pika
import pytest

from helpers import PRECONDITION_FAILED, assert_empty, expect_channel_error, get, uname

P = pika.BasicProperties


@pytest.fixture(autouse=True)
def mailroom_only(amqp):
    if amqp.broker.name != "mailroom":
        pytest.skip("the local RabbitMQ has no delayed-message or deduplication plugin")


def delayed_exchange(amqp, inner="direct"):
    return amqp.exchange("x-delayed-message", arguments={"x-delayed-type": inner})


def test_delayed_exchange_requires_valid_delayed_type(amqp):
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.exchange_declare(uname("x"), exchange_type="x-delayed-message")
    ch = amqp.channel()
    with expect_channel_error(ch, PRECONDITION_FAILED):
        ch.exchange_declare(uname("x"), exchange_type="x-delayed-message", arguments={"x-delayed-type": "nope"})


def test_delayed_message_is_held_then_routed(amqp):
    x = delayed_exchange(amqp)
    q = amqp.bound_queue(x, routing_key="k")
    start = time.monotonic()
    amqp.ch.basic_publish(x, "k", b"later", properties=P(headers={"x-delay": 400}))
    amqp.ch.basic_publish(x, "k", b"now")
    assert get(amqp.ch, q)[2] == b"now"
    assert_empty(amqp.ch, q, wait=0.1)
    _, p, b = get(amqp.ch, q, timeout=3)
    assert b == b"later"
    assert time.monotonic() - start >= 0.35
    # On release the plugin negates x-delay.
    assert p.headers["x-delay"] == -400


def test_delayed_messages_release_in_due_order_with_underlying_routing(amqp):
    x = delayed_exchange(amqp, "topic")
    q = amqp.bound_queue(x, routing_key="orders.*")
    other = amqp.bound_queue(x, routing_key="billing.#")
    for body, delay in [(b"c", 300), (b"a", 100), (b"b", 200)]:
        amqp.ch.basic_publish(x, "orders.new", body, properties=P(headers={"x-delay": delay}))
    bodies = [get(amqp.ch, q, timeout=3)[2] for _ in range(3)]
    assert bodies == [b"a", b"b", b"c"]
    assert_empty(amqp.ch, other)


def test_delayed_exchange_ignores_mandatory(amqp):
    x = delayed_exchange(amqp)
    returns = []
    amqp.ch.add_on_return_callback(lambda *a: returns.append(a))
    amqp.ch.confirm_delivery()
    amqp.ch.basic_publish(x, "nowhere", b"m", properties=P(headers={"x-delay": 50}), mandatory=True)
    time.sleep(0.2)
    amqp.conn.process_data_events(0.1)
    assert returns == []


def dedup_exchange(amqp, **args):
    return amqp.exchange("x-message-deduplication", arguments={"x-cache-size": 10, **args})


def dedup(value, **extra):
    return P(headers={"x-deduplication-header": value, **extra})


def test_dedup_exchange_requires_cache_size(amqp):
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.exchange_declare(uname("x"), exchange_type="x-message-deduplication")


def test_dedup_exchange_drops_duplicates_and_still_confirms(amqp):
    x = dedup_exchange(amqp)
    q = amqp.bound_queue(x)
    amqp.ch.confirm_delivery()
    amqp.ch.basic_publish(x, "", b"1", properties=dedup("order-1"))
    amqp.ch.basic_publish(x, "", b"2", properties=dedup("order-1"))  # acked, not routed
    amqp.ch.basic_publish(x, "", b"3", properties=dedup("order-2"))
    amqp.ch.basic_publish(x, "", b"4")  # no header: never a duplicate
    assert [get(amqp.ch, q)[2] for _ in range(3)] == [b"1", b"3", b"4"]
    assert_empty(amqp.ch, q)


def test_dedup_cache_ttl_and_per_message_override(amqp):
    x = dedup_exchange(amqp, **{"x-cache-ttl": 200})
    q = amqp.bound_queue(x)
    amqp.ch.basic_publish(x, "", b"a1", properties=dedup("a"))
    amqp.ch.basic_publish(x, "", b"b1", properties=dedup("b", **{"x-cache-ttl": 5000}))
    time.sleep(0.3)
    amqp.ch.basic_publish(x, "", b"a2", properties=dedup("a"))  # expired: routed again
    amqp.ch.basic_publish(x, "", b"b2", properties=dedup("b"))  # still remembered
    assert [get(amqp.ch, q)[2] for _ in range(3)] == [b"a1", b"b1", b"a2"]
    assert_empty(amqp.ch, q)


def test_queue_level_dedup_while_message_is_in_queue(amqp):
    q = amqp.queue(arguments={"x-message-deduplication": True})
    amqp.ch.confirm_delivery()
    amqp.ch.basic_publish("", q, b"1", properties=dedup("k"))
    amqp.ch.basic_publish("", q, b"dup", properties=dedup("k"))  # dropped, still acked
    amqp.ch.basic_publish("", q, b"other", properties=dedup("j"))
    m, _, b = get(amqp.ch, q, auto_ack=False)
    assert b == b"1"
    amqp.ch.basic_publish("", q, b"dup-unacked", properties=dedup("k"))  # still in the queue (unacked)
    amqp.ch.basic_ack(m.delivery_tag)
    amqp.ch.basic_publish("", q, b"2", properties=dedup("k"))  # the first left: accepted
    assert [get(amqp.ch, q)[2] for _ in range(2)] == [b"other", b"2"]
    assert_empty(amqp.ch, q)
