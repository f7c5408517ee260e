"""Small helpers shared by the AMQP protocol tests."""
import contextlib
import socket
import struct
import time
import uuid

import pika
import pika.exceptions as pex
import pika.frame
import pika.spec as spec

# Reply codes (AMQP 0-9-1).
REPLY_SUCCESS = 200
CONTENT_TOO_LARGE = 311
NO_ROUTE = 312
NO_CONSUMERS = 313
CONNECTION_FORCED = 320
INVALID_PATH = 402
ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
FRAME_ERROR = 501
SYNTAX_ERROR = 502
COMMAND_INVALID = 503
CHANNEL_ERROR = 504
UNEXPECTED_FRAME = 505
RESOURCE_ERROR = 506
NOT_ALLOWED = 530
NOT_IMPLEMENTED = 540
INTERNAL_ERROR = 541

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def uname(prefix="t"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def sync(ch):
    """A cheap synchronous round trip on `ch`, so that an asynchronous error
    (e.g. after basic.publish or basic.ack) surfaces as an exception now."""
    ch.exchange_declare("amq.direct", passive=True)


@contextlib.contextmanager
def expect_channel_error(ch, code):
    """The body (followed by a round trip on `ch`) must close the channel with `code`.

    The connection must stay open."""
    with _raises(pex.ChannelClosedByBroker) as info:
        yield info
        sync(ch)
    assert info.exc.reply_code == code, f"expected channel close {code}, got {info.exc!r}"
    assert not ch.is_open
    assert ch.connection.is_open, "a channel error must not close the connection"


@contextlib.contextmanager
def expect_connection_error(conn, code, ch=None):
    """The body (followed by a round trip) must close the connection with `code`."""
    with _raises(pex.ConnectionClosedByBroker) as info:
        yield info
        if ch is not None:
            sync(ch)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
    assert info.exc.reply_code == code, f"expected connection close {code}, got {info.exc!r}"
    assert not conn.is_open


class _Info:
    exc = None


@contextlib.contextmanager
def _raises(exc_type):
    info = _Info()
    try:
        yield info
    except exc_type as e:
        info.exc = e
        return
    raise AssertionError(f"expected {exc_type.__name__}, nothing was raised")


def get(ch, queue, timeout=5.0, auto_ack=True):
    """basic.get, retried until a message arrives or `timeout`; returns (method, props, body)."""
    deadline = time.monotonic() + timeout
    while True:
        m, p, b = ch.basic_get(queue, auto_ack=auto_ack)
        if m is not None:
            return m, p, b
        if time.monotonic() >= deadline:
            raise AssertionError(f"no message in {queue!r} within {timeout} s")
        time.sleep(0.02)


def get_bodies(ch, queue, n, timeout=5.0, auto_ack=True):
    return [get(ch, queue, timeout, auto_ack)[2] for _ in range(n)]


def assert_empty(ch, queue, wait=0.2):
    """No message is (or becomes, within `wait` s) ready on `queue`."""
    time.sleep(wait)
    m, _, b = ch.basic_get(queue, auto_ack=True)
    assert m is None, f"unexpected message {b!r} in {queue!r}"


def message_count(ch, queue):
    return ch.queue_declare(queue, passive=True).method.message_count


def wait_count(ch, queue, n, timeout=5.0):
    """Poll the ready count of `queue` until it is n (requeues and publishes from other
    channels are asynchronous); returns the last count seen."""
    last = None
    deadline = time.monotonic() + timeout
    while True:
        last = message_count(ch, queue)
        if last == n or time.monotonic() >= deadline:
            return last
        time.sleep(0.02)


def consume_n(ch, queue, n, timeout=5.0, auto_ack=True):
    """Consume exactly n messages from `queue` with a temporary consumer; returns [(method, props, body)].

    The consumer is cancelled afterwards. With auto_ack=False the messages stay unacked."""
    out = []
    for m, p, b in ch.consume(queue, auto_ack=auto_ack, inactivity_timeout=timeout):
        if m is None:
            break
        out.append((m, p, b))
        if len(out) == n:
            break
    ch.cancel()
    assert len(out) == n, f"got {len(out)} of {n} messages from {queue!r}"
    return out


def wait_until(pred, timeout=5.0, conn=None, step=0.05):
    """Poll `pred` (pumping `conn`'s events if given) until true or timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        if conn is not None:
            conn.process_data_events(time_limit=step)
        else:
            time.sleep(step)


def queue_exists(broker, queue):
    """Passive declare from a fresh connection (405 = exists, exclusive to another connection).

    Note: a passive declare counts as use for x-expires."""
    c = pika.BlockingConnection(broker.params())
    try:
        c.channel().queue_declare(queue, passive=True)
        return True
    except pex.ChannelClosedByBroker as e:
        assert e.reply_code in (NOT_FOUND, RESOURCE_LOCKED), e
        return e.reply_code == RESOURCE_LOCKED
    finally:
        if c.is_open:
            c.close()


def exchange_exists(broker, exchange):
    c = pika.BlockingConnection(broker.params())
    try:
        c.channel().exchange_declare(exchange, passive=True)
        return True
    except pex.ChannelClosedByBroker as e:
        assert e.reply_code == NOT_FOUND, e
        return False
    finally:
        if c.is_open:
            c.close()


def publish_raw(ch, exchange, routing_key, body=b"", properties=None, mandatory=False, immediate=False):
    """basic.publish with flags pika's BlockingChannel does not expose (immediate)."""
    ch._impl._send_method(  # noqa: SLF001 - pika has no public API for `immediate`
        spec.Basic.Publish(exchange=exchange, routing_key=routing_key,
                           mandatory=mandatory, immediate=immediate),
        (properties or pika.BasicProperties(), body))


class Amqp:
    """Per-test AMQP context: `.conn`/`.ch`, new connections and channels, unique
    declared names; everything declared through it is deleted at teardown."""

    def __init__(self, broker):
        self.broker = broker
        self._conns = []
        self._queues = []
        self._exchanges = []
        self.conn = self.connect()
        self.ch = self.conn.channel()

    def connect(self, **param_overrides):
        c = pika.BlockingConnection(self.broker.params(**param_overrides))
        self._conns.append(c)
        return c

    def channel(self, conn=None):
        return (conn or self.conn).channel()

    def name(self, prefix="t"):
        return uname(prefix)

    def track_queue(self, name):
        self._queues.append(name)
        return name

    def track_exchange(self, name):
        self._exchanges.append(name)
        return name

    def queue(self, name=None, ch=None, **kwargs):
        """Declare a queue (unique name unless given, "" for server-named); returns its name."""
        ch = ch or self.ch
        if name is None:
            name = uname("q")
        ok = ch.queue_declare(name, **kwargs)
        return self.track_queue(ok.method.queue)

    def exchange(self, exchange_type="direct", name=None, ch=None, **kwargs):
        ch = ch or self.ch
        name = name or uname(f"x-{exchange_type}")
        ch.exchange_declare(name, exchange_type=exchange_type, **kwargs)
        return self.track_exchange(name)

    def bound_queue(self, exchange, routing_key="", arguments=None, ch=None, **kwargs):
        ch = ch or self.ch
        q = self.queue(ch=ch, **kwargs)
        ch.queue_bind(q, exchange, routing_key=routing_key, arguments=arguments)
        return q

    def close(self):
        for c in self._conns:
            try:
                if c.is_open:
                    c.close()
            except Exception:  # noqa: BLE001 - teardown is best effort
                pass
        if not (self._queues or self._exchanges):
            return
        try:
            c = pika.BlockingConnection(self.broker.params())
        except Exception:  # noqa: BLE001
            return
        try:
            ch = c.channel()
            for q in self._queues:
                try:
                    ch.queue_delete(q)
                except pex.ChannelClosedByBroker:
                    ch = c.channel()
            for x in self._exchanges:
                try:
                    ch.exchange_delete(x)
                except pex.ChannelClosedByBroker:
                    ch = c.channel()
        except Exception:  # noqa: BLE001
            pass
        finally:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass


# ---------------------------------------------------------------- raw sockets

def raw_connect(broker, timeout=5.0):
    s = socket.create_connection((broker.host, broker.port), timeout=timeout)
    s.settimeout(timeout)
    return s


def recv_until_closed(s, timeout=5.0, limit=1 << 20):
    """Read until EOF (or reset); returns the bytes. Fails if the peer keeps the socket open."""
    s.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < limit:
        if time.monotonic() > deadline:
            raise AssertionError(f"socket still open after {timeout} s (got {data!r})")
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        except socket.timeout:
            raise AssertionError(f"socket still open after {timeout} s (got {data!r})") from None
        if not chunk:
            break
        data += chunk
    return data


def read_frame(s):
    """Read one AMQP frame: returns (type, channel, payload)."""
    hdr = _recv_exact(s, 7)
    ftype, chan, size = struct.unpack(">BHI", hdr)
    payload = _recv_exact(s, size)
    end = _recv_exact(s, 1)
    assert end == b"\xce", f"bad frame end {end!r}"
    return ftype, chan, payload


def _recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


class RawConn:
    """A minimal hand-driven AMQP client over a socket, for frames pika won't send."""

    def __init__(self, broker, timeout=5.0):
        self.broker = broker
        self.sock = raw_connect(broker, timeout)
        self.buf = b""
        self.server_properties = None
        self.tune = None

    def send(self, data):
        self.sock.sendall(data)

    def send_method(self, channel, method):
        self.send(pika.frame.Method(channel, method).marshal())

    def send_content(self, channel, body, properties=None, frame_max=131072):
        self.send(pika.frame.Header(channel, len(body), properties or pika.BasicProperties()).marshal())
        step = frame_max - 8
        for i in range(0, len(body), step):
            self.send(pika.frame.Body(channel, body[i:i + step]).marshal())

    def read_raw(self, timeout=5.0):
        """Next frame as (type, channel, payload bytes); raises EOFError if the socket closes."""
        self.sock.settimeout(timeout)
        while True:
            if len(self.buf) >= 7:
                ftype, chan, size = struct.unpack(">BHI", self.buf[:7])
                if len(self.buf) >= 8 + size:
                    payload = self.buf[7:7 + size]
                    assert self.buf[7 + size] == 0xCE, "bad frame-end octet"
                    self.buf = self.buf[8 + size:]
                    return ftype, chan, payload
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise EOFError("server closed the socket")
            self.buf += chunk

    def read(self, timeout=5.0):
        """Next frame as a pika.frame object; raises EOFError if the socket closes."""
        ftype, chan, payload = self.read_raw(timeout)
        raw = struct.pack(">BHI", ftype, chan, len(payload)) + payload + b"\xce"
        consumed, frame = pika.frame.decode_frame(raw)
        assert frame is not None and consumed == len(raw), f"undecodable frame type {ftype}"
        return frame

    def read_method(self, timeout=5.0, skip_heartbeats=True):
        while True:
            f = self.read(timeout)
            if isinstance(f, pika.frame.Heartbeat) and skip_heartbeats:
                continue
            assert isinstance(f, pika.frame.Method), f"expected a method frame, got {f!r}"
            return f

    def expect(self, method_cls, timeout=5.0):
        f = self.read_method(timeout)
        assert isinstance(f.method, method_cls), f"expected {method_cls.NAME}, got {f.method!r}"
        return f

    def handshake(self, user="guest", password="guest", vhost="/", heartbeat=0, frame_max=None,
                  channel_max=None, capabilities=None):
        self.send(AMQP_HEADER)
        start = self.expect(spec.Connection.Start).method
        self.server_properties = start.server_properties
        caps = capabilities if capabilities is not None else {"authentication_failure_close": True}
        self.send_method(0, spec.Connection.StartOk(
            client_properties={"product": "mailroom-tests", "capabilities": caps},
            mechanism="PLAIN", response=f"\0{user}\0{password}", locale="en_US"))
        tune = self.expect(spec.Connection.Tune).method
        self.tune = tune
        fm = frame_max if frame_max is not None else tune.frame_max
        cm = channel_max if channel_max is not None else tune.channel_max
        self.send_method(0, spec.Connection.TuneOk(channel_max=cm, frame_max=fm, heartbeat=heartbeat))
        self.send_method(0, spec.Connection.Open(virtual_host=vhost))
        self.expect(spec.Connection.OpenOk)
        return self

    def open_channel(self, channel=1):
        self.send_method(channel, spec.Channel.Open())
        self.expect(spec.Channel.OpenOk)

    def expect_connection_close(self, code, timeout=5.0):
        """Read until connection.close; answer close-ok; check the code and that the socket closes."""
        while True:
            f = self.read_method(timeout)
            if isinstance(f.method, spec.Connection.Close):
                break
        self.send_method(0, spec.Connection.CloseOk())
        assert f.method.reply_code == code, f"expected connection.close {code}, got {f.method!r}"
        recv_until_closed(self.sock, timeout)
        return f.method

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
