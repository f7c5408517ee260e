"""Node's amqplib, callback and promise APIs, in the habits of Node applications."""
import pytest

from conftest import by_event


def test_callback_api_close_after_a_publish_burst(target, node, names):
    # Issue 19: sendToQueue until it returns false, then connection.close(). amqplib writes close ahead of
    # the buffered publishes; the broker must not reset the socket (EPIPE kills the process: no 'error'
    # listener in the program, as in a new user's). Publishes after close are dropped, as RabbitMQ does.
    code, events, err = node("close_after_burst.js", target.url, names("compat-node-burst"), "3")
    assert code == 0, err
    closed = by_event(events, "closed")
    assert len(closed) == 3, events
    for c in closed:
        assert c["error"] is None, c
        assert c["sent"] >= 100, c
    assert [e["error"] for e in by_event(events, "close-event")] == [None, None, None]
    assert by_event(events, "done") == [{"event": "done", "rounds": 3}]


def test_callback_api_confirms_get_consume_and_channel_error(target, node, names):
    code, events, err = node("callback_api.js", target.url, names("compat-node-cb"))
    assert code == 0, (events, err)
    # The consumer's cancel notification (its queue deleted from another channel) comes before or after the
    # delete-ok: Mailroom sends it first; RabbitMQ usually does, not always (each channel writes on its own).
    assert sorted(e["event"] for e in events[3:5]) == ["channel-error", "consumer-cancelled"], events
    events = [e for e in events if e["event"] != "consumer-cancelled"]
    assert [e["event"] for e in events] == ["confirmed", "got", "consumed", "channel-error", "closed"], events
    assert events[0]["acked"] == 300
    assert events[1] == {"event": "got", "body": "0", "header": 0}
    assert events[2] == {"event": "consumed", "count": 299, "inOrder": True}
    assert events[3] == {"event": "channel-error", "code": 404, "deletedWith": 0}
    assert events[4]["error"] is None


def test_promise_api_close_after_a_publish_burst(target, node, names):
    code, events, err = node("promise_api.js", "closeAfterBurst", target.url, names("compat-node-burst"))
    assert code == 0, (events, err)
    assert len(by_event(events, "closed")) == 1


def test_server_capabilities(target, node):
    code, events, err = node("promise_api.js", "capabilities", target.url, "-")
    assert code == 0, (events, err)
    props = by_event(events, "server")[0]["properties"]
    caps = props["capabilities"]
    for cap in ("publisher_confirms", "exchange_exchange_bindings", "basic.nack", "consumer_cancel_notify",
                "connection.blocked", "authentication_failure_close", "per_consumer_qos", "direct_reply_to"):
        assert caps.get(cap) is True, (cap, caps)
    assert props["product"] == "RabbitMQ"


def test_confirms_and_multiple_acks(target, node, names):
    code, events, err = node("promise_api.js", "confirms", target.url, names("compat-node-c"))
    assert code == 0, (events, err)
    assert by_event(events, "confirmed")[0] == {"event": "confirmed", "acked": 1000, "published": 1000}
    consumed = by_event(events, "consumed")[0]
    assert consumed["count"] == 1000 and consumed["inOrder"] is True
    assert consumed["maxUnacked"] <= 50  # prefetch honoured (acks every tenth, multiple)
    assert consumed["left"] == 0


def test_mandatory_return(target, node, names):
    q = names("compat-node-r")
    code, events, err = node("promise_api.js", "returns", target.url, q)
    assert code == 0, (events, err)
    assert by_event(events, "returned")[0] == {
        "event": "returned", "replyCode": 312, "replyText": "NO_ROUTE", "routingKey": q, "body": "nobody",
        "confirmed": True}


def test_consumer_cancel_notification(target, node, names):
    code, events, err = node("promise_api.js", "cancel", target.url, names("compat-node-q"))
    assert code == 0, (events, err)
    assert by_event(events, "cancelled")[0]["channelUsable"] is True


def test_channel_error_leaves_the_connection(target, node, names):
    code, events, err = node("promise_api.js", "channelError", target.url, names("compat-node-e"))
    assert code == 0, (events, err)
    assert by_event(events, "channel-error")[0] == {
        "event": "channel-error", "code": 404, "otherChannelWorks": True, "connError": None}


def test_heartbeats_keep_an_idle_connection(target, node, names):
    code, events, err = node("promise_api.js", "heartbeat", target.url, names("compat-node-h"))
    assert code == 0, (events, err)
    assert by_event(events, "heartbeat")[0] == {
        "event": "heartbeat", "heartbeat": 1, "alive": True, "closedEarly": None}


def test_ipv6(target, node, names):
    if target.url6 is None:
        pytest.skip(f"{target.name} listens on IPv4 only here")
    code, events, err = node("promise_api.js", "ipv6", target.url6, names("compat-node-6"))
    assert code == 0, (events, err)
    assert by_event(events, "ipv6")[0]["body"] == "over v6"


def test_connection_blocked_and_unblocked(blocking_mailroom, node):
    name = "compat-node-blocked"
    code, events, err = node("promise_api.js", "blocked", blocking_mailroom.url, name)
    assert code == 0, (events, err)
    seen = by_event(events, "blocked")[0]
    assert len(seen["seen"]) == 2 and seen["seen"][0].startswith("blocked: "), seen
    assert seen["seen"][1] == "unblocked"
    # Blocked once past the watermark: the rest of the burst stays unread until unblocked.
    assert 1 <= seen["purged"] <= 64
    assert seen["after"] == "after"
