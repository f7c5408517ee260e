"""Dead-lettering: x-death headers, reasons, overflow behaviours."""
import datetime
import time

import pika
import pika.exceptions as pex
import pytest

from helpers import assert_empty, get, message_count, uname, wait_count

P = pika.BasicProperties


def dlx_setup(amqp, **queue_args):
    """A source queue dead-lettering into a fanout exchange with a bound queue; returns (src, dlq, dlx)."""
    dlx = amqp.exchange("fanout")
    dlq = amqp.bound_queue(dlx)
    src = amqp.queue(arguments={"x-dead-letter-exchange": dlx, **queue_args})
    return src, dlq, dlx


def test_reject_dead_letters_with_x_death(amqp):
    src, dlq, dlx = dlx_setup(amqp)
    amqp.ch.basic_publish("", src, b"m", properties=P(headers={"mine": 1}, message_id="id-1"))
    m, _, _ = get(amqp.ch, src, auto_ack=False)
    amqp.ch.basic_reject(m.delivery_tag, requeue=False)
    m, p, b = get(amqp.ch, dlq)
    assert b == b"m" and p.message_id == "id-1"
    assert m.exchange == dlx and m.routing_key == src
    h = p.headers
    assert h["mine"] == 1
    [death] = h["x-death"]
    assert death["count"] == 1
    assert death["reason"] == "rejected"
    assert death["queue"] == src
    assert death["exchange"] == ""
    assert death["routing-keys"] == [src]
    assert isinstance(death["time"], datetime.datetime)
    assert "original-expiration" not in death
    assert h["x-first-death-queue"] == src
    assert h["x-first-death-reason"] == "rejected"
    assert h["x-first-death-exchange"] == ""


def test_nack_dead_letters(amqp):
    src, dlq, _ = dlx_setup(amqp)
    amqp.ch.basic_publish("", src, b"m")
    m, _, _ = get(amqp.ch, src, auto_ack=False)
    amqp.ch.basic_nack(m.delivery_tag, requeue=False)
    assert get(amqp.ch, dlq)[1].headers["x-death"][0]["reason"] == "rejected"


def test_requeue_does_not_dead_letter(amqp):
    src, dlq, _ = dlx_setup(amqp)
    amqp.ch.basic_publish("", src, b"m")
    m, _, _ = get(amqp.ch, src, auto_ack=False)
    amqp.ch.basic_reject(m.delivery_tag, requeue=True)
    assert_empty(amqp.ch, dlq)


def test_expired_message_dead_lettered_with_original_expiration(amqp):
    src, dlq, _ = dlx_setup(amqp)
    amqp.ch.basic_publish("", src, b"m", properties=P(expiration="100"))
    m, p, b = get(amqp.ch, dlq, timeout=5)
    assert p.expiration is None
    [death] = p.headers["x-death"]
    assert death["reason"] == "expired"
    assert death["original-expiration"] == "100"
    assert p.headers["x-first-death-reason"] == "expired"


def test_queue_ttl_dead_letter(amqp):
    src, dlq, _ = dlx_setup(amqp, **{"x-message-ttl": 100})
    amqp.ch.basic_publish("", src, b"m")
    m, p, b = get(amqp.ch, dlq, timeout=5)
    [death] = p.headers["x-death"]
    assert death["reason"] == "expired" and "original-expiration" not in death


def test_dead_letter_routing_key(amqp):
    dlx = amqp.exchange("direct")
    dlq = amqp.bound_queue(dlx, "dead")
    src = amqp.queue(arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead"})
    amqp.ch.basic_publish("", src, b"m")
    m, _, _ = get(amqp.ch, src, auto_ack=False)
    amqp.ch.basic_reject(m.delivery_tag, requeue=False)
    m, p, b = get(amqp.ch, dlq)
    assert m.routing_key == "dead"
    assert p.headers["x-death"][0]["routing-keys"] == [src]


def test_dead_letter_via_default_exchange(amqp):
    dlq = amqp.queue()
    src = amqp.queue(arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
    amqp.ch.basic_publish("", src, b"m")
    m, _, _ = get(amqp.ch, src, auto_ack=False)
    amqp.ch.basic_reject(m.delivery_tag, requeue=False)
    assert get(amqp.ch, dlq)[2] == b"m"


def test_dead_letter_to_missing_exchange_dropped(amqp):
    src = amqp.queue(arguments={"x-dead-letter-exchange": uname("missing")})
    amqp.ch.basic_publish("", src, b"m")
    m, _, _ = get(amqp.ch, src, auto_ack=False)
    amqp.ch.basic_reject(m.delivery_tag, requeue=False)
    amqp.ch.exchange_declare("amq.direct", passive=True)
    assert message_count(amqp.ch, src) == 0


def test_x_death_count_grows_and_newest_first(amqp):
    """work -> (reject) -> retry queue (TTL) -> (expire) -> work -> (reject) ..."""
    work, retry = uname("work"), uname("retry")
    amqp.track_queue(work)
    amqp.track_queue(retry)
    amqp.ch.queue_declare(work, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": retry})
    amqp.ch.queue_declare(retry, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": work,
                                            "x-message-ttl": 50})
    amqp.ch.basic_publish("", work, b"m")
    for _ in range(2):
        m, _, _ = get(amqp.ch, work, auto_ack=False)
        amqp.ch.basic_reject(m.delivery_tag, requeue=False)
    m, p, b = get(amqp.ch, work, auto_ack=False)
    deaths = p.headers["x-death"]
    assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == [(retry, "expired", 2), (work, "rejected", 2)]
    assert p.headers["x-first-death-queue"] == work
    assert p.headers["x-first-death-reason"] == "rejected"
    amqp.ch.basic_reject(m.delivery_tag, requeue=False)
    m, p, b = get(amqp.ch, work)
    deaths = p.headers["x-death"]
    assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == [(retry, "expired", 3), (work, "rejected", 3)]


def test_max_length_drop_head_dead_letters_oldest(amqp):
    src, dlq, _ = dlx_setup(amqp, **{"x-max-length": 2})
    amqp.ch.confirm_delivery()
    for i in range(3):
        amqp.ch.basic_publish("", src, str(i).encode())  # all acked
    m, p, b = get(amqp.ch, dlq)
    assert b == b"0"
    assert p.headers["x-death"][0]["reason"] == "maxlen"
    assert [get(amqp.ch, src)[2] for _ in range(2)] == [b"1", b"2"]


def test_max_length_zero_drops_everything(amqp):
    q = amqp.queue(arguments={"x-max-length": 0})
    amqp.ch.basic_publish("", q, b"m")
    assert_empty(amqp.ch, q)


def test_max_length_bytes(amqp):
    q = amqp.queue(arguments={"x-max-length-bytes": 10})
    for body in (b"12345", b"67890", b"abc"):
        amqp.ch.basic_publish("", q, body)
    assert wait_count(amqp.ch, q, 2) == 2
    assert [get(amqp.ch, q)[2] for _ in range(2)] == [b"67890", b"abc"]


def test_reject_publish_overflow_nacks(amqp):
    src, dlq, _ = dlx_setup(amqp, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    amqp.ch.confirm_delivery()
    amqp.ch.basic_publish("", src, b"1")
    with pytest.raises(pex.NackError):
        amqp.ch.basic_publish("", src, b"2")
    assert amqp.ch.is_open
    assert message_count(amqp.ch, src) == 1
    assert_empty(amqp.ch, dlq)  # rejected publishes are not dead-lettered
    assert get(amqp.ch, src)[2] == b"1"
    amqp.ch.basic_publish("", src, b"3")  # room again
    assert get(amqp.ch, src)[2] == b"3"


def test_reject_publish_without_confirms_drops_silently(amqp):
    q = amqp.queue(arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    amqp.ch.basic_publish("", q, b"1")
    amqp.ch.basic_publish("", q, b"2")
    time.sleep(0.2)
    assert get(amqp.ch, q)[2] == b"1"
    assert_empty(amqp.ch, q)
