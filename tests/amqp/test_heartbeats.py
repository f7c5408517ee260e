"""Heartbeats under load (issue 15): a raw-socket client negotiates heartbeat=2 s and publishes flat out on
the same connection; the server must keep the connection alive and never leave the client without a frame
for longer than the heartbeat interval.

As in RabbitMQ (rabbit_heartbeat checks the socket's send_oct/recv_oct counters), any frame counts as
liveness in both directions: while confirms stream back, the server need not send heartbeat frames, and
the client's publishes stand in for its own heartbeats. With a publisher that is not in confirm mode, the
server has nothing else to send, so its heartbeat frames are the only thing the client receives: that case
shows whether reading a saturated socket starves the server's heartbeat timer.

Unroutable publishes (default exchange, no such queue, not mandatory) keep the broker's memory flat while
it is flooded; in confirm mode they are confirmed at once.
"""
import socket
import struct
import threading
import time

import pika
import pika.frame
import pika.spec as spec
import pytest

from helpers import AMQP_HEADER, raw_connect, uname

HEARTBEAT_S = 2
FLOOD_S = 4 * HEARTBEAT_S
IDLE_S = 2.5 * HEARTBEAT_S
# Publishes per sendall(): large enough that the client never is the bottleneck.
PUBLISHES_PER_CHUNK = 500
BODY = b"x" * 16

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
BASIC_ACK, BASIC_NACK, BASIC_QOS_OK = (60, 80), (60, 120), (60, 11)
CONNECTION_CLOSE = (10, 50)


def method(channel, m):
    return pika.frame.Method(channel, m).marshal()


class FloodClient:
    """A raw AMQP client: a reader thread timestamps every frame the server sends; the caller writes."""

    def __init__(self, broker):
        self.sock = raw_connect(broker, timeout=10.0)
        self.buf = b""
        self.lock = threading.Lock()
        self.frame_times = []  # arrival time of every server frame after the handshake
        self.heartbeat_times = []  # arrival time of server heartbeat frames
        self.methods = []  # (time, (class, method))
        self.acked = 0  # highest delivery tag confirmed (multiple acks folded in)
        self.nacked = 0
        self.closed_by_server = None  # reason text of a connection.close, or "eof"
        self.reader = None

    # -- handshake, synchronous (before the reader thread starts) --------------------------------------
    def _read_frame(self):
        while True:
            if len(self.buf) >= 7:
                ftype, chan, size = struct.unpack(">BHI", self.buf[:7])
                if len(self.buf) >= 8 + size:
                    payload = self.buf[7:7 + size]
                    assert self.buf[7 + size] == 0xCE, "bad frame-end octet"
                    self.buf = self.buf[8 + size:]
                    return ftype, chan, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the socket")
            self.buf += chunk

    def _expect(self, cls):
        while True:
            ftype, chan, payload = self._read_frame()
            if ftype == FRAME_HEARTBEAT:
                continue
            raw = struct.pack(">BHI", ftype, chan, len(payload)) + payload + b"\xce"
            _, frame = pika.frame.decode_frame(raw)
            assert isinstance(frame.method, cls), f"expected {cls.NAME}, got {frame.method!r}"
            return frame.method

    def handshake(self, heartbeat):
        self.sock.sendall(AMQP_HEADER)
        self._expect(spec.Connection.Start)
        self.sock.sendall(method(0, spec.Connection.StartOk(
            client_properties={"product": "mailroom-heartbeat-test"},
            mechanism="PLAIN", response="\0guest\0guest", locale="en_US")))
        tune = self._expect(spec.Connection.Tune)
        self.sock.sendall(method(0, spec.Connection.TuneOk(
            channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=heartbeat)))
        self.sock.sendall(method(0, spec.Connection.Open(virtual_host="/")))
        self._expect(spec.Connection.OpenOk)
        self.sock.sendall(method(1, spec.Channel.Open()))
        self._expect(spec.Channel.OpenOk)

    def confirm_select(self):
        self.sock.sendall(method(1, spec.Confirm.Select()))
        self._expect(spec.Confirm.SelectOk)

    # -- the reader thread ----------------------------------------------------------------------------
    def start_reader(self):
        self.sock.settimeout(None)
        self.reader = threading.Thread(target=self._read_loop, daemon=True)
        self.reader.start()

    def _read_loop(self):
        try:
            while True:
                ftype, chan, payload = self._read_frame()
                now = time.monotonic()
                with self.lock:
                    self.frame_times.append(now)
                    if ftype == FRAME_HEARTBEAT:
                        self.heartbeat_times.append(now)
                        continue
                    if ftype != FRAME_METHOD:
                        continue
                    ids = struct.unpack(">HH", payload[:4])
                    self.methods.append((now, ids))
                    if ids == BASIC_ACK or ids == BASIC_NACK:
                        tag = struct.unpack(">Q", payload[4:12])[0]
                        if ids == BASIC_NACK:
                            self.nacked += 1
                        self.acked = max(self.acked, tag)
                    elif ids == CONNECTION_CLOSE:
                        code = struct.unpack(">H", payload[4:6])[0]
                        self.closed_by_server = f"connection.close {code}: {payload[7:7 + payload[6]]!r}"
                        return
        except (EOFError, OSError) as e:
            with self.lock:
                if self.closed_by_server is None:
                    self.closed_by_server = f"socket closed: {e}"

    # -- what the caller writes -----------------------------------------------------------------------
    def flood(self, seconds, routing_key):
        """Publishes flat out for `seconds`; returns the number of messages sent."""
        one = (method(1, spec.Basic.Publish(exchange="", routing_key=routing_key))
               + pika.frame.Header(1, len(BODY), pika.BasicProperties()).marshal()
               + pika.frame.Body(1, BODY).marshal())
        chunk = one * PUBLISHES_PER_CHUNK
        sent = 0
        self.sock.settimeout(10.0)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.closed_by_server is None:
            self.sock.sendall(chunk)
            sent += PUBLISHES_PER_CHUNK
        return sent

    def idle(self, seconds):
        """Sends only client heartbeats (every second) for `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.closed_by_server is None:
            self.sock.sendall(pika.frame.Heartbeat().marshal())
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def wait_for(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate():
                    return True
                if self.closed_by_server is not None:
                    return False
            time.sleep(0.02)
        with self.lock:
            return predicate()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def max_gap(times, start, end):
    """The longest stretch within [start, end] without an arrival."""
    points = [start] + [t for t in times if start <= t <= end] + [end]
    return max(b - a for a, b in zip(points, points[1:]))


def describe(times, start):
    return ", ".join(f"{t - start:.2f}" for t in times)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("confirms", [True, False], ids=["confirm", "no-confirm"])
def test_heartbeats_hold_under_a_saturating_publisher(broker, confirms):
    c = FloodClient(broker)
    try:
        c.handshake(HEARTBEAT_S)
        if confirms:
            c.confirm_select()
        c.start_reader()
        start = time.monotonic()
        sent = c.flood(FLOOD_S, uname("hb-unroutable"))
        flood_end = time.monotonic()
        rate = sent / (flood_end - start)
        with c.lock:
            frames = list(c.frame_times)
            beats = list(c.heartbeat_times)
            closed = c.closed_by_server
        print(f"\n{broker.name} confirms={confirms}: {sent} publishes in {flood_end - start:.1f} s "
              f"({rate:,.0f}/s); {len(frames)} server frames, heartbeats at [{describe(beats, start)}] s")
        assert closed is None, f"the server dropped a flooding client: {closed}"
        gap = max_gap(frames, start, flood_end)
        print(f"longest server silence while flooded: {gap:.2f} s")
        assert gap <= HEARTBEAT_S, (
            f"{broker.name} left the client without any frame for {gap:.2f} s while it published "
            f"(heartbeat {HEARTBEAT_S} s; heartbeats at [{describe(beats, start)}] s)")
        if not confirms:
            # Nothing but heartbeats comes back: they must not starve behind the reads.
            assert len(beats) >= FLOOD_S / HEARTBEAT_S, f"only {len(beats)} heartbeats in {FLOOD_S} s"

        # The connection is still usable: every publish confirmed, or a round trip answered.
        if confirms:
            assert c.wait_for(lambda: c.acked >= sent, 30), (
                f"only {c.acked} of {sent} publishes confirmed ({c.closed_by_server})")
            assert c.nacked == 0
        else:
            c.sock.sendall(method(1, spec.Basic.Qos(prefetch_count=1)))
            assert c.wait_for(lambda: any(ids == BASIC_QOS_OK for _, ids in c.methods), 30), (
                f"no basic.qos-ok after the flood ({c.closed_by_server})")

        # Idle afterwards: the server's own heartbeats come at least every heartbeat interval.
        idle_start = time.monotonic()
        c.idle(IDLE_S)
        idle_end = time.monotonic()
        with c.lock:
            beats = [t for t in c.heartbeat_times if t >= idle_start]
            closed = c.closed_by_server
        print(f"idle: heartbeats at [{describe(beats, idle_start)}] s")
        assert closed is None, f"the server dropped an idle client that sent heartbeats: {closed}"
        gap = max_gap(beats, idle_start, idle_end)
        assert gap <= HEARTBEAT_S, f"no heartbeat from {broker.name} for {gap:.2f} s while idle"
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_consumer_timeout_fires_on_a_connection_without_heartbeats(mailroom_factory):
    """The connection's one timer also serves the consumer acknowledgement timeout: with heartbeats off (no
    other deadline to wake it) a delivery held unacked still closes its channel with 406 on time.
    Mailroom only: the local RabbitMQ's consumer_timeout is its 30-minute default."""
    import pika.exceptions as pex
    from helpers import PRECONDITION_FAILED
    with mailroom_factory(["--consumer-timeout-ms", "1000"]) as b:
        conn = pika.BlockingConnection(b.params(heartbeat=0))
        try:
            ch = conn.channel()
            q = ch.queue_declare("", exclusive=True).method.queue
            # Idle first: the timer must re-arm for a delivery made long after the connection opened.
            conn.sleep(1.5)
            ch.basic_publish("", q, b"held")
            got = []
            ch.basic_consume(q, lambda c, m, p, body: got.append((time.monotonic(), body)), auto_ack=False)
            closes = []
            ch._impl.add_on_close_callback(lambda _ch, reason: closes.append((time.monotonic(), reason)))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not closes:
                conn.process_data_events(time_limit=0.1)
            assert closes, "the channel was not closed within 10 s"
            closed_at, reason = closes[0]
            assert isinstance(reason, pex.ChannelClosedByBroker), reason
            assert reason.reply_code == PRECONDITION_FAILED, reason
            assert got and got[0][1] == b"held"
            held = closed_at - got[0][0]
            assert 0.9 <= held <= 3.0, f"channel closed {held:.2f} s after the delivery (timeout 1 s)"
            assert conn.is_open, "only the channel closes"
        finally:
            if conn.is_open:
                conn.close()
