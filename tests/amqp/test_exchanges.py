"""exchange.declare / delete / bind, exchange-to-exchange bindings, alternate exchanges."""
import pika
import pytest

from helpers import (ACCESS_REFUSED, COMMAND_INVALID, NOT_FOUND, PRECONDITION_FAILED, NO_ROUTE,
                     assert_empty, exchange_exists, expect_channel_error, expect_connection_error, get,
                     uname)

TYPES = ["direct", "fanout", "topic", "headers"]


@pytest.mark.parametrize("xtype", TYPES)
def test_declare_each_type(amqp, xtype):
    x = amqp.exchange(xtype)
    amqp.ch.exchange_declare(x, exchange_type=xtype)  # equivalent redeclare is fine
    amqp.ch.exchange_declare(x, passive=True)
    assert exchange_exists(amqp.broker, x)


@pytest.mark.parametrize("x", ["amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match"])
def test_predeclared_exchanges_exist(amqp, x):
    amqp.ch.exchange_declare(x, passive=True)


@pytest.mark.parametrize("x,xtype", [("amq.direct", "direct"), ("amq.fanout", "fanout"),
                                     ("amq.topic", "topic"), ("amq.headers", "headers"),
                                     ("amq.match", "headers")])
def test_redeclare_predeclared_equivalent_ok(amqp, x, xtype):
    """RabbitMQ only applies the amq.* name check when the exchange does not exist yet."""
    amqp.ch.exchange_declare(x, exchange_type=xtype, durable=True)


def test_redeclare_predeclared_different_type_406(amqp):
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.exchange_declare("amq.direct", exchange_type="fanout", durable=True)


def test_passive_missing_404(amqp):
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.exchange_declare(uname("missing"), passive=True)


def test_passive_ignores_type_and_flags(amqp):
    x = amqp.exchange("fanout")
    amqp.ch.exchange_declare(x, exchange_type="topic", durable=True, passive=True)


def test_redeclare_different_type_406(amqp):
    x = amqp.exchange("direct")
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.exchange_declare(x, exchange_type="fanout")


def test_redeclare_different_durable_406(amqp):
    x = amqp.exchange("direct")
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.exchange_declare(x, exchange_type="direct", durable=True)


def test_redeclare_different_auto_delete_406(amqp):
    x = amqp.exchange("direct")
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.exchange_declare(x, exchange_type="direct", auto_delete=True)


def test_unknown_type_is_connection_error_503(amqp):
    with expect_connection_error(amqp.conn, COMMAND_INVALID):
        amqp.ch.exchange_declare(uname("x"), exchange_type="no-such-type")


@pytest.mark.parametrize("name", ["amq.foo", "amq.direct2", "amq."])
def test_declare_amq_prefix_403(amqp, name):
    with expect_channel_error(amqp.ch, ACCESS_REFUSED):
        amqp.ch.exchange_declare(name, exchange_type="direct")


def test_declare_default_exchange_403(amqp):
    with expect_channel_error(amqp.ch, ACCESS_REFUSED):
        amqp.ch.exchange_declare("", exchange_type="direct")


def test_delete_amq_exchange_403(amqp):
    with expect_channel_error(amqp.ch, ACCESS_REFUSED):
        amqp.ch.exchange_delete("amq.direct")


def test_delete_missing_ok(amqp):
    amqp.ch.exchange_delete(uname("missing"))
    amqp.ch.exchange_delete(uname("missing"), if_unused=True)


def test_delete(amqp):
    x = amqp.exchange("topic")
    amqp.ch.exchange_delete(x)
    assert not exchange_exists(amqp.broker, x)


def test_delete_if_unused_with_binding_406(amqp):
    x = amqp.exchange("direct")
    amqp.bound_queue(x, "k")
    with expect_channel_error(amqp.ch, PRECONDITION_FAILED):
        amqp.ch.exchange_delete(x, if_unused=True)
    assert exchange_exists(amqp.broker, x)


def test_delete_if_unused_without_binding_ok(amqp):
    x = amqp.exchange("direct")
    amqp.ch.exchange_delete(x, if_unused=True)
    assert not exchange_exists(amqp.broker, x)


def test_delete_if_unused_only_counts_source_bindings(amqp):
    """An exchange that is only the destination of an e2e binding is unused."""
    src = amqp.exchange("fanout")
    dst = amqp.exchange("fanout")
    amqp.ch.exchange_bind(dst, src)
    amqp.ch.exchange_delete(dst, if_unused=True)
    assert not exchange_exists(amqp.broker, dst)


def test_delete_exchange_removes_its_bindings(amqp):
    x = amqp.exchange("fanout")
    q = amqp.bound_queue(x)
    amqp.ch.exchange_delete(x)
    amqp.exchange("fanout", name=x)  # same name again: no old bindings
    amqp.ch.basic_publish(x, "", b"m")
    assert_empty(amqp.ch, q)


def test_publish_to_missing_exchange_404(amqp):
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.basic_publish(uname("missing"), "k", b"m")


def test_publish_after_delete_by_another_connection_404(amqp):
    """A channel that has published to an exchange gets the 404 on its very next publish once another
    connection deleted it; once re-declared (another type), a channel reaches only the new bindings."""
    x = amqp.exchange("direct")
    old = amqp.bound_queue(x, "k")
    amqp.ch.basic_publish(x, "k", b"before")
    assert get(amqp.ch, old)[2] == b"before"
    amqp.channel(amqp.connect()).exchange_delete(x)
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.basic_publish(x, "k", b"after the delete")
    ch = amqp.channel()
    amqp.exchange("fanout", name=x, ch=ch)
    new = amqp.bound_queue(x, ch=ch)
    ch.basic_publish(x, "k", b"again")
    assert get(ch, new)[2] == b"again"
    assert_empty(ch, old)


def test_publish_after_own_delete_and_redeclare(amqp):
    """One channel publishes, deletes the exchange, re-declares it as another type and publishes again:
    the second message follows the new exchange's bindings, not the old one's."""
    x = amqp.exchange("direct")
    old = amqp.bound_queue(x, "k")
    amqp.ch.basic_publish(x, "k", b"1")
    amqp.ch.exchange_delete(x)
    amqp.exchange("fanout", name=x)
    new = amqp.bound_queue(x)
    amqp.ch.basic_publish(x, "k", b"2")
    assert get(amqp.ch, new)[2] == b"2"
    assert get(amqp.ch, old)[2] == b"1"
    assert_empty(amqp.ch, old)


def test_publish_after_auto_delete_404(amqp):
    """An auto-delete exchange gone with its last binding is a 404 for the channel that published to it."""
    x = amqp.exchange("direct", auto_delete=True)
    q = amqp.bound_queue(x, "k")
    amqp.ch.basic_publish(x, "k", b"m")
    assert get(amqp.ch, q)[2] == b"m"
    amqp.ch.queue_unbind(q, x, routing_key="k")
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.basic_publish(x, "k", b"m")


def test_internal_exchange_publish_403(amqp):
    x = amqp.exchange("fanout", internal=True)
    with expect_channel_error(amqp.ch, ACCESS_REFUSED):
        amqp.ch.basic_publish(x, "", b"m")


def test_internal_exchange_reachable_via_e2e(amqp):
    inner = amqp.exchange("fanout", internal=True)
    outer = amqp.exchange("fanout")
    amqp.ch.exchange_bind(inner, outer)
    q = amqp.bound_queue(inner)
    amqp.ch.basic_publish(outer, "", b"via-outer")
    m, _, b = get(amqp.ch, q)
    assert b == b"via-outer" and m.exchange == outer


def test_bind_to_default_exchange_403(amqp):
    q = amqp.queue()
    with expect_channel_error(amqp.ch, ACCESS_REFUSED):
        amqp.ch.queue_bind(q, "", routing_key=q)


def test_e2e_binding_deliver_exchange_is_published_to(amqp):
    src = amqp.exchange("topic")
    dst = amqp.exchange("direct")
    amqp.ch.exchange_bind(destination=dst, source=src, routing_key="a.*")
    q = amqp.bound_queue(dst, "a.b")
    amqp.ch.basic_publish(src, "a.b", b"m1")
    m, _, b = get(amqp.ch, q)
    assert b == b"m1"
    assert m.exchange == src
    assert m.routing_key == "a.b"
    amqp.ch.basic_publish(src, "a.c", b"m2")  # passes src, not dst
    amqp.ch.basic_publish(src, "b.b", b"m3")  # does not pass src
    assert_empty(amqp.ch, q)


def test_e2e_chain_of_three(amqp):
    a, b, c = amqp.exchange("fanout"), amqp.exchange("fanout"), amqp.exchange("fanout")
    amqp.ch.exchange_bind(b, a)
    amqp.ch.exchange_bind(c, b)
    q = amqp.bound_queue(c)
    amqp.ch.basic_publish(a, "", b"m")
    m, _, body = get(amqp.ch, q)
    assert body == b"m" and m.exchange == a


def test_e2e_cycle_delivers_once(amqp):
    a, b = amqp.exchange("fanout"), amqp.exchange("fanout")
    amqp.ch.exchange_bind(b, a)
    amqp.ch.exchange_bind(a, b)
    qa = amqp.bound_queue(a)
    qb = amqp.bound_queue(b)
    amqp.ch.basic_publish(a, "", b"m")
    assert get(amqp.ch, qa)[2] == b"m"
    assert get(amqp.ch, qb)[2] == b"m"
    assert_empty(amqp.ch, qa)
    assert_empty(amqp.ch, qb, wait=0)


def test_e2e_overlapping_paths_one_copy(amqp):
    src = amqp.exchange("fanout")
    mid = amqp.exchange("fanout")
    amqp.ch.exchange_bind(mid, src)
    q = amqp.queue()
    amqp.ch.queue_bind(q, src)
    amqp.ch.queue_bind(q, mid)
    amqp.ch.basic_publish(src, "", b"m")
    assert get(amqp.ch, q)[2] == b"m"
    assert_empty(amqp.ch, q)


def test_exchange_unbind(amqp):
    src = amqp.exchange("fanout")
    dst = amqp.exchange("fanout")
    amqp.ch.exchange_bind(dst, src)
    q = amqp.bound_queue(dst)
    amqp.ch.exchange_unbind(dst, src)
    amqp.ch.basic_publish(src, "", b"m")
    assert_empty(amqp.ch, q)


def test_exchange_bind_missing_404(amqp):
    x = amqp.exchange("fanout")
    with expect_channel_error(amqp.ch, NOT_FOUND):
        amqp.ch.exchange_bind(uname("missing"), x)
    ch = amqp.channel()
    with expect_channel_error(ch, NOT_FOUND):
        ch.exchange_bind(x, uname("missing"))


def test_exchange_unbind_missing_binding_ok(amqp):
    a, b = amqp.exchange("direct"), amqp.exchange("direct")
    amqp.ch.exchange_unbind(b, a, routing_key="nothing-here")


def test_alternate_exchange_gets_unroutable(amqp):
    ae = amqp.exchange("fanout")
    ae_q = amqp.bound_queue(ae)
    x = amqp.exchange("direct", arguments={"alternate-exchange": ae})
    q = amqp.bound_queue(x, "known")
    amqp.ch.basic_publish(x, "known", b"routed")
    amqp.ch.basic_publish(x, "unknown", b"unroutable")
    assert get(amqp.ch, q)[2] == b"routed"
    m, _, b = get(amqp.ch, ae_q)
    assert b == b"unroutable"
    assert m.exchange == x and m.routing_key == "unknown"
    assert_empty(amqp.ch, ae_q)
    assert_empty(amqp.ch, q, wait=0)


def test_alternate_exchange_mandatory_not_returned(amqp):
    ae = amqp.exchange("fanout")
    ae_q = amqp.bound_queue(ae)
    x = amqp.exchange("direct", arguments={"alternate-exchange": ae})
    returned = []
    amqp.ch.add_on_return_callback(lambda *a: returned.append(a))
    amqp.ch.basic_publish(x, "nowhere", b"m", mandatory=True)
    assert get(amqp.ch, ae_q)[2] == b"m"
    amqp.conn.process_data_events(time_limit=0.2)
    assert returned == []


def test_alternate_exchange_unroutable_too_is_returned(amqp):
    ae = amqp.exchange("direct")  # nothing bound
    x = amqp.exchange("direct", arguments={"alternate-exchange": ae})
    returned = []
    amqp.ch.add_on_return_callback(lambda ch, m, p, b: returned.append((m, b)))
    amqp.ch.basic_publish(x, "nowhere", b"m", mandatory=True)
    amqp.conn.process_data_events(time_limit=0.3)
    assert len(returned) == 1
    m, b = returned[0]
    assert m.reply_code == NO_ROUTE and m.exchange == x and b == b"m"


def test_alternate_exchange_missing_is_dropped(amqp):
    x = amqp.exchange("direct", arguments={"alternate-exchange": uname("missing")})
    amqp.ch.basic_publish(x, "nowhere", b"m")
    amqp.ch.exchange_declare(x, passive=True)  # channel still fine


def test_auto_delete_exchange_deleted_after_last_unbind(amqp):
    x = amqp.exchange("direct", auto_delete=True)
    q = amqp.bound_queue(x, "k")
    assert exchange_exists(amqp.broker, x)
    amqp.ch.queue_unbind(q, x, routing_key="k")
    assert not exchange_exists(amqp.broker, x)


def test_auto_delete_exchange_without_bindings_stays(amqp):
    x = amqp.exchange("direct", auto_delete=True)
    assert exchange_exists(amqp.broker, x)
