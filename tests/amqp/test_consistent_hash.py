"""The consistent-hash exchange (`x-consistent-hash`), as the rabbitmq_consistent_hash_exchange plugin
does it: binding keys are weights, each message goes to exactly one bound queue chosen by a hash of its
routing key (or of the header named by `hash-header`), in proportion to the weights, and always the
same queue for the same key while the bindings stay. Mailroom has it built in; on RabbitMQ these need
the plugin (`rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`) and are skipped without it.
Which queue a given key lands on differs between the brokers (Erlang's phash2 vs FNV-1a), so the tests
check distribution and stability, never a particular queue."""
import pika
import pytest

import time

from helpers import COMMAND_INVALID, PRECONDITION_FAILED, expect_channel_error, message_count, sync, uname

P = pika.BasicProperties
TYPE = "x-consistent-hash"


@pytest.fixture(autouse=True)
def needs_the_exchange_type(amqp):
    if amqp.broker.name == "mailroom":
        return
    ch = amqp.channel(amqp.connect())  # an unknown exchange type closes the connection: not amqp.conn
    name = uname("x-probe")
    try:
        ch.exchange_declare(name, exchange_type=TYPE, auto_delete=True)
        ch.exchange_delete(name)
        ch.close()
    except pika.exceptions.ConnectionClosedByBroker as e:
        if e.reply_code == COMMAND_INVALID:
            pytest.skip("RabbitMQ without rabbitmq_consistent_hash_exchange")
        raise


def wait_total(ch, queues, n, timeout=5.0):
    """Ready counts of `queues` once they add up to n (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [message_count(ch, q) for q in queues]
        if sum(counts) >= n or time.monotonic() >= deadline:
            return counts
        time.sleep(0.05)


def hash_exchange(amqp, weights, **arguments):
    x = amqp.exchange(TYPE, arguments=arguments or None)
    queues = [amqp.bound_queue(x, routing_key=str(w)) for w in weights]
    return x, queues


def test_each_message_goes_to_one_queue_in_proportion_to_weights(amqp):
    x, queues = hash_exchange(amqp, [1, 2, 1])
    n = 4000
    for i in range(n):
        amqp.ch.basic_publish(x, f"order-{i}", b"m")
    sync(amqp.ch)
    counts = wait_total(amqp.ch, queues, n)
    time.sleep(0.2)
    assert [message_count(amqp.ch, q) for q in queues] == counts
    assert sum(counts) == n, counts  # exactly one copy each
    shares = [c / n for c in counts]
    for share, want in zip(shares, [0.25, 0.5, 0.25]):
        assert abs(share - want) < 0.06, shares


def test_the_same_key_always_lands_on_the_same_queue(amqp):
    x, queues = hash_exchange(amqp, [1, 1, 1, 1])
    keys = [f"customer-{i}" for i in range(40)]
    for _ in range(3):
        for k in keys:
            amqp.ch.basic_publish(x, k, k.encode())
    sync(amqp.ch)
    wait_total(amqp.ch, queues, 3 * len(keys))
    where = {}
    for q in queues:
        while True:
            m, _, body = amqp.ch.basic_get(q, auto_ack=True)
            if m is None:
                break
            where.setdefault(body.decode(), set()).add(q)
    assert set(where) == set(keys)
    assert all(len(qs) == 1 for qs in where.values()), where
    assert len({q for qs in where.values() for q in qs}) > 1, "keys spread over several queues"


def test_hash_header_routes_on_the_header_not_the_routing_key(amqp):
    x, queues = hash_exchange(amqp, [1, 1, 1], **{"hash-header": "order"})
    for i in range(60):
        for rk in ("a", "b", "c"):
            amqp.ch.basic_publish(x, rk, f"{i}".encode(), properties=P(headers={"order": f"o-{i}"}))
    sync(amqp.ch)
    wait_total(amqp.ch, queues, 180)
    where = {}
    for q in queues:
        while True:
            m, _, body = amqp.ch.basic_get(q, auto_ack=True)
            if m is None:
                break
            where.setdefault(body, set()).add(q)
    assert len(where) == 60
    assert all(len(qs) == 1 for qs in where.values()), "one header value, one queue, whatever the routing key"


def test_binding_keys_must_be_positive_integers(amqp):
    x = amqp.exchange(TYPE)
    q = amqp.queue()
    for bad in ("abc", "0"):
        ch = amqp.channel()
        with expect_channel_error(ch, PRECONDITION_FAILED):
            ch.queue_bind(q, x, routing_key=bad)


def test_nothing_bound_is_unroutable(amqp):
    x = amqp.exchange(TYPE)
    amqp.ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError):
        amqp.ch.basic_publish(x, "k", b"m", mandatory=True)


def test_unbinding_moves_only_that_queues_keys(amqp):
    x, queues = hash_exchange(amqp, [1, 1, 1, 1])
    keys = [f"k-{i}" for i in range(400)]

    def placement():
        for k in keys:
            amqp.ch.basic_publish(x, k, k.encode())
        sync(amqp.ch)
        wait_total(amqp.ch, queues, len(keys))
        where = {}
        for q in queues:
            while True:
                m, _, body = amqp.ch.basic_get(q, auto_ack=True)
                if m is None:
                    break
                where[body.decode()] = q
        return where

    before = placement()
    amqp.ch.queue_unbind(queues[3], x, routing_key="1")
    after = placement()
    assert set(after) == set(keys)
    assert queues[3] not in after.values()
    # Jump hash: removing the last bucket moves only the keys that were on it.
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == queues[3] for k in moved), "only the unbound queue's keys move"
    assert message_count(amqp.ch, queues[3]) == 0
