"""Routing rules of the direct, fanout, topic and headers exchanges (as RabbitMQ 3.10 does them)."""
import decimal

import pytest

from helpers import PRECONDITION_FAILED, assert_empty, expect_channel_error, get

import pika
from pika.compat import long  # an int subclass that pika encodes as a 64-bit 'l' field

TOPIC_CASES = [
    # pattern, routing key, matches
    ("#", "", True),
    ("#.#", "", True),
    ("*", "", False),
    ("", "", True),
    ("", "a", False),
    ("#", "a.b.c", True),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a.", True),   # "a." is two words: "a" and ""
    ("a.*", "a", False),
    ("*.*", ".", True),
    ("a.#", "a", True),
    ("a.#", "a.b.c", True),
    ("a.#", "ab", False),
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.y.b", True),
    ("a.#.b", "a.b.c", False),
    ("a.#.#.b", "a.b", True),
    ("#.a", "a", True),
    ("#.b.#", "b", True),
    ("#.b.#", "a.b.c", True),
    ("*.#", "", False),
    ("#.*", "a", True),
    ("*.b", "a.b", True),
    ("*.b", "b", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a..c", True),
    ("a.*.c", "a.c", False),
    ("a.b", "a.b", True),
    ("a.b", "a.b.", False),
    ("a", "A", False),
    ("a.b", "a.bb", False),
]


@pytest.mark.parametrize("pattern,key,matches", TOPIC_CASES,
                         ids=[f"{p!r}~{k!r}" for p, k, _ in TOPIC_CASES])
def test_topic(amqp, pattern, key, matches):
    x = amqp.exchange("topic")
    q = amqp.bound_queue(x, pattern)
    amqp.ch.basic_publish(x, key, b"m")
    if matches:
        m, _, _ = get(amqp.ch, q)
        assert m.routing_key == key
    else:
        assert_empty(amqp.ch, q)


def test_topic_overlapping_bindings_one_copy(amqp):
    x = amqp.exchange("topic")
    q = amqp.queue()
    for p in ("a.*", "#", "a.b", "*.b"):
        amqp.ch.queue_bind(q, x, routing_key=p)
    amqp.ch.basic_publish(x, "a.b", b"m")
    assert get(amqp.ch, q)[2] == b"m"
    assert_empty(amqp.ch, q)


def test_topic_several_queues(amqp):
    x = amqp.exchange("topic")
    qs = {p: amqp.bound_queue(x, p) for p in ("stock.#", "*.usd.*", "stock.eur.*", "#.nyse")}
    amqp.ch.basic_publish(x, "stock.usd.nyse", b"m")
    for p in ("stock.#", "*.usd.*", "#.nyse"):
        assert get(amqp.ch, qs[p])[2] == b"m"
    assert_empty(amqp.ch, qs["stock.eur.*"])


def test_direct_multiple_bindings(amqp):
    x = amqp.exchange("direct")
    q1 = amqp.bound_queue(x, "k")
    q2 = amqp.bound_queue(x, "k")
    q3 = amqp.bound_queue(x, "other")
    amqp.ch.queue_bind(q3, x, routing_key="k2")
    amqp.ch.basic_publish(x, "k", b"k")
    amqp.ch.basic_publish(x, "k2", b"k2")
    assert get(amqp.ch, q1)[2] == b"k"
    assert get(amqp.ch, q2)[2] == b"k"
    assert get(amqp.ch, q3)[2] == b"k2"
    for q in (q1, q2, q3):
        assert_empty(amqp.ch, q, wait=0.1)


def test_direct_same_binding_twice_one_copy(amqp):
    x = amqp.exchange("direct")
    q = amqp.bound_queue(x, "k")
    amqp.ch.queue_bind(q, x, routing_key="k")
    amqp.ch.basic_publish(x, "k", b"m")
    assert get(amqp.ch, q)[2] == b"m"
    assert_empty(amqp.ch, q)


def test_direct_key_is_exact(amqp):
    x = amqp.exchange("direct")
    q = amqp.bound_queue(x, "a.*")
    amqp.ch.basic_publish(x, "a.b", b"no")
    amqp.ch.basic_publish(x, "a.*", b"yes")
    assert get(amqp.ch, q)[2] == b"yes"
    assert_empty(amqp.ch, q)


def test_fanout_ignores_key(amqp):
    x = amqp.exchange("fanout")
    qs = [amqp.bound_queue(x, k) for k in ("", "a", "b")]
    amqp.ch.basic_publish(x, "zzz", b"m")
    for q in qs:
        m, _, b = get(amqp.ch, q)
        assert b == b"m" and m.routing_key == "zzz"


def test_default_exchange_routes_by_queue_name(amqp):
    q = amqp.queue()
    amqp.ch.basic_publish("", q, b"m")
    m, _, b = get(amqp.ch, q)
    assert b == b"m" and m.exchange == "" and m.routing_key == q


def test_default_exchange_unknown_queue_dropped(amqp):
    amqp.ch.basic_publish("", amqp.name("nobody"), b"m")
    amqp.ch.exchange_declare("amq.direct", passive=True)


def test_unbind_stops_routing(amqp):
    x = amqp.exchange("direct")
    q = amqp.bound_queue(x, "k")
    amqp.ch.queue_unbind(q, x, routing_key="k")
    amqp.ch.basic_publish(x, "k", b"m")
    assert_empty(amqp.ch, q)


# ------------------------------------------------------------------ headers

HEADERS_CASES = [
    # id, binding arguments, message headers, matches
    ("all-both", {"x-match": "all", "a": 1, "b": "two"}, {"a": 1, "b": "two", "c": 3}, True),
    ("all-one-missing", {"x-match": "all", "a": 1, "b": "two"}, {"a": 1}, False),
    ("all-value-differs", {"x-match": "all", "a": 1, "b": "two"}, {"a": 1, "b": "three"}, False),
    ("any-one", {"x-match": "any", "a": 1, "b": "two"}, {"a": 1}, True),
    ("any-none", {"x-match": "any", "a": 1, "b": "two"}, {"c": 1}, False),
    ("any-wrong-values", {"x-match": "any", "a": 1, "b": "two"}, {"a": 2, "b": "three"}, False),
    ("default-is-all-match", {"a": 1, "b": 2}, {"a": 1, "b": 2}, True),
    ("default-is-all-partial", {"a": 1, "b": 2}, {"a": 1}, False),
    ("all-no-keys-empty-msg", {"x-match": "all"}, {}, True),
    ("all-no-keys-no-headers", {"x-match": "all"}, None, True),
    ("no-args-at-all", {}, {"z": 1}, True),
    ("any-no-keys", {"x-match": "any"}, {"a": 1}, False),
    ("int-vs-string", {"a": 1}, {"a": "1"}, False),
    ("string-vs-int", {"a": "1"}, {"a": 1}, False),
    ("int32-vs-int64", {"a": 1}, {"a": long(1)}, True),  # same type class: integers
    ("int64-vs-int32", {"a": long(5)}, {"a": 5}, True),
    ("int-vs-bool", {"a": 1}, {"a": True}, False),
    ("bool-vs-bool", {"a": True}, {"a": True}, True),
    ("bool-false", {"a": False}, {"a": True}, False),
    ("bytes-vs-bytes", {"a": b"\x00\x01"}, {"a": b"\x00\x01"}, True),
    ("bytes-vs-string", {"a": b"xy"}, {"a": "xy"}, True),  # byte array and longstr: one type class
    ("string", {"a": "x"}, {"a": "x"}, True),
    ("void-presence", {"a": None}, {"a": "anything"}, True),
    ("void-presence-int", {"a": None}, {"a": 7}, True),
    ("void-absent", {"a": None}, {"b": 1}, False),
    ("void-any", {"x-match": "any", "a": None, "b": 1}, {"a": 0}, True),
    ("int-vs-void-msg", {"a": 1}, {"a": None}, False),
    ("all-x-keys-ignored", {"x-match": "all", "x-foo": "1", "a": 1}, {"a": 1}, True),
    ("any-x-keys-ignored", {"x-match": "any", "x-foo": "1"}, {"x-foo": "1"}, False),
    ("any-x-ignored-but-other", {"x-match": "any", "x-foo": "1", "a": 1}, {"x-foo": "1", "a": 1}, True),
    ("all-with-x-needs-x", {"x-match": "all-with-x", "x-foo": "1", "a": 1}, {"a": 1}, False),
    ("all-with-x-has-x", {"x-match": "all-with-x", "x-foo": "1", "a": 1}, {"a": 1, "x-foo": "1"}, True),
    ("any-with-x", {"x-match": "any-with-x", "x-foo": "1", "a": 1}, {"x-foo": "1"}, True),
    ("any-with-x-none", {"x-match": "any-with-x", "x-foo": "1"}, {"x-foo": "2"}, False),
    ("nested-table-equal", {"a": {"b": 1}}, {"a": {"b": 1}}, True),
    ("array-equal", {"a": [1, "x"]}, {"a": [1, "x"]}, True),
    ("array-differs", {"a": [1, "x"]}, {"a": ["x", 1]}, False),
    ("decimal-equal", {"a": decimal.Decimal("1.5")}, {"a": decimal.Decimal("1.5")}, True),
]


@pytest.mark.parametrize("binding,headers,matches", [c[1:] for c in HEADERS_CASES],
                         ids=[c[0] for c in HEADERS_CASES])
def test_headers(amqp, binding, headers, matches):
    x = amqp.exchange("headers")
    q = amqp.bound_queue(x, "ignored-key", arguments=binding)
    amqp.ch.basic_publish(x, "any-key", b"m", properties=pika.BasicProperties(headers=headers))
    if matches:
        assert get(amqp.ch, q)[2] == b"m"
    else:
        assert_empty(amqp.ch, q)


def test_headers_bad_x_match_406(amqp):
    x = amqp.exchange("headers")
    q = amqp.queue()
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.queue_bind(q, x, arguments={"x-match": "some"})


def test_headers_unbind_needs_same_arguments(amqp):
    x = amqp.exchange("headers")
    q = amqp.bound_queue(x, arguments={"a": 1})
    amqp.ch.queue_unbind(q, x, routing_key="", arguments={"a": 2})  # no such binding: no effect, no error
    amqp.ch.basic_publish(x, "", b"1", properties=pika.BasicProperties(headers={"a": 1}))
    assert get(amqp.ch, q)[2] == b"1"
    amqp.ch.queue_unbind(q, x, routing_key="", arguments={"a": 1})
    amqp.ch.basic_publish(x, "", b"2", properties=pika.BasicProperties(headers={"a": 1}))
    assert_empty(amqp.ch, q)


def test_headers_two_bindings_one_copy(amqp):
    x = amqp.exchange("headers")
    q = amqp.bound_queue(x, arguments={"a": 1})
    amqp.ch.queue_bind(q, x, arguments={"b": 2})
    amqp.ch.basic_publish(x, "", b"m", properties=pika.BasicProperties(headers={"a": 1, "b": 2}))
    assert get(amqp.ch, q)[2] == b"m"
    assert_empty(amqp.ch, q)


def test_amq_match_is_headers(amqp):
    q = amqp.queue()
    amqp.ch.queue_bind(q, "amq.match", arguments={"x-match": "any", "id": q})
    try:
        amqp.ch.basic_publish("amq.match", "", b"m", properties=pika.BasicProperties(headers={"id": q}))
        assert get(amqp.ch, q)[2] == b"m"
    finally:
        amqp.ch.queue_unbind(q, "amq.match", arguments={"x-match": "any", "id": q})
