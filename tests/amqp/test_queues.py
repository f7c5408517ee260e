"""queue.declare / bind / unbind / purge / delete, exclusivity, auto-delete, TTLs and arguments."""
import time

import pika
import pytest

from helpers import (ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED, RESOURCE_LOCKED, assert_empty,
                     expect_channel_error, get, message_count, queue_exists, uname, wait_until)


def test_server_named_queue(amqp):
    ok = amqp.ch.queue_declare("", exclusive=True)
    amqp.track_queue(ok.method.queue)
    assert ok.method.queue.startswith("amq.gen-")
    assert ok.method.message_count == 0 and ok.method.consumer_count == 0


def test_server_named_queues_are_distinct(amqp):
    a = amqp.queue("", exclusive=True)
    b = amqp.queue("", exclusive=True)
    assert a != b


def test_declare_amq_prefix_403(amqp):
    with expect_channel_error(amqp.ch, ACCESS_REFUSED):
        amqp.ch.queue_declare("amq.myqueue")


def test_passive_missing_404(amqp):
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.queue_declare(uname("missing"), passive=True)


def test_passive_ignores_flags_and_arguments(amqp):
    q = amqp.queue(arguments={"x-message-ttl": 60000})
    ok = amqp.ch.queue_declare(q, passive=True, durable=True, arguments={"x-message-ttl": 1})
    assert ok.method.queue == q


def test_redeclare_equivalent_ok(amqp):
    q = amqp.queue(durable=True, arguments={"x-max-length": 10})
    amqp.ch.queue_declare(q, durable=True, arguments={"x-max-length": 10})


def test_redeclare_different_durable_406(amqp):
    q = amqp.queue()
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.queue_declare(q, durable=True)


def test_redeclare_different_auto_delete_406(amqp):
    q = amqp.queue()
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.queue_declare(q, auto_delete=True)


def test_redeclare_different_argument_406(amqp):
    q = amqp.queue(arguments={"x-message-ttl": 1000})
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.queue_declare(q, arguments={"x-message-ttl": 2000})


def test_redeclare_adding_argument_406(amqp):
    q = amqp.queue()
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.queue_declare(q, arguments={"x-max-length": 5})


def test_redeclare_as_exclusive_405(amqp):
    q = amqp.queue()
    with expect_channel_error(amqp.ch, RESOURCE_LOCKED):
        amqp.ch.queue_declare(q, exclusive=True)


def test_redeclare_unknown_argument_difference_ok(amqp):
    """Only known x- arguments take part in the equivalence check."""
    q = amqp.queue(arguments={"x-custom": "a"})
    amqp.ch.queue_declare(q, arguments={"x-custom": "b"})


def test_unknown_arguments_accepted(amqp):
    q = amqp.queue(arguments={"x-whatever": "yes", "plain": 1, "x-nested": {"a": [1, 2]}})
    amqp.ch.basic_publish("", q, b"m")
    assert get(amqp.ch, q)[2] == b"m"


# ----------------------------------------------------------------- exclusive

@pytest.fixture
def exclusive_elsewhere(amqp):
    """An exclusive queue owned by a second connection; returns its name."""
    owner = amqp.connect()
    q = amqp.queue(ch=owner.channel(), exclusive=True)
    return q


@pytest.mark.parametrize("op", ["declare", "passive", "consume", "get", "purge", "delete"])
def test_exclusive_queue_from_other_connection_405(amqp, exclusive_elsewhere, op):
    q = exclusive_elsewhere
    ch = amqp.ch
    with expect_channel_error(ch, RESOURCE_LOCKED):
        if op == "declare":
            ch.queue_declare(q, exclusive=True)
        elif op == "passive":
            ch.queue_declare(q, passive=True)
        elif op == "consume":
            ch.basic_consume(q, lambda *a: None)
        elif op == "get":
            ch.basic_get(q)
        elif op == "purge":
            ch.queue_purge(q)
        elif op == "delete":
            ch.queue_delete(q)


def test_exclusive_queue_publish_from_other_connection_ok(amqp, exclusive_elsewhere):
    amqp.ch.basic_publish("", exclusive_elsewhere, b"m")
    amqp.ch.exchange_declare("amq.direct", passive=True)


def test_exclusive_queue_usable_from_other_channel_same_connection(amqp):
    q = amqp.queue(exclusive=True)
    ch2 = amqp.channel()
    ch2.queue_declare(q, passive=True)
    ch2.basic_publish("", q, b"m")
    assert get(ch2, q)[2] == b"m"


def test_exclusive_queue_deleted_on_connection_close(amqp):
    c = amqp.connect()
    q = amqp.queue(ch=c.channel(), exclusive=True)
    assert queue_exists(amqp.broker, q)
    c.close()
    assert wait_until(lambda: not queue_exists(amqp.broker, q), timeout=5)


def test_exclusive_queue_survives_channel_close(amqp):
    ch = amqp.channel()
    q = amqp.queue(ch=ch, exclusive=True)
    ch.close()
    amqp.ch.queue_declare(q, passive=True)


# ---------------------------------------------------------------- auto-delete

def test_auto_delete_after_last_consumer_cancels(amqp):
    q = amqp.queue(auto_delete=True)
    t1 = amqp.ch.basic_consume(q, lambda *a: None)
    t2 = amqp.ch.basic_consume(q, lambda *a: None)
    amqp.ch.basic_cancel(t1)
    assert queue_exists(amqp.broker, q)
    amqp.ch.basic_cancel(t2)
    assert wait_until(lambda: not queue_exists(amqp.broker, q), timeout=5)


def test_auto_delete_without_consumers_stays(amqp):
    q = amqp.queue(auto_delete=True)
    time.sleep(0.2)
    assert queue_exists(amqp.broker, q)


def test_auto_delete_after_consumer_channel_closes(amqp):
    q = amqp.queue(auto_delete=True)
    ch = amqp.channel()
    ch.basic_consume(q, lambda *a: None)
    ch.close()
    assert wait_until(lambda: not queue_exists(amqp.broker, q), timeout=5)


# -------------------------------------------------------------- counts, purge

def test_declare_ok_counts_ready_only(amqp):
    q = amqp.queue()
    for i in range(3):
        amqp.ch.basic_publish("", q, str(i).encode())
    ch2 = amqp.channel()
    get(ch2, q, auto_ack=False)  # one unacked
    ok = amqp.ch.queue_declare(q, passive=True)
    assert ok.method.message_count == 2
    assert ok.method.consumer_count == 0
    ch3 = amqp.channel()
    ch3.basic_qos(prefetch_count=1)
    ch3.basic_consume(q, lambda *a: None)
    time.sleep(0.2)
    ok = amqp.ch.queue_declare(q, passive=True)
    assert ok.method.consumer_count == 1
    assert ok.method.message_count == 1


def test_purge_returns_count_and_leaves_unacked(amqp):
    q = amqp.queue()
    for i in range(5):
        amqp.ch.basic_publish("", q, str(i).encode())
    ch2 = amqp.channel()
    m, _, b = get(ch2, q, auto_ack=False)
    assert b == b"0"
    ok = amqp.ch.queue_purge(q)
    assert ok.method.message_count == 4
    assert message_count(amqp.ch, q) == 0
    ch2.close()  # the unacked one comes back
    m, _, b = get(amqp.ch, q)
    assert b == b"0" and m.redelivered


def test_purge_empty(amqp):
    q = amqp.queue()
    assert amqp.ch.queue_purge(q).method.message_count == 0


def test_purge_missing_404(amqp):
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.queue_purge(uname("missing"))


# --------------------------------------------------------------------- delete

def test_delete_returns_count(amqp):
    q = amqp.queue()
    for i in range(3):
        amqp.ch.basic_publish("", q, b"m")
    get(amqp.ch, q)
    wait_until(lambda: message_count(amqp.ch, q) == 2)
    assert amqp.ch.queue_delete(q).method.message_count == 2
    assert not queue_exists(amqp.broker, q)


def test_delete_if_empty_non_empty_406(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.queue_delete(q, if_empty=True)
    assert queue_exists(amqp.broker, q)


def test_delete_if_empty_ok(amqp):
    q = amqp.queue()
    amqp.ch.queue_delete(q, if_empty=True)
    assert not queue_exists(amqp.broker, q)


def test_delete_if_unused_with_consumer_406(amqp):
    q = amqp.queue()
    ch2 = amqp.channel()
    ch2.basic_consume(q, lambda *a: None)
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.queue_delete(q, if_unused=True)
    assert queue_exists(amqp.broker, q)


def test_delete_missing_ok(amqp):
    ok = amqp.ch.queue_delete(uname("missing"))
    assert ok.method.message_count == 0
    amqp.ch.queue_delete(uname("missing"), if_empty=True, if_unused=True)


def test_delete_removes_bindings(amqp):
    x = amqp.exchange("fanout")
    q = amqp.bound_queue(x)
    amqp.ch.queue_delete(q)
    amqp.ch.queue_declare(q)
    amqp.ch.basic_publish(x, "", b"m")
    assert_empty(amqp.ch, q)


# ------------------------------------------------------------------- bindings

def test_bind_missing_queue_404(amqp):
    x = amqp.exchange("direct")
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.queue_bind(uname("missing"), x, routing_key="k")


def test_bind_missing_exchange_404(amqp):
    q = amqp.queue()
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.queue_bind(q, uname("missing"), routing_key="k")


def test_unbind(amqp):
    x = amqp.exchange("direct")
    q = amqp.bound_queue(x, "k")
    amqp.ch.queue_unbind(q, x, routing_key="k")
    amqp.ch.basic_publish(x, "k", b"m")
    assert_empty(amqp.ch, q)


def test_unbind_missing_binding_ok(amqp):
    x = amqp.exchange("direct")
    q = amqp.queue()
    amqp.ch.queue_unbind(q, x, routing_key="never-bound")


def test_unbind_missing_exchange_ok(amqp):
    q = amqp.queue()
    amqp.ch.queue_unbind(q, uname("missing"), routing_key="k")
    amqp.ch.queue_declare(q, passive=True)


def test_unbind_missing_queue_ok(amqp):
    x = amqp.exchange("direct")
    amqp.ch.queue_unbind(uname("missing"), x, routing_key="k")
    amqp.ch.exchange_declare(x, passive=True)


# ------------------------------------------------------------------------ TTL

def test_queue_message_ttl_expires(amqp):
    q = amqp.queue(arguments={"x-message-ttl": 200})
    amqp.ch.basic_publish("", q, b"m")
    time.sleep(0.6)
    assert message_count(amqp.ch, q) == 0
    assert_empty(amqp.ch, q, wait=0)


def test_queue_message_ttl_not_yet(amqp):
    q = amqp.queue(arguments={"x-message-ttl": 5000})
    amqp.ch.basic_publish("", q, b"m")
    time.sleep(0.2)
    assert get(amqp.ch, q)[2] == b"m"


def test_per_message_expiration(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"short", properties=pika.BasicProperties(expiration="200"))
    amqp.ch.basic_publish("", q, b"long", properties=pika.BasicProperties(expiration="60000"))
    time.sleep(0.6)
    m, p, b = get(amqp.ch, q)
    assert b == b"long"
    assert p.expiration == "60000"  # kept on delivery
    assert_empty(amqp.ch, q, wait=0)


def test_lower_of_queue_ttl_and_expiration_wins_queue_lower(amqp):
    q = amqp.queue(arguments={"x-message-ttl": 200})
    amqp.ch.basic_publish("", q, b"m", properties=pika.BasicProperties(expiration="60000"))
    time.sleep(0.6)
    assert_empty(amqp.ch, q, wait=0)


def test_lower_of_queue_ttl_and_expiration_wins_message_lower(amqp):
    q = amqp.queue(arguments={"x-message-ttl": 60000})
    amqp.ch.basic_publish("", q, b"m", properties=pika.BasicProperties(expiration="200"))
    time.sleep(0.6)
    assert_empty(amqp.ch, q, wait=0)


def test_expired_message_not_delivered_to_consumer(amqp):
    q = amqp.queue(arguments={"x-message-ttl": 100})
    amqp.ch.basic_publish("", q, b"old")
    time.sleep(0.4)
    amqp.ch.basic_publish("", q, b"new")
    got = []
    for m, p, b in amqp.ch.consume(q, auto_ack=True, inactivity_timeout=0.5):
        if m is None:
            break
        got.append(b)
    amqp.ch.cancel()
    assert got == [b"new"]


def test_ttl_zero_with_waiting_consumer_delivers(amqp):
    q = amqp.queue(arguments={"x-message-ttl": 0})
    got = []
    amqp.ch.basic_consume(q, lambda ch, m, p, b: got.append(b), auto_ack=True)
    amqp.ch.basic_publish("", q, b"now")
    wait_until(lambda: got, timeout=3, conn=amqp.conn)
    assert got == [b"now"]


def test_ttl_zero_without_consumer_drops(amqp):
    q = amqp.queue(arguments={"x-message-ttl": 0})
    amqp.ch.basic_publish("", q, b"m")
    assert_empty(amqp.ch, q, wait=0.2)


# -------------------------------------------------------------------- expires

def test_queue_expires_when_unused(amqp):
    q = amqp.queue(arguments={"x-expires": 300})
    time.sleep(1.2)  # don't look before: a passive declare counts as use
    assert not queue_exists(amqp.broker, q)


def test_queue_expires_timer_reset_by_passive_declare(amqp):
    q = amqp.queue(arguments={"x-expires": 1000})
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        amqp.ch.queue_declare(q, passive=True)
        time.sleep(0.25)
    amqp.ch.queue_declare(q, passive=True)
    time.sleep(2.0)
    assert not queue_exists(amqp.broker, q)


def test_queue_expires_after_last_consumer_goes(amqp):
    q = amqp.queue(arguments={"x-expires": 300})
    tag = amqp.ch.basic_consume(q, lambda *a: None)
    time.sleep(0.6)
    amqp.ch.basic_cancel(tag)
    time.sleep(1.2)
    assert not queue_exists(amqp.broker, q)


def test_queue_with_consumer_does_not_expire(amqp):
    q = amqp.queue(arguments={"x-expires": 300})
    amqp.ch.basic_consume(q, lambda *a: None)
    time.sleep(1.0)
    assert queue_exists(amqp.broker, q)


# ------------------------------------------------------------ bad arguments

@pytest.mark.parametrize("args", [
    {"x-message-ttl": "abc"},
    {"x-message-ttl": -1},
    {"x-expires": 0},
    {"x-expires": "soon"},
    {"x-max-length": -1},
    {"x-max-length": "ten"},
    {"x-max-length-bytes": -1},
    {"x-max-priority": -1},
    {"x-max-priority": 256},
    {"x-overflow": "explode"},
    {"x-queue-mode": "fast"},
    {"x-dead-letter-exchange": 5},
    {"x-dead-letter-routing-key": "k"},  # a DL routing key without a DL exchange
    {"x-single-active-consumer": "yes"},
    {"x-queue-type": "unknown-type"},
], ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_invalid_argument_406(amqp, args):
    name = uname("bad")
    amqp.track_queue(name)
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.queue_declare(name, arguments=args)
    assert not queue_exists(amqp.broker, name)


@pytest.mark.parametrize("args", [
    {"x-message-ttl": 0},
    {"x-max-length": 0},
    {"x-max-priority": 255},
    {"x-overflow": "reject-publish"},
    {"x-overflow": "drop-head"},
    {"x-queue-mode": "lazy"},
    {"x-single-active-consumer": True},
    {"x-queue-type": "classic"},
    {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "somewhere"},
], ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_valid_argument_accepted(amqp, args):
    amqp.queue(arguments=args)


@pytest.mark.parametrize("flags", [
    {"exclusive": True, "durable": True},
    {"durable": False},
    {"auto_delete": True, "durable": True},
], ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_quorum_queue_invalid_flags_406(amqp, flags):
    name = uname("qq")
    amqp.track_queue(name)
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.queue_declare(name, arguments={"x-queue-type": "quorum"}, **flags)
