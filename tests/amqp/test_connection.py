"""Connection handshake, negotiation and connection-level failures."""
import socket
import time

import pika
import pika.exceptions as pex
import pika.spec as spec
import pytest

from helpers import (AMQP_HEADER, NOT_ALLOWED, NOT_IMPLEMENTED, RawConn, get, raw_connect,
                     recv_until_closed, uname, wait_count)

CAPABILITIES = [
    "publisher_confirms", "exchange_exchange_bindings", "basic.nack", "consumer_cancel_notify",
    "connection.blocked", "consumer_priorities", "authentication_failure_close",
    "per_consumer_qos", "direct_reply_to",
]


def test_connect_guest(broker):
    c = pika.BlockingConnection(broker.params())
    assert c.is_open
    ch = c.channel()
    assert ch.is_open
    c.close()
    assert c.is_closed


def test_server_properties(amqp):
    props = amqp.conn._impl.server_properties
    assert props.get("product"), props
    caps = props["capabilities"]
    for cap in CAPABILITIES:
        assert caps.get(cap) is True, f"capability {cap} missing: {caps}"


def test_raw_handshake_start_fields(broker):
    with RawConn(broker) as rc:
        rc.send(AMQP_HEADER)
        start = rc.expect(spec.Connection.Start).method
        assert (start.version_major, start.version_minor) == (0, 9)
        assert b"PLAIN" in start.mechanisms.split() if isinstance(start.mechanisms, bytes) \
            else "PLAIN" in start.mechanisms.split()
        assert "en_US" in (start.locales.decode() if isinstance(start.locales, bytes) else start.locales)


def test_wrong_password(broker):
    with pytest.raises((pex.ProbableAuthenticationError, pex.ConnectionClosedByBroker)) as ei:
        pika.BlockingConnection(pika.URLParameters(broker.url_with(password="wrong-password")))
    assert "403" in str(ei.value) or getattr(ei.value, "reply_code", None) == 403


def test_unknown_user(broker):
    with pytest.raises((pex.ProbableAuthenticationError, pex.ConnectionClosedByBroker)) as ei:
        pika.BlockingConnection(pika.URLParameters(broker.url_with(user=uname("nobody"))))
    assert "403" in str(ei.value) or getattr(ei.value, "reply_code", None) == 403


def test_raw_bad_credentials_connection_close_403(broker):
    """With authentication_failure_close the server sends connection.close 403 after start-ok."""
    with RawConn(broker) as rc:
        rc.send(AMQP_HEADER)
        rc.expect(spec.Connection.Start)
        rc.send_method(0, spec.Connection.StartOk(
            client_properties={"capabilities": {"authentication_failure_close": True}},
            mechanism="PLAIN", response="\0guest\0nope", locale="en_US"))
        rc.expect_connection_close(403)


def test_unknown_vhost(broker):
    """pika surfaces connection.close 530 at connection.open as ProbableAccessDeniedError."""
    with pytest.raises((pex.ProbableAccessDeniedError, pex.ConnectionClosedByBroker)) as ei:
        pika.BlockingConnection(pika.URLParameters(broker.url_with(vhost=uname("novhost"))))
    assert "530" in str(ei.value) or getattr(ei.value, "reply_code", None) == NOT_ALLOWED


def test_raw_unknown_vhost_530(broker):
    with RawConn(broker) as rc:
        rc.send(AMQP_HEADER)
        rc.expect(spec.Connection.Start)
        rc.send_method(0, spec.Connection.StartOk(
            client_properties={"capabilities": {"authentication_failure_close": True}},
            mechanism="PLAIN", response="\0guest\0guest", locale="en_US"))
        t = rc.expect(spec.Connection.Tune).method
        rc.send_method(0, spec.Connection.TuneOk(channel_max=t.channel_max, frame_max=t.frame_max, heartbeat=0))
        rc.send_method(0, spec.Connection.Open(virtual_host=uname("novhost")))
        rc.expect_connection_close(NOT_ALLOWED)


def test_heartbeat_negotiated_and_idle_connection_survives(amqp):
    c = amqp.connect(heartbeat=1)
    assert c._impl.params.heartbeat == 1
    ch = c.channel()
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        c.process_data_events(time_limit=0.5)
    assert c.is_open
    q = amqp.queue(ch=ch, exclusive=True)
    ch.basic_publish("", q, b"after-idle")
    assert get(ch, q)[2] == b"after-idle"


def test_raw_server_sends_heartbeats(broker):
    with RawConn(broker) as rc:
        rc.handshake(heartbeat=1)
        deadline = time.monotonic() + 4
        seen = 0
        while time.monotonic() < deadline and seen < 2:
            f = rc.read(timeout=3)
            if isinstance(f, pika.frame.Heartbeat):
                seen += 1
                rc.send(pika.frame.Heartbeat().marshal())
        assert seen >= 2


def test_raw_missed_heartbeats_close_connection(broker):
    """A client that negotiates heartbeat=1 and then stays silent is dropped (within a few s)."""
    with RawConn(broker) as rc:
        rc.handshake(heartbeat=1)
        rc.sock.settimeout(10)
        deadline = time.monotonic() + 10
        closed = False
        while time.monotonic() < deadline:
            try:
                f = rc.read(timeout=max(0.1, deadline - time.monotonic()))
            except EOFError:
                closed = True
                break
            except socket.timeout:
                break
            if isinstance(f, pika.frame.Method) and isinstance(f.method, spec.Connection.Close):
                closed = True
                break
        assert closed, "server kept a silent connection open"


def test_heartbeat_zero_disables(amqp):
    c = amqp.connect(heartbeat=0)
    assert c._impl.params.heartbeat == 0
    assert c.is_open


def test_frame_max_negotiation_and_small_frames(amqp):
    c = amqp.connect(frame_max=4096)
    assert c._impl.params.frame_max == 4096
    ch = c.channel()
    q = amqp.queue(ch=ch, exclusive=True)
    body = bytes(range(256)) * 400  # 102400 bytes: 25+ body frames each way
    ch.basic_publish("", q, body)
    assert get(ch, q)[2] == body


def test_raw_tune_values(broker):
    with RawConn(broker) as rc:
        rc.handshake(frame_max=4096)
        assert rc.tune.frame_max == 0 or rc.tune.frame_max >= 4096
        assert rc.tune.channel_max >= 1


def test_many_channels(amqp):
    q = amqp.queue()
    chans = [amqp.conn.channel() for _ in range(200)]
    nums = {c.channel_number for c in chans}
    assert len(nums) == 200
    for i, c in enumerate(chans):
        c.basic_publish("", q, str(i).encode())
    for c in chans:
        c.close()
    assert wait_count(amqp.ch, q, 200) == 200


def test_channel_close_and_reopen(amqp):
    ch = amqp.conn.channel()
    n = ch.channel_number
    ch.close()
    ch2 = amqp.conn.channel(channel_number=n)
    assert ch2.is_open
    ch2.exchange_declare("amq.direct", passive=True)


def test_channel_flow_active_true_ok(amqp):
    assert amqp.ch.flow(True) is True


def test_channel_flow_active_false_is_540(amqp):
    with pytest.raises(pex.ConnectionClosedByBroker) as ei:
        amqp.ch.flow(False)
    assert ei.value.reply_code == NOT_IMPLEMENTED


def test_update_secret(amqp):
    """connection.update-secret with the same password is accepted (update-secret-ok)."""
    amqp.conn.update_secret("guest", "test refresh")
    assert amqp.conn.is_open
    amqp.ch.exchange_declare("amq.direct", passive=True)


def test_close_with_unacked_requeues(amqp):
    q = amqp.queue()
    c = amqp.connect()
    ch = c.channel()
    ch.basic_publish("", q, b"m")
    m, _, _ = get(ch, q, auto_ack=False)
    assert not m.redelivered
    c.close()
    m, _, b = get(amqp.ch, q)
    assert b == b"m" and m.redelivered


# Note: RabbitMQ also accepts the legacy headers AMQP 1 1 0 9 (as 0-9-1) and AMQP 1 1 8 0 (0-8);
# those are not tested here.
@pytest.mark.parametrize("header", [
    b"AMQP\x00\x00\x08\x00",
    b"AMQP\x00\x00\x09\x00",
    b"AMQP\x00\x00\x09\x02",
    b"AMQP\x00\x01\x00\x00",  # AMQP 1.0 (RabbitMQ without the 1.0 plugin refuses it)
    b"XXXXXXXX",
    b"HTTP/1.1",
    b"GET / HTTP/1.1\r\n\r\n",
])
def test_bad_protocol_header(broker, header):
    s = raw_connect(broker)
    try:
        s.sendall(header)
        assert recv_until_closed(s) == AMQP_HEADER
    finally:
        s.close()


def test_garbage_after_header_closes_socket(broker):
    s = raw_connect(broker)
    try:
        s.sendall(AMQP_HEADER)
        s.settimeout(5)
        # read connection.start
        rc_buf = b""
        while len(rc_buf) < 7:
            rc_buf += s.recv(4096)
        s.sendall(b"\xde\xad\xbe\xef" * 64)
        recv_until_closed(s, timeout=10)
    finally:
        s.close()


def test_short_header_then_close_does_not_hang(broker):
    s = raw_connect(broker)
    s.sendall(b"AMQ")
    s.close()
    # the broker still serves others
    c = pika.BlockingConnection(broker.params())
    c.close()
