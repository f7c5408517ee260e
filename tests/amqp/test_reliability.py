"""Delivery limits, single active consumer, reject-publish-dlx: RabbitMQ 3.10's reliability features.

RabbitMQ 3.10 honours x-delivery-limit only on quorum queues, so the shared tests declare quorum queues;
Mailroom honours it on every queue type, which the Mailroom-only test says.
"""
import pika
import pytest

from helpers import assert_empty, get, wait_until

P = pika.BasicProperties


def quorum(amqp, **args):
    return amqp.queue(durable=True, arguments={"x-queue-type": "quorum", **args})


def dead_letter_target(amqp):
    dlx = amqp.exchange("fanout")
    return dlx, amqp.bound_queue(dlx)


def test_delivery_count_header(amqp):
    # RabbitMQ 3.10's quorum queues put x-delivery-count on every delivery, 0 on the first.
    q = quorum(amqp)
    amqp.ch.basic_publish("", q, b"m")
    m, p, _ = get(amqp.ch, q, auto_ack=False)
    assert not m.redelivered and p.headers["x-delivery-count"] == 0
    amqp.ch.basic_nack(m.delivery_tag, requeue=True)
    m, p, _ = get(amqp.ch, q, auto_ack=False)
    assert m.redelivered and p.headers["x-delivery-count"] == 1
    amqp.ch.basic_ack(m.delivery_tag)


def run_delivery_limit(amqp, q, dlq):
    amqp.ch.basic_publish("", q, b"poison", properties=P(message_id="p1"))
    # A limit of 1 allows two deliveries; the second return dead-letters the message.
    for _ in range(2):
        m, _, b = get(amqp.ch, q, auto_ack=False)
        assert b == b"poison"
        amqp.ch.basic_nack(m.delivery_tag, requeue=True)
    _, p, b = get(amqp.ch, dlq)
    assert b == b"poison" and p.message_id == "p1"
    assert p.headers["x-death"][0]["reason"] == "delivery_limit"
    assert p.headers["x-first-death-reason"] == "delivery_limit"
    assert_empty(amqp.ch, q)


def test_delivery_limit_dead_letters_quorum(amqp):
    dlx, dlq = dead_letter_target(amqp)
    q = quorum(amqp, **{"x-delivery-limit": 1, "x-dead-letter-exchange": dlx})
    run_delivery_limit(amqp, q, dlq)


def test_delivery_limit_counts_channel_close(amqp):
    dlx, dlq = dead_letter_target(amqp)
    q = quorum(amqp, **{"x-delivery-limit": 0, "x-dead-letter-exchange": dlx})
    amqp.ch.basic_publish("", q, b"m")
    ch = amqp.channel()
    get(ch, q, auto_ack=False)
    ch.close()  # the unacked delivery returns: with limit 0 that is one return too many
    _, p, _ = get(amqp.ch, dlq)
    assert p.headers["x-death"][0]["reason"] == "delivery_limit"


def test_delivery_limit_on_classic_queue_mailroom_only(amqp):
    if amqp.broker.name != "mailroom":
        pytest.skip("RabbitMQ 3.10 honours x-delivery-limit only on quorum queues; Mailroom on every type")
    dlx, dlq = dead_letter_target(amqp)
    q = amqp.queue(arguments={"x-delivery-limit": 1, "x-dead-letter-exchange": dlx})
    run_delivery_limit(amqp, q, dlq)


def test_single_active_consumer(amqp):
    q = amqp.queue(arguments={"x-single-active-consumer": True})
    got = {"a": [], "b": []}
    ch_a, ch_b = amqp.channel(), amqp.channel()
    tag_a = ch_a.basic_consume(q, lambda c, m, p, b: got["a"].append(b), auto_ack=True)
    ch_b.basic_consume(q, lambda c, m, p, b: got["b"].append(b), auto_ack=True)
    for i in range(4):
        amqp.ch.basic_publish("", q, f"m{i}".encode())
    wait_until(lambda: len(got["a"]) == 4, conn=amqp.conn)
    assert got["b"] == []
    ch_a.basic_cancel(tag_a)
    amqp.ch.basic_publish("", q, b"after")
    wait_until(lambda: got["b"] == [b"after"], conn=amqp.conn)
    assert len(got["a"]) == 4


def test_reject_publish_dlx_nacks_and_dead_letters(amqp):
    dlx, dlq = dead_letter_target(amqp)
    q = amqp.queue(arguments={"x-max-length": 1, "x-overflow": "reject-publish-dlx", "x-dead-letter-exchange": dlx})
    amqp.ch.confirm_delivery()
    amqp.ch.basic_publish("", q, b"first")
    with pytest.raises(pika.exceptions.NackError):
        amqp.ch.basic_publish("", q, b"second")
    _, p, b = get(amqp.ch, dlq)
    assert b == b"second"
    assert p.headers["x-death"][0]["reason"] == "maxlen"
    assert get(amqp.ch, q)[2] == b"first"


def test_per_message_ttl_expires_promptly_behind_the_head_mailroom_only(amqp):
    if amqp.broker.name != "mailroom":
        pytest.skip("RabbitMQ drops per-message-TTL messages only at the head; Mailroom removes them when due")
    dlx, dlq = dead_letter_target(amqp)
    q = amqp.queue(arguments={"x-dead-letter-exchange": dlx})
    amqp.ch.basic_publish("", q, b"long", properties=P(expiration="60000"))
    amqp.ch.basic_publish("", q, b"short", properties=P(expiration="100"))
    _, p, b = get(amqp.ch, dlq, timeout=3)  # dead-lettered while "long" is still at the head
    assert b == b"short" and p.headers["x-death"][0]["reason"] == "expired"
    assert amqp.ch.queue_declare(q, passive=True).method.message_count == 1
