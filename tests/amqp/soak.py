"""The soak workload (issue 15): churn of connections, channels, consumers and permission denials against
one Mailroom for a bounded time, driven by asyncio (aiormq, and a hand-written client for abrupt closes).

Used by tests/amqp/test_soak.py; `python tests/amqp/soak.py` runs it alone against a Mailroom it starts
(MAILROOM_SOAK_SECONDS, default 150) and prints the figures as JSON.

Lanes, all running at once until the deadline:
  - churn:     connections (guest) that open 1-3 channels, each doing one thing (an exclusive queue filled
               and read, a publish burst to a work queue, a consume left unacked, a passive declare of a
               missing queue that closes the channel with 404), then closed; a fifth leave channels open.
  - abrupt:    hand-driven sockets reset (SO_LINGER 0) at random points: before the protocol header, after
               connection.start, or after a handshake, an exclusive queue, a consumer and half a message.
  - channels:  one connection per lane that opens and closes channels: an auto-delete queue bound to
               amq.topic, consumed, published to, cancelled (the queue goes with its last consumer).
  - publish:   work queues fed at a bounded rate (no confirms), and a durable queue with confirms.
  - consume:   consumers with a random prefetch that ack, nack-requeue or hold deliveries, then cancel
               while messages flow, or close their channel (or connection) with deliveries unacked.
  - deny:      a user limited to `soak.lim.*` (set through the HTTP API) that is refused (403) a declare,
               a publish, a consume and a bind, does allowed work in between, fails a login with a wrong
               password (403), opens a vhost it has no permission on (530), and a user limited to one
               channel that opens a second (530 connection close).
  - burst:     every BURST_EVERY_S, BURST_CONNS hand-driven connections opened at once, held for a moment,
               half closed with connection.close, half reset.
Any error a lane did not expect is recorded; the test fails on one.
"""
import asyncio
import base64
import json
import os
import random
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

import aiormq
import aiormq.exceptions as aex
import pika.frame
import pika.spec as pspec

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
WORK_QUEUES = [f"soak.work.{i}" for i in range(4)]
DURABLE_QUEUE = "soak.durable"
WORK_MAX_LENGTH = 2000  # bounds what the work queues hold when publishers outrun consumers
LIMITED_PREFIX = "soak.lim."
BURST_CONNS = int(os.environ.get("MAILROOM_SOAK_BURST", "400"))
BURST_EVERY_S = 30.0
PUBLISH_BATCH = 20
PUBLISH_PAUSE_S = 0.02  # per batch and publisher: at most ~1000 messages/s each
DENY_LANES = 2
OP_TIMEOUT_S = 30.0  # one AMQP round trip under load (a debug build on two shared cores)


@dataclass
class Stats:
    """What the lanes did, and what went wrong."""
    connections: int = 0  # AMQP connections opened (handshake completed), all lanes
    refused_connections: int = 0  # connection attempts refused on purpose (login, vhost)
    raw_sockets: int = 0  # hand-driven sockets, reset or closed at some point
    channels: int = 0
    published: int = 0
    confirmed: int = 0
    delivered: int = 0
    acked: int = 0
    requeued: int = 0
    consumers: int = 0
    cancels: int = 0
    closed_with_unacked: int = 0
    temp_queues: int = 0
    not_found: int = 0  # 404 channel closes caused on purpose
    denials: dict = field(default_factory=dict)  # kind -> count
    errors: list = field(default_factory=list)  # unexpected errors, "lane: repr"

    def deny(self, kind):
        self.denials[kind] = self.denials.get(kind, 0) + 1

    def error(self, lane, exc):
        if len(self.errors) < 200:
            self.errors.append(f"{lane}: {exc!r}")

    def figures(self):
        d = {k: v for k, v in self.__dict__.items() if k != "errors"}
        d["denials_total"] = sum(self.denials.values())
        d["errors"] = len(self.errors)
        return d


class Admin:
    """The HTTP API of the Mailroom under test (guest is its administrator from loopback)."""

    def __init__(self, http_port):
        self.base = f"http://127.0.0.1:{http_port}"

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
            return json.loads(text) if text and resp.headers.get_content_type() == "application/json" else text

    def metrics(self):
        """The unlabelled samples of /metrics, by name."""
        text = self.call("GET", "/metrics").decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    @staticmethod
    def q(name):
        return urllib.parse.quote(name, safe="")


@dataclass
class Target:
    """Where the workload goes: the AMQP port, the admin API, and the users the deny lane logs in as."""
    port: int
    admin: Admin
    limited_user: str = ""
    # One per deny lane: max-channels counts the channels of all the user's connections.
    one_channel_users: list = field(default_factory=list)
    closed_vhost: str = ""

    def url(self, user="guest", password="guest", vhost="/"):
        return (f"amqp://{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
                f"@127.0.0.1:{self.port}/{urllib.parse.quote(vhost, safe='')}")


def prepare(target):
    """Users, vhost and queues the lanes need (before the baseline is taken)."""
    a = target.admin
    tag = uuid.uuid4().hex[:6]
    target.limited_user = f"soak_lim_{tag}"
    target.one_channel_users = [f"soak_one_{i}_{tag}" for i in range(DENY_LANES)]
    target.closed_vhost = f"soak_closed_{tag}"
    a.call("PUT", f"/api/vhosts/{a.q(target.closed_vhost)}")
    for user in [target.limited_user] + target.one_channel_users:
        a.call("PUT", f"/api/users/{user}", {"password": "pw", "tags": ""})
    pattern = "^" + LIMITED_PREFIX.replace(".", r"\.")
    a.call("PUT", f"/api/permissions/%2F/{target.limited_user}",
           {"configure": pattern, "write": pattern, "read": pattern})
    for user in target.one_channel_users:
        a.call("PUT", f"/api/permissions/%2F/{user}", {"configure": ".*", "write": ".*", "read": ".*"})
        a.call("PUT", f"/api/user-limits/{user}/max-channels", {"value": 1})


async def declare_topology(target):
    conn = await aiormq.connect(target.url())
    ch = await conn.channel()
    for q in WORK_QUEUES:
        await ch.queue_declare(q, arguments={"x-max-length": WORK_MAX_LENGTH})
    await ch.queue_declare(DURABLE_QUEUE, durable=True, arguments={"x-max-length": WORK_MAX_LENGTH})
    await conn.close()


async def purge_all(target):
    conn = await aiormq.connect(target.url())
    ch = await conn.channel()
    for q in WORK_QUEUES + [DURABLE_QUEUE]:
        await ch.queue_purge(q)
    await conn.close()


# ---------------------------------------------------------------- hand-driven client

class RawClient:
    """A minimal AMQP client over asyncio streams, for closes no library makes (a reset mid-message)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        # A reset instead of a FIN when the transport is aborted.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return cls(reader, writer)

    def send_method(self, channel, method):
        self.writer.write(pika.frame.Method(channel, method).marshal())

    async def read_method(self):
        while True:
            hdr = await self.reader.readexactly(7)
            ftype, chan, size = struct.unpack(">BHI", hdr)
            rest = await self.reader.readexactly(size + 1)
            _, frame = pika.frame.decode_frame(hdr + rest)
            if isinstance(frame, pika.frame.Method):
                return frame.method

    async def expect(self, cls):
        m = await asyncio.wait_for(self.read_method(), OP_TIMEOUT_S)
        if not isinstance(m, cls):
            raise AssertionError(f"expected {cls.NAME}, got {m!r}")
        return m

    async def handshake(self, user="guest", password="guest", vhost="/", refused=None):
        """Logs in and opens `vhost`; with `refused` set, expects a connection.close with that reply code
        instead (at the login or at connection.open) and returns its text."""
        self.writer.write(AMQP_HEADER)
        await self.expect(pspec.Connection.Start)
        self.send_method(0, pspec.Connection.StartOk(
            client_properties={"product": "mailroom-soak", "capabilities": {"authentication_failure_close": True}},
            mechanism="PLAIN", response=f"\0{user}\0{password}", locale="en_US"))
        m = await asyncio.wait_for(self.read_method(), OP_TIMEOUT_S)
        if isinstance(m, pspec.Connection.Tune):
            self.send_method(0, pspec.Connection.TuneOk(channel_max=m.channel_max, frame_max=m.frame_max,
                                                        heartbeat=0))
            self.send_method(0, pspec.Connection.Open(virtual_host=vhost))
            m = await asyncio.wait_for(self.read_method(), OP_TIMEOUT_S)
        if refused is None:
            if not isinstance(m, pspec.Connection.OpenOk):
                raise AssertionError(f"expected connection.open-ok, got {m!r}")
            return None
        if not (isinstance(m, pspec.Connection.Close) and m.reply_code == refused):
            raise AssertionError(f"expected connection.close {refused}, got {m!r}")
        self.send_method(0, pspec.Connection.CloseOk())
        await self.writer.drain()
        if await asyncio.wait_for(self.reader.read(1), OP_TIMEOUT_S) != b"":
            raise AssertionError("the socket stayed open after connection.close-ok")
        return m.reply_text

    async def close_cleanly(self):
        self.send_method(0, pspec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
        await self.expect(pspec.Connection.CloseOk)
        self.writer.close()

    def reset(self):
        self.writer.transport.abort()


async def abrupt_once(target, stats):
    """One socket reset at a random point of a connection's life."""
    raw = await RawClient.open(target.port)
    stats.raw_sockets += 1
    try:
        point = random.choice(["accepted", "header", "handshake", "half-message"])
        if point == "accepted":
            return
        if point == "header":
            raw.writer.write(AMQP_HEADER)
            await raw.expect(pspec.Connection.Start)
            return
        await raw.handshake()
        stats.connections += 1
        if point == "handshake":
            return
        raw.send_method(1, pspec.Channel.Open())
        await raw.expect(pspec.Channel.OpenOk)
        stats.channels += 1
        raw.send_method(1, pspec.Queue.Declare(queue="", exclusive=True))
        ok = await raw.expect(pspec.Queue.DeclareOk)
        stats.temp_queues += 1
        raw.send_method(1, pspec.Basic.Consume(queue=WORK_QUEUES[0], consumer_tag="soak-raw"))
        await raw.expect(pspec.Basic.ConsumeOk)
        stats.consumers += 1
        # A message announced at 1 MiB, of which 1000 bytes arrive before the reset.
        raw.send_method(1, pspec.Basic.Publish(exchange="", routing_key=ok.queue))
        raw.writer.write(pika.frame.Header(1, 1 << 20, pspec.BasicProperties()).marshal())
        raw.writer.write(pika.frame.Body(1, b"x" * 1000).marshal())
        await raw.writer.drain()
    finally:
        raw.reset()


async def burst_once(target, stats, n):
    """n connections opened at once, held, then half closed cleanly and half reset."""
    sem = asyncio.Semaphore(100)

    async def one():
        async with sem:
            raw = await RawClient.open(target.port)
            stats.raw_sockets += 1
            try:
                await raw.handshake()
            except BaseException:
                raw.reset()
                raise
            stats.connections += 1
            return raw

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    opened = [r for r in results if isinstance(r, RawClient)]
    for r in results:
        if not isinstance(r, RawClient):
            stats.error("burst", r)
    await asyncio.sleep(1.0)
    closes = []
    for i, raw in enumerate(opened):
        if i % 2:
            raw.reset()
        else:
            closes.append(raw.close_cleanly())
    for r in await asyncio.gather(*closes, return_exceptions=True):
        if isinstance(r, BaseException):
            stats.error("burst-close", r)
    return len(opened)


# ---------------------------------------------------------------- lanes

def until(deadline):
    return time.monotonic() < deadline


async def lane(name, stats, deadline, body):
    """Runs `body()` until the deadline; an unexpected error is recorded and the lane goes on."""
    while until(deadline):
        try:
            await body()
        except Exception as e:  # noqa: BLE001 - every unexpected error is recorded and fails the test
            stats.error(name, e)
            await asyncio.sleep(0.1)


async def churn_once(target, stats):
    conn = await aiormq.connect(target.url())
    stats.connections += 1
    try:
        for _ in range(random.randint(1, 3)):
            ch = await conn.channel(publisher_confirms=random.random() < 0.5)
            stats.channels += 1
            op = random.choice(["temp", "publish", "consume", "missing"])
            if op == "temp":
                q = (await ch.queue_declare("", exclusive=True)).queue
                stats.temp_queues += 1
                for i in range(5):
                    await ch.basic_publish(b"t%d" % i, routing_key=q)
                    stats.published += 1
                for _ in range(3):
                    m = await ch.basic_get(q, no_ack=True, timeout=OP_TIMEOUT_S)
                    if isinstance(m.delivery, aiormq.spec.Basic.GetOk):
                        stats.delivered += 1
            elif op == "publish":
                for i in range(10):
                    await ch.basic_publish(b"c%d" % i, routing_key=random.choice(WORK_QUEUES))
                    stats.published += 1
            elif op == "consume":
                await ch.basic_qos(prefetch_count=5)

                async def held(msg):
                    stats.delivered += 1

                await ch.basic_consume(random.choice(WORK_QUEUES), held)
                stats.consumers += 1
                await asyncio.sleep(0.05)
                stats.closed_with_unacked += 1
            else:
                try:
                    await ch.queue_declare(f"soak.missing.{uuid.uuid4().hex[:8]}", passive=True,
                                           timeout=OP_TIMEOUT_S)
                    raise AssertionError("a passive declare of a missing queue succeeded")
                except aex.ChannelNotFoundEntity:
                    stats.not_found += 1
                continue
            if random.random() < 0.8:
                await ch.close()
    finally:
        await conn.close()


async def channel_lane(target, stats, deadline):
    while until(deadline):
        conn = await aiormq.connect(target.url())
        stats.connections += 1
        try:
            for _ in range(40):
                if not until(deadline):
                    break
                ch = await conn.channel(publisher_confirms=False)
                stats.channels += 1
                q = (await ch.queue_declare("", auto_delete=True)).queue
                stats.temp_queues += 1
                await ch.queue_bind(q, "amq.topic", routing_key="soak.#")

                async def on_msg(msg):
                    stats.delivered += 1

                tag = (await ch.basic_consume(q, on_msg, no_ack=True)).consumer_tag
                stats.consumers += 1
                for i in range(5):
                    await ch.basic_publish(b"topic %d" % i, exchange="amq.topic", routing_key=f"soak.k{i}")
                    stats.published += 1
                await asyncio.sleep(random.uniform(0, 0.05))
                await ch.basic_cancel(tag)  # the auto-delete queue goes with its only consumer
                stats.cancels += 1
                await ch.close()
        finally:
            await conn.close()


async def publish_lane(target, stats, deadline, durable):
    conn = await aiormq.connect(target.url())
    stats.connections += 1
    try:
        ch = await conn.channel(publisher_confirms=durable)
        stats.channels += 1
        props = aiormq.spec.Basic.Properties(delivery_mode=2) if durable else None
        n = 0
        while until(deadline):
            if durable:
                confirms = [ch.basic_publish(b"d%d" % (n + i), routing_key=DURABLE_QUEUE, properties=props)
                            for i in range(PUBLISH_BATCH)]
                for r in await asyncio.gather(*confirms):
                    if isinstance(r, aiormq.spec.Basic.Ack):
                        stats.confirmed += 1
                    else:
                        raise AssertionError(f"publish not confirmed: {r!r}")
            else:
                for i in range(PUBLISH_BATCH):
                    await ch.basic_publish(b"w%d" % (n + i), routing_key=WORK_QUEUES[(n + i) % len(WORK_QUEUES)])
            stats.published += PUBLISH_BATCH
            n += PUBLISH_BATCH
            await asyncio.sleep(PUBLISH_PAUSE_S)
    finally:
        await conn.close()


async def consume_lane(target, stats, deadline):
    conn = await aiormq.connect(target.url())
    stats.connections += 1
    try:
        while until(deadline):
            ch = await conn.channel(publisher_confirms=False)
            stats.channels += 1
            await ch.basic_qos(prefetch_count=random.choice([1, 10, 50, 200]))
            no_ack = random.random() < 0.25
            want = random.randint(5, 200)
            got = asyncio.Event()
            count = 0
            held = 0
            closing = False

            async def on_msg(msg):
                nonlocal count, held, closing
                count += 1
                stats.delivered += 1
                if count >= want:
                    got.set()
                if no_ack or closing:
                    return
                # No await between this check and the ack's frame being queued: an ack queued after
                # channel.close reaches a closed channel, which the broker (RabbitMQ too) answers with a
                # 504 connection close.
                r = random.random()
                try:
                    if r < 0.8:
                        await msg.channel.basic_ack(msg.delivery.delivery_tag)
                        stats.acked += 1
                    elif r < 0.9:
                        await msg.channel.basic_nack(msg.delivery.delivery_tag, requeue=True)
                        stats.requeued += 1
                    else:
                        held += 1
                except aex.ChannelInvalidStateError:
                    pass  # the channel closed under a delivery: its unacked messages are requeued

            queue = random.choice(WORK_QUEUES + [DURABLE_QUEUE])
            tag = (await ch.basic_consume(queue, on_msg, no_ack=no_ack)).consumer_tag
            stats.consumers += 1
            try:
                await asyncio.wait_for(got.wait(), timeout=random.uniform(0.2, 1.5))
            except asyncio.TimeoutError:
                pass
            end = random.random()
            if end < 0.6:
                await ch.basic_cancel(tag)  # while messages flow
                stats.cancels += 1
                await asyncio.sleep(0.01)
                closing = True
                await ch.close()
            elif end < 0.95:
                closing = True
                await ch.close()  # deliveries unacked: back to the queue
                stats.closed_with_unacked += 1
            else:
                closing = True
                await conn.close()  # the whole connection, with its unacked deliveries
                stats.closed_with_unacked += 1
                conn = await aiormq.connect(target.url())
                stats.connections += 1
    finally:
        await conn.close()


async def expect_channel_refusal(ch, action, stats, kind):
    try:
        await action(ch)
    except aex.ChannelAccessRefused:
        stats.deny(kind)
        return
    raise AssertionError(f"{kind}: not refused")


async def deny_once(target, stats, index):
    user = target.limited_user
    kind = random.choice(["ops", "ops", "login", "vhost", "channels"])
    if kind in ("login", "vhost"):
        raw = await RawClient.open(target.port)
        try:
            if kind == "login":
                await raw.handshake(user, "wrong", refused=403)
                stats.deny("login-403")
            else:
                text = await raw.handshake(user, "pw", target.closed_vhost, refused=530)
                if "refused for user" not in text:
                    raise AssertionError(f"530 for another reason: {text}")
                stats.deny("vhost-530")
            stats.refused_connections += 1
        finally:
            raw.writer.close()
        return
    if kind == "channels":
        raw = await RawClient.open(target.port)
        try:
            await raw.handshake(target.one_channel_users[index], "pw")
            stats.connections += 1
            raw.send_method(1, pspec.Channel.Open())
            await raw.expect(pspec.Channel.OpenOk)
            stats.channels += 1
            raw.send_method(2, pspec.Channel.Open())
            close = await raw.expect(pspec.Connection.Close)
            if close.reply_code != 530:
                raise AssertionError(f"a channel over max-channels: {close!r}")
            raw.send_method(0, pspec.Connection.CloseOk())
            stats.deny("max-channels-530")
        finally:
            raw.writer.close()
        return
    conn = await aiormq.connect(target.url(user, "pw"))
    stats.connections += 1
    try:
        own_q, own_x = f"{LIMITED_PREFIX}q", f"{LIMITED_PREFIX}x"
        for _ in range(4):
            ch = await conn.channel()
            stats.channels += 1
            op = random.choice(["declare", "publish", "consume", "bind", "allowed"])
            if op == "declare":
                await expect_channel_refusal(
                    ch, lambda c: c.queue_declare(f"soak.forbidden.{uuid.uuid4().hex[:6]}"), stats, "declare-403")
            elif op == "publish":
                await expect_channel_refusal(
                    ch, lambda c: c.basic_publish(b"no", exchange="amq.topic", routing_key="soak.x",
                                                  timeout=OP_TIMEOUT_S), stats, "publish-403")
            elif op == "consume":
                async def never(msg):
                    pass
                await expect_channel_refusal(ch, lambda c: c.basic_consume(WORK_QUEUES[0], never), stats,
                                             "consume-403")
            elif op == "bind":
                await ch.queue_declare(own_q)
                await expect_channel_refusal(ch, lambda c: c.queue_bind(own_q, "amq.topic", routing_key="#"),
                                             stats, "bind-403")
            else:
                await ch.exchange_declare(own_x, exchange_type="direct")
                await ch.queue_declare(own_q)
                await ch.queue_bind(own_q, own_x, routing_key="k")
                await ch.basic_publish(b"mine", exchange=own_x, routing_key="k")
                stats.published += 1
                m = await ch.basic_get(own_q, no_ack=True, timeout=OP_TIMEOUT_S)
                if isinstance(m.delivery, aiormq.spec.Basic.GetOk):
                    stats.delivered += 1
                await ch.queue_purge(own_q)
                await ch.close()
    finally:
        await conn.close()


async def run(target, seconds, stats=None, bursts=True):
    """Every lane for `seconds`; returns the Stats (errors included, not raised)."""
    stats = stats or Stats()
    deadline = time.monotonic() + seconds

    async def bursts_lane():
        nxt = time.monotonic() + min(BURST_EVERY_S / 2, seconds / 3)
        while until(deadline):
            await asyncio.sleep(max(0.0, min(nxt, deadline) - time.monotonic()))
            if not until(deadline):
                break
            try:
                await burst_once(target, stats, BURST_CONNS)
            except Exception as e:  # noqa: BLE001
                stats.error("burst", e)
            nxt += BURST_EVERY_S

    lanes = []
    for i in range(6):
        lanes.append(lane(f"churn{i}", stats, deadline, lambda: churn_once(target, stats)))
    for i in range(3):
        lanes.append(lane(f"abrupt{i}", stats, deadline, lambda: abrupt_once(target, stats)))
    for i in range(2):
        lanes.append(lane(f"channels{i}", stats, deadline, lambda: channel_lane(target, stats, deadline)))
    lanes.append(lane("publish", stats, deadline, lambda: publish_lane(target, stats, deadline, durable=False)))
    lanes.append(lane("publish-durable", stats, deadline, lambda: publish_lane(target, stats, deadline, durable=True)))
    for i in range(3):
        lanes.append(lane(f"consume{i}", stats, deadline, lambda: consume_lane(target, stats, deadline)))
    for i in range(DENY_LANES):
        lanes.append(lane(f"deny{i}", stats, deadline, lambda i=i: deny_once(target, stats, i)))
    if bursts:
        lanes.append(bursts_lane())
    await asyncio.gather(*lanes)
    return stats


def main():
    """Runs the soak alone (python tests/amqp/soak.py) and prints its figures."""
    sys.path.insert(0, os.path.dirname(__file__))
    import test_soak
    print(json.dumps(test_soak.soak(float(os.environ.get("MAILROOM_SOAK_SECONDS", "150"))), indent=2))


if __name__ == "__main__":
    main()
