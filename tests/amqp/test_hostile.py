"""Hostile and slow clients against the broker's memory: announced sizes never allocated, partial messages and
undelivered bytes counted by the memory alarm, a prefetch-0 consumer on a deep on-disk queue bounded by its
socket, a client that stops reading cut off after the write deadline, oversized messages refused with 406.

Most tests start their own Mailroom (they read its /proc/<pid>/status or need special flags); the raw-socket
client below speaks just enough AMQP 0-9-1 to misbehave on purpose.

Environment:
  HOSTILE_DEEP_QUEUE_MB   size of the deep-queue test's queue (default 128; the issue's figure is 1024)
  HOSTILE_MAX_OUTBOUND_BYTES  --max-outbound-bytes for that test (default 4 MiB; 0 = unbounded, to compare)
"""
import base64
import json
import os
import select
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pika
import pytest

from brokers import free_port, mailroom_bin, rabbitmq_broker, targets, _wait_listening

MIB = 1024 * 1024
FRAME_END = b"\xce"


# ---- a raw AMQP client ---------------------------------------------------------------------------------------

def shortstr(s):
    b = s.encode()
    return struct.pack("B", len(b)) + b


def longstr(b):
    return struct.pack(">I", len(b)) + b


def table(entries):
    out = b""
    for k, (kind, v) in entries.items():
        out += shortstr(k) + kind
        if kind == b"t":
            out += struct.pack("B", 1 if v else 0)
        elif kind == b"F":
            out += table(v)
        elif kind == b"S":
            out += longstr(v.encode())
    return longstr(out)


def frame(kind, channel, payload):
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + FRAME_END


def method(channel, class_id, method_id, args=b""):
    return frame(1, channel, struct.pack(">HH", class_id, method_id) + args)


class RawClient:
    """A blocking AMQP client over a plain socket: every frame is sent and read explicitly."""

    def __init__(self, host, port, rcvbuf=None, heartbeat=0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # Before connect, so the window the client advertises stays small.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect((host, port))
        self.buf = b""
        self.frame_max = 131072
        self._handshake(heartbeat)

    def send(self, data):
        self.sock.sendall(data)

    def read_frame(self, timeout=30):
        """The next frame as (type, channel, payload); None on EOF."""
        self.sock.settimeout(timeout)
        while True:
            if len(self.buf) >= 7:
                kind, channel, size = struct.unpack(">BHI", self.buf[:7])
                if len(self.buf) >= 8 + size:
                    payload = self.buf[7:7 + size]
                    assert self.buf[7 + size:8 + size] == FRAME_END, "frame end"
                    self.buf = self.buf[8 + size:]
                    return kind, channel, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def read_method(self, timeout=30):
        """The next method frame as (channel, class_id, method_id, args), skipping heartbeats."""
        while True:
            f = self.read_frame(timeout)
            if f is None:
                return None
            kind, channel, payload = f
            if kind == 1:
                class_id, method_id = struct.unpack(">HH", payload[:4])
                return channel, class_id, method_id, payload[4:]

    def expect(self, class_id, method_id, timeout=30):
        m = self.read_method(timeout)
        assert m is not None, f"connection closed while waiting for {class_id}.{method_id}"
        assert (m[1], m[2]) == (class_id, method_id), f"expected {class_id}.{method_id}, got {m}"
        return m

    def _handshake(self, heartbeat):
        self.send(b"AMQP\x00\x00\x09\x01")
        self.expect(10, 10)  # start
        props = table({"product": (b"S", "test_hostile"),
                       "capabilities": (b"F", {"connection.blocked": (b"t", True)})})
        self.send(method(0, 10, 11, props + shortstr("PLAIN") + longstr(b"\x00guest\x00guest") + shortstr("en_US")))
        _, _, _, args = self.expect(10, 30)  # tune
        channel_max, frame_max, _ = struct.unpack(">HIH", args[:8])
        self.frame_max = frame_max or 131072
        self.send(method(0, 10, 31, struct.pack(">HIH", channel_max, self.frame_max, heartbeat)))
        self.send(method(0, 10, 40, shortstr("/") + shortstr("") + b"\x00"))
        self.expect(10, 41)  # open-ok

    def open_channel(self, ch):
        self.send(method(ch, 20, 10, shortstr("")))
        self.expect(20, 11)

    def publish_start(self, ch, routing_key, announced):
        """basic.publish and a content header announcing `announced` body bytes (nothing of the body)."""
        self.send(method(ch, 60, 40, struct.pack(">H", 0) + shortstr("") + shortstr(routing_key) + b"\x00")
                  + frame(2, ch, struct.pack(">HHQH", 60, 0, announced, 0)))

    def body(self, ch, data):
        self.send(frame(3, ch, data))

    def qos(self, ch, prefetch):
        self.send(method(ch, 60, 10, struct.pack(">IHB", 0, prefetch, 0)))
        self.expect(60, 11)

    def consume(self, ch, queue, no_ack=False):
        self.send(method(ch, 60, 20, struct.pack(">H", 0) + shortstr(queue) + shortstr("")
                         + struct.pack("B", 2 if no_ack else 0) + table({})))
        self.expect(60, 21)

    def ack(self, ch, tag, multiple=False):
        self.send(method(ch, 60, 80, struct.pack(">QB", tag, 1 if multiple else 0)))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---- starting a Mailroom we can measure --------------------------------------------------------------------

class Server:
    def __init__(self, proc, port, http_port):
        self.proc, self.port, self.http_port = proc, port, http_port

    @property
    def pid(self):
        return self.proc.pid

    def status(self, field):
        """A /proc/<pid>/status figure in bytes (VmSize, VmRSS, VmHWM)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def api(self, verb, path):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=verb)
        req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            return json.loads(body) if body else None

    def node(self):
        return self.api("GET", "/api/nodes")[0]


@pytest.fixture
def server_factory():
    started = []
    tmp = tempfile.TemporaryDirectory(prefix="mailroom-hostile-")

    def start(*extra):
        port, http_port = free_port(), free_port()
        cmd = [mailroom_bin(), "server", "--amqp-listen", f"127.0.0.1:{port}",
               "--http-listen", f"127.0.0.1:{http_port}", "--prometheus-listen", f"127.0.0.1:{free_port()}",
               "--data-dir", os.path.join(tmp.name, str(len(started))), "--log-level", "warn", *extra]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        started.append(proc)
        _wait_listening(port, proc, 20)
        return Server(proc, port, http_port)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    tmp.cleanup()


def target_params():
    return [t for t in targets()]


# ---- (a) announced sizes are not allocated -----------------------------------------------------------------

CHANNELS = 50
ANNOUNCED = 16 * MIB


def announce_on_many_channels(client):
    for ch in range(1, CHANNELS + 1):
        client.open_channel(ch)
        client.publish_start(ch, "test_hostile.nowhere", ANNOUNCED)
        client.body(ch, b"x")
        client.body(ch, b"y")
    # A round trip on one more channel: everything above has been read and handled.
    client.open_channel(CHANNELS + 1)


@pytest.mark.parametrize("target", target_params())
def test_announced_body_size_is_not_allocated(target, server_factory):
    if target == "rabbitmq":
        b = rabbitmq_broker()
        client = RawClient(b.host, b.port)
        try:
            announce_on_many_channels(client)
            # RabbitMQ keeps the connection open and the partial messages pending.
            client.send(method(CHANNELS + 1, 20, 40, struct.pack(">H", 200) + shortstr("bye") + struct.pack(">HH", 0, 0)))
            client.expect(20, 41)
        finally:
            client.close()
        return
    server = server_factory()
    time.sleep(0.3)
    size0, rss0 = server.status("VmSize"), server.status("VmRSS")
    client = RawClient("127.0.0.1", server.port)
    try:
        announce_on_many_channels(client)
        size1, rss1 = server.status("VmSize"), server.status("VmRSS")
        grew_virtual, grew_resident = size1 - size0, rss1 - rss0
        print(f"VmSize +{grew_virtual / MIB:.1f} MiB, VmRSS +{grew_resident / MIB:.1f} MiB "
              f"for {CHANNELS} x {ANNOUNCED // MIB} MiB announced")
        # 800 MiB announced; a connection's buffers and a few tokio stacks are all that may appear.
        assert grew_virtual < 64 * MIB, f"VmSize grew by {grew_virtual / MIB:.1f} MiB"
        assert grew_resident < 16 * MIB, f"VmRSS grew by {grew_resident / MIB:.1f} MiB"
        # The two bytes per channel are what the node reports as partly received.
        assert server.node()["mem_clients"]["partial_messages"] == 2 * CHANNELS
    finally:
        client.close()
    deadline = time.monotonic() + 5
    while server.node()["mem_clients"]["partial_messages"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.node()["mem_clients"]["partial_messages"] == 0, "released with the connection"


# ---- (b) many channels with partial messages count toward the memory alarm ----------------------------------

def test_partial_messages_on_many_channels_raise_the_memory_alarm(server_factory):
    server = server_factory("--memory-high-watermark", str(16 * MIB))
    client = RawClient("127.0.0.1", server.port)
    channels, per_channel = 400, 64 * 1024
    try:
        rss0 = server.status("VmRSS")
        for ch in range(1, channels + 1):
            client.open_channel(ch)
        chunk = b"z" * per_channel
        client.sock.settimeout(5)
        sent = 0
        try:
            for ch in range(1, channels + 1):
                client.publish_start(ch, "test_hostile.nowhere", 1 * MIB)
                client.body(ch, chunk)
                sent += 1
        except socket.timeout:
            pass  # the broker stopped reading: the alarm blocked this publishing connection
        # More than the 16 MiB watermark in partial messages: this publishing connection is blocked.
        m = client.read_method(timeout=10)
        assert m is not None and (m[1], m[2]) == (10, 60), f"expected connection.blocked, got {m}"
        node = server.node()
        partial = node["mem_clients"]["partial_messages"]
        print(f"sent {sent} partial messages; the broker holds {partial / MIB:.1f} MiB of them")
        assert node["mem_alarm"] is True
        assert partial > 16 * MIB
        assert node["mem_used"] >= partial
        grew = server.status("VmRSS") - rss0
        print(f"{channels} channels, {partial / MIB:.1f} MiB partial: VmRSS +{grew / MIB:.1f} MiB")
        assert grew < 4 * partial + 32 * MIB, f"VmRSS grew by {grew / MIB:.1f} MiB"
        # A blocked connection is not read (as in RabbitMQ), so it cannot even hang up: the operator closes it.
        for c in server.api("GET", "/api/connections"):
            server.api("DELETE", "/api/connections/" + urllib.parse.quote(c["name"], safe=""))
    finally:
        client.close()
    # The connection is gone: its partial messages with it, and the alarm clears.
    deadline = time.monotonic() + 10
    while server.node()["mem_alarm"] and time.monotonic() < deadline:
        time.sleep(0.2)
    node = server.node()
    assert node["mem_alarm"] is False
    assert node["mem_clients"]["partial_messages"] == 0


# ---- (c) a message over --max-message-size ----------------------------------------------------------------

def test_message_over_max_message_size_closes_the_channel_with_406(server_factory):
    server = server_factory("--max-message-size", "1024")
    conn = pika.BlockingConnection(pika.URLParameters(server.url()))
    try:
        ch = conn.channel()
        ch.basic_publish("", "test_hostile.nowhere", b"a" * 1024)  # at the limit: fine
        ch.queue_declare("", exclusive=True)  # round trip: the channel is still open
        ch.basic_publish("", "test_hostile.nowhere", b"a" * 2048)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_declare("", exclusive=True)
        assert e.value.reply_code == 406
        # RabbitMQ's rabbit_channel:check_msg_size words (with a configured max_message_size).
        assert e.value.reply_text == "PRECONDITION_FAILED - message size 2048 is larger than configured max size 1024"
        # The connection lives on.
        conn.channel().queue_declare("", exclusive=True)
    finally:
        conn.close()


# ---- a client that stops reading ----------------------------------------------------------------------------

def fill_queue(url, queue, count, size, persistent=True):
    """Publishes `count` messages in transactions of 64: each commit waits for the batch's fsync, so a large
    fill goes at the store's pace instead of being refused for running ahead of it."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    ch.tx_select()
    body = os.urandom(size)
    props = pika.BasicProperties(delivery_mode=2 if persistent else 1)
    for i in range(count):
        ch.basic_publish("", queue, body, props)
        if i % 64 == 63:
            ch.tx_commit()
    ch.tx_commit()
    assert ch.queue_declare(queue, passive=True).method.message_count == count
    conn.close()


def queue_counts(url, queue):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ok = conn.channel().queue_declare(queue, passive=True)
        return ok.method.message_count, ok.method.consumer_count
    finally:
        conn.close()


@pytest.mark.timeout(90)
def test_client_that_stops_reading_is_closed_after_the_write_deadline(server_factory):
    server = server_factory("--write-deadline-ms", "2000")
    count, size = 400, 64 * 1024  # 25 MiB: more than the socket buffers and the outbound bound hold
    fill_queue(server.url(), "stalled", count, size)
    client = RawClient("127.0.0.1", server.port, rcvbuf=16 * 1024)
    client.open_channel(1)
    client.qos(1, 0)
    client.consume(1, "stalled")
    # From here on the client reads nothing.
    started = time.monotonic()
    deadline = started + 30
    counts = None
    while time.monotonic() < deadline:
        counts = queue_counts(server.url(), "stalled")
        if counts == (count, 0):
            break
        time.sleep(0.5)
    took = time.monotonic() - started
    print(f"stalled consumer dropped after {took:.1f} s; queue back to {counts}")
    assert counts == (count, 0), f"the stalled consumer's deliveries did not come back: {counts}"
    assert took >= 1.5, "closed before the write deadline"
    node = server.node()
    assert node["mem_clients"]["deliveries_in_flight"] == 0
    assert node["mem_clients"]["outbound_buffers"] == 0
    # The broker hung up: after what it had buffered, the client reads EOF (or a reset).
    got_eof = False
    end = time.monotonic() + 20
    try:
        while time.monotonic() < end:
            r, _, _ = select.select([client.sock], [], [], 1)
            if r and not client.sock.recv(1 << 20):
                got_eof = True
                break
    except ConnectionResetError:
        got_eof = True
    client.close()
    assert got_eof, "the broker kept the socket open"


# ---- a prefetch-0 consumer on a deep on-disk queue ----------------------------------------------------------

DEEP_QUEUE_MB = int(os.environ.get("HOSTILE_DEEP_QUEUE_MB", "128"))


@pytest.mark.timeout(60 + DEEP_QUEUE_MB)
def test_prefetch_0_consumer_on_a_deep_disk_queue_stays_bounded(server_factory):
    total_mb = DEEP_QUEUE_MB
    size = 64 * 1024
    count = total_mb * MIB // size
    # 0 (unbounded) shows what the bound prevents: the test then fails.
    bound = int(os.environ.get("HOSTILE_MAX_OUTBOUND_BYTES", str(4 * MIB)))
    # Bodies beyond 1 MiB per queue stay on disk.
    server = server_factory("--queue-memory-bytes", str(1 * MIB), "--max-outbound-bytes", str(bound))
    t0 = time.monotonic()
    fill_queue(server.url(), "deep", count, size)
    fill_s = time.monotonic() - t0
    time.sleep(1)
    rss0 = server.status("VmRSS")
    client = RawClient("127.0.0.1", server.port, rcvbuf=64 * 1024)
    client.open_channel(1)
    client.qos(1, 0)
    client.consume(1, "deep")
    received, peak, samples = 0, rss0, 0
    t1 = time.monotonic()
    last_sample = 0.0
    # Read slowly: 256 KiB per 20 ms at most (about 12 MiB/s), acking each message as it completes.
    while received < count:
        body_left = None
        f = client.read_frame(timeout=30)
        assert f is not None, f"connection closed after {received} messages"
        kind, _, payload = f
        if kind == 1 and payload[:4] == struct.pack(">HH", 60, 60):
            ctag_len = payload[4]
            tag = struct.unpack(">Q", payload[5 + ctag_len:13 + ctag_len])[0]
        elif kind == 2:
            body_left = struct.unpack(">Q", payload[4:12])[0]
            pending_tag, remaining = tag, body_left
        elif kind == 3:
            remaining -= len(payload)
            if remaining == 0:
                client.ack(1, pending_tag)
                received += 1
                if received % 4 == 0:
                    time.sleep(0.02)
        now = time.monotonic()
        if now - last_sample > 0.2:
            last_sample = now
            peak = max(peak, server.status("VmRSS"))
            samples += 1
    read_s = time.monotonic() - t1
    peak = max(peak, server.status("VmRSS"))
    client.close()
    grew = peak - rss0
    print(f"outbound bound {bound} B; deep queue: {count} x {size // 1024} KiB = {total_mb} MiB persistent, filled in {fill_s:.1f} s, "
          f"read in {read_s:.1f} s; broker VmRSS {rss0 / MIB:.1f} MiB before, peak {peak / MIB:.1f} MiB "
          f"(+{grew / MIB:.1f} MiB over {samples} samples), VmHWM {server.status('VmHWM') / MIB:.1f} MiB")
    # Outbound bound + what sits in socket buffers unacked + read-ahead + allocator slack; far below the queue.
    limit = 48 * MIB
    assert grew < limit, f"VmRSS grew by {grew / MIB:.1f} MiB reading a {total_mb} MiB queue"
