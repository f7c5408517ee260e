"""Crash torture (issue 13, "never lose a confirmed message"): a mixed workload against Mailroom, a kill -9
at a random moment of each round, a restart on the same data dir, and an exact check of the invariant.

Workload of one round (all durable, persistent messages, publishers with confirms):
  - direct:  tt.direct --d--> tt.direct.q                      (consumer acks; FIFO)
  - fanout:  tt.fanout -----> tt.fan.a (acks; FIFO), tt.fan.b (rejects some to the DLQ; FIFO),
                              tt.fan.c (no consumer; FIFO)
  - topic:   tt.topic -order.*-> tt.top.orders (acks; FIFO), -*.eu-> tt.top.eu (rejects some to the DLQ;
             FIFO), -#-> tt.top.all (nacks some with requeue=true; not FIFO)
  - retry:   tt.retry --work--> tt.work; the consumer rejects each message twice (x-dead-letter to tt.retry
             key "wait" -> tt.wait, x-message-ttl 200 ms, dead-lettered back to tt.retry key "work"), then acks
  - delayed: tt.delayed (x-delayed-message, direct) with x-delay 0..300 ms --k--> tt.delayed.q (acks)
  - churn:   queues tt.churn.<round>.<i> declared, filled with confirmed messages, deleted, in a loop
  - DLQ:     tt.fan.b and tt.top.eu dead-letter to tt.dlx (fanout) -> tt.dlq (no consumer)

Every message has a unique message_id "<lane>.<round>.<seq>"; a copy is (message_id, home queue). A publish is
confirmed once pika's basic_publish returned on a confirm channel; consumer acks and rejects are fire-and-forget,
so they count as "settled" (the broker has applied them) only after a later round trip on the same channel.

Invariant, checked after each kill -9 and restart by draining every queue (basic.get, auto-ack):
  - every confirmed copy was acked by a consumer, or is found in its home queue, or (if the consumer rejected
    it) in tt.dlq, or (retry loop) in tt.work or tt.wait; otherwise it is a LOSS;
  - a copy whose ack was settled, or that the checker already drained, never comes back with the same x-death
    history (RESURRECTED). Duplicates are counted, not failed (at-least-once): an ack not settled at the kill;
    a dead-letter hop cut by the kill (Mailroom settles the source record once the copy it sent on is fsynced,
    so both may survive, and a TTL expiry may happen twice); a delayed message released less than
    DELAYED_RERELEASE_S before the kill (released again). See Totals.dup_kinds;
  - a copy is never found where it cannot be (MISPLACED), no unknown message appears (UNKNOWN);
  - FIFO queues (single publisher, nothing requeued) deliver and hold their copies in publish order (ORDER);
  - every exchange and queue of the topology exists after the restart, a churn queue whose declare-ok arrived
    (and whose delete was not sent) exists, one whose delete-ok arrived does not (DEFINITION);
  - the workload itself sees no error before the kill (ERROR).
"""
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import pika
import pika.exceptions as pex

# Topology.
EX_DIRECT, Q_DIRECT = "tt.direct", "tt.direct.q"
EX_FANOUT, Q_FAN_A, Q_FAN_B, Q_FAN_C = "tt.fanout", "tt.fan.a", "tt.fan.b", "tt.fan.c"
EX_TOPIC, Q_ORDERS, Q_EU, Q_ALL = "tt.topic", "tt.top.orders", "tt.top.eu", "tt.top.all"
EX_RETRY, Q_WORK, Q_WAIT = "tt.retry", "tt.work", "tt.wait"
EX_DELAYED, Q_DELAYED = "tt.delayed", "tt.delayed.q"
EX_DLX, Q_DLQ = "tt.dlx", "tt.dlq"
CHURN_PREFIX = "tt.churn."

RETRY_TTL_MS = 200  # short, so messages are in tt.wait (due or not) at every kill
RETRIES = 2  # rejections of a tt.work message before the consumer acks it
MAX_DELAY_MS = 300
PREFETCH = 20
SYNC_INTERVAL_S = 0.05  # how often the consumer settles its acks with a round trip per channel
# Mailroom forgets released delayed messages up to SETTLE_FLUSH (1 s, crates/mailroom-broker/src/delayed.rs)
# after their release: a kill within that window releases them again, a duplicate by design. Margin added.
DELAYED_RERELEASE_S = 2.0
SETTLE_S = 3.0  # after a restart, how long the checker waits for due TTL/delayed messages to show up
CHURN_MESSAGES = 3

# Routing key -> queues it reaches through tt.topic (bindings order.*, *.eu, #).
TOPIC_ROUTES = {
    "order.eu": (Q_ORDERS, Q_EU, Q_ALL),
    "order.us": (Q_ORDERS, Q_ALL),
    "invoice.eu": (Q_EU, Q_ALL),
    "misc.a.b": (Q_ALL,),
}
DLX_QUEUES = {Q_FAN_B, Q_EU}  # queues whose rejected messages go to tt.dlq
FIFO_QUEUES = {Q_DIRECT, Q_FAN_A, Q_FAN_B, Q_FAN_C, Q_ORDERS, Q_EU}
# What the consumer does with a delivery, per queue: (ack share, reject share, requeue share).
CONSUMED = {
    Q_DIRECT: (1.0, 0.0, 0.0),
    Q_FAN_A: (1.0, 0.0, 0.0),
    Q_FAN_B: (0.75, 0.25, 0.0),
    Q_ORDERS: (1.0, 0.0, 0.0),
    Q_EU: (0.75, 0.25, 0.0),
    Q_ALL: (0.8, 0.0, 0.2),
    Q_WORK: None,  # rejects RETRIES times, then acks
    Q_DELAYED: (1.0, 0.0, 0.0),
}
# Drain order: tt.wait before tt.work (a message only moves wait -> work while nothing consumes tt.work).
DRAIN_ORDER = [Q_DIRECT, Q_FAN_A, Q_FAN_B, Q_FAN_C, Q_ORDERS, Q_EU, Q_ALL, Q_WAIT, Q_WORK, Q_DELAYED, Q_DLQ]
EXCHANGES = [EX_DIRECT, EX_FANOUT, EX_TOPIC, EX_RETRY, EX_DELAYED, EX_DLX]

NONE, UNSETTLED, SETTLED = 0, 1, 2


def declare_topology(ch):
    """Declares every exchange, queue and binding (idempotent; run at the start of each round)."""
    ch.exchange_declare(EX_DIRECT, "direct", durable=True)
    ch.exchange_declare(EX_FANOUT, "fanout", durable=True)
    ch.exchange_declare(EX_TOPIC, "topic", durable=True)
    ch.exchange_declare(EX_RETRY, "direct", durable=True)
    ch.exchange_declare(EX_DELAYED, "x-delayed-message", durable=True, arguments={"x-delayed-type": "direct"})
    ch.exchange_declare(EX_DLX, "fanout", durable=True)
    dlx = {"x-dead-letter-exchange": EX_DLX}
    for q, args in [(Q_DIRECT, None), (Q_FAN_A, None), (Q_FAN_B, dlx), (Q_FAN_C, None), (Q_ORDERS, None),
                    (Q_EU, dlx), (Q_ALL, None), (Q_DELAYED, None), (Q_DLQ, None),
                    (Q_WORK, {"x-dead-letter-exchange": EX_RETRY, "x-dead-letter-routing-key": "wait"}),
                    (Q_WAIT, {"x-message-ttl": RETRY_TTL_MS, "x-dead-letter-exchange": EX_RETRY,
                              "x-dead-letter-routing-key": "work"})]:
        ch.queue_declare(q, durable=True, arguments=args)
    ch.queue_bind(Q_DIRECT, EX_DIRECT, "d")
    for q in (Q_FAN_A, Q_FAN_B, Q_FAN_C):
        ch.queue_bind(q, EX_FANOUT, "")
    ch.queue_bind(Q_ORDERS, EX_TOPIC, "order.*")
    ch.queue_bind(Q_EU, EX_TOPIC, "*.eu")
    ch.queue_bind(Q_ALL, EX_TOPIC, "#")
    ch.queue_bind(Q_WORK, EX_RETRY, "work")
    ch.queue_bind(Q_WAIT, EX_RETRY, "wait")
    ch.queue_bind(Q_DELAYED, EX_DELAYED, "k")
    ch.queue_bind(Q_DLQ, EX_DLX, "")


def parse_mid(mid):
    """'<lane>.<round>.<seq>' -> (lane, round, seq); None if it is not one of ours."""
    try:
        lane, rnd, seq = mid.split(".")
        return lane, int(rnd), int(seq)
    except (AttributeError, ValueError):
        return None


def rejected_count(props, queue):
    """How often the message was rejected from `queue` (its x-death entry), 0 if never."""
    for d in (props.headers or {}).get("x-death", []) or []:
        if d.get("queue") == queue and d.get("reason") == "rejected":
            return int(d.get("count", 0))
    return 0


def hops(props):
    """How many dead-letter hops the message made (the sum of its x-death counts): each copy left behind by a hop
    that a kill cut short has fewer than the copy that went on."""
    return sum(int(d.get("count", 0)) for d in (props.headers or {}).get("x-death", []) or [])


def by_expiry(props):
    """Whether the message's last dead-letter hop was a TTL expiry (timer-driven, so redone after a restart)."""
    deaths = (props.headers or {}).get("x-death") or []
    return bool(deaths) and deaths[0].get("reason") == "expired"


def home_of(queue, props):
    """The home queue of a copy found in `queue`: the DLQ holds copies of the queue named by x-death; the retry
    loop's copies belong to tt.work."""
    if queue == Q_DLQ:
        deaths = (props.headers or {}).get("x-death") or []
        return deaths[0].get("queue") if deaths else None
    if queue == Q_WAIT:
        return Q_WORK
    return queue


# A lane: (seq, rng) -> (exchange, routing key, home queues, headers).
def _lane_direct(seq, rng):
    return EX_DIRECT, "d", (Q_DIRECT,), None


def _lane_fanout(seq, rng):
    return EX_FANOUT, "", (Q_FAN_A, Q_FAN_B, Q_FAN_C), None


def _lane_topic(seq, rng):
    key = rng.choice(sorted(TOPIC_ROUTES))
    return EX_TOPIC, key, TOPIC_ROUTES[key], None


def _lane_retry(seq, rng):
    return EX_RETRY, "work", (Q_WORK,), None


def _lane_delayed(seq, rng):
    return EX_DELAYED, "k", (Q_DELAYED,), {"x-delay": rng.randint(0, MAX_DELAY_MS)}


LANES = {"direct": _lane_direct, "fanout": _lane_fanout, "topic": _lane_topic, "retry": _lane_retry,
         "delayed": _lane_delayed}


@dataclass
class Copy:
    """What the harness knows about one copy (message_id, home queue). A broker lifetime is the number of kills
    before it: round r runs in lifetime r, the check after kill r in lifetime r + 1."""
    confirmed: bool = False
    acked: int = NONE  # by a consumer
    rejected: int = NONE  # by a consumer, requeue=false
    ack_life: int = -1  # lifetime in which the consumer acked it
    settled_life: int = -1  # lifetime in which the ack or reject was settled
    drained: bool = False  # taken by the checker (auto-ack get, then a round trip)
    drained_life: int = -1
    drained_queue: str = ""
    hops: set = field(default_factory=set)  # dead-letter hop counts of the incarnations acked or drained
    due: float = 0.0  # delayed copies: upper bound of the last release (due time, consumer delivery, re-release)
    lost: bool = False  # already reported as a loss
    exempt: bool = False  # its (churn) queue was deleted
    consumer_life: int = -1  # delayed copies: the lifetime of the last delivery to the consumer
    rerelease_life: int = -1  # delayed copies: the lifetime in which one was released again
    undone: bool = False  # a settled reject came back (already counted as a duplicate)


@dataclass
class Totals:
    """Counters over the whole run; `violations` holds one line per broken invariant."""
    rounds: int = 0
    published: int = 0
    confirmed: int = 0
    confirmed_copies: int = 0
    consumer_acks: int = 0
    rejects: int = 0
    requeues: int = 0
    drained: int = 0
    duplicates: int = 0
    # Kinds of duplicates (all allowed; a crash mid-hop copies rather than loses):
    #   lost_ack: acked but not settled before the kill; reject_undone: a settled reject to the DLQ came back to
    #   its queue; two_places: in two queues after a restart (dead-letter or retry hop cut by the kill);
    #   hop_replayed: an older incarnation (fewer x-death hops) than one already acked or drained came back;
    #   expiry_redone: the same incarnation again, made by a TTL expiry that the kill made happen twice;
    #   delayed_rerelease: a delayed message released less than DELAYED_RERELEASE_S before the kill.
    dup_kinds: dict = field(default_factory=lambda: {k: 0 for k in (
        "lost_ack", "reject_undone", "two_places", "hop_replayed", "expiry_redone", "delayed_rerelease")})
    losses: int = 0
    counts: dict = field(default_factory=lambda: {k: 0 for k in (
        "lost", "resurrected", "misplaced", "unknown", "order", "definition", "error")})
    violations: list = field(default_factory=list)


class _Publisher:
    """One publisher thread: its own connection and confirm channel; records what it sent and what got confirmed."""

    def __init__(self, params, lane, rnd, rng, body_rng):
        self.params, self.lane, self.rnd, self.rng, self.body_rng = params, lane, rnd, rng, body_rng
        self.sent = []  # (mid, homes, due), in publish order
        self.confirmed = set()
        self.nacked = 0
        self.error = None

    def run(self, stop, killed):
        try:
            conn = pika.BlockingConnection(self.params)
            ch = conn.channel()
            ch.confirm_delivery()
            seq = 0
            while not stop.is_set():
                ex, key, homes, headers = LANES[self.lane](seq, self.rng)
                mid = f"{self.lane}.{self.rnd}.{seq}"
                body = mid.encode() + b"." * self.body_rng.randint(0, 512)
                props = pika.BasicProperties(delivery_mode=2, message_id=mid, headers=headers)
                due = time.monotonic() + headers["x-delay"] / 1000 if headers else 0.0
                self.sent.append((mid, homes, due))
                try:
                    ch.basic_publish(ex, key, body, properties=props)
                    self.confirmed.add(mid)
                except pex.NackError:
                    self.nacked += 1
                seq += 1
        except Exception as e:  # noqa: BLE001 - expected once the broker is killed
            if not killed.is_set():
                self.error = f"publisher {self.lane}: {e!r}"


class _Churn:
    """Declares a queue, publishes a few confirmed messages to it, deletes it; again until stopped."""

    def __init__(self, params, rnd):
        self.params, self.rnd = params, rnd
        self.queues = {}  # name -> 'declare-sent' | 'declared' | 'delete-sent' | 'deleted'
        self.sent = []
        self.confirmed = set()
        self.error = None

    def run(self, stop, killed):
        try:
            conn = pika.BlockingConnection(self.params)
            ch = conn.channel()
            ch.confirm_delivery()
            i = 0
            while not stop.is_set():
                name = f"{CHURN_PREFIX}{self.rnd}.{i}"
                self.queues[name] = "declare-sent"
                ch.queue_declare(name, durable=True)
                self.queues[name] = "declared"
                for j in range(CHURN_MESSAGES):
                    mid = f"churn.{self.rnd}.{i * CHURN_MESSAGES + j}"
                    self.sent.append((mid, (name,), 0.0))
                    ch.basic_publish("", name, mid.encode(),
                                     properties=pika.BasicProperties(delivery_mode=2, message_id=mid))
                    self.confirmed.add(mid)
                time.sleep(0.01)
                self.queues[name] = "delete-sent"
                ch.queue_delete(name)
                self.queues[name] = "deleted"
                i += 1
        except Exception as e:  # noqa: BLE001 - expected once the broker is killed
            if not killed.is_set():
                self.error = f"churn: {e!r}"


class _Consumer:
    """One connection, a channel per consumed queue; logs deliveries, acks, rejects, requeues and settlements
    (in order) for the main thread to replay against the ledger."""

    def __init__(self, params, rng):
        self.params, self.rng = params, rng
        self.events = []
        self.error = None

    def _decide(self, queue, props):
        if queue == Q_WORK:
            return "reject" if rejected_count(props, Q_WORK) < RETRIES else "ack"
        ack, reject, _ = CONSUMED[queue]
        x = self.rng.random()
        return "ack" if x < ack else "reject" if x < ack + reject else "requeue"

    def run(self, stop, killed):
        try:
            conn = pika.BlockingConnection(self.params)
            chans = []
            for q in CONSUMED:
                ch = conn.channel()
                ch.basic_qos(prefetch_count=PREFETCH)
                pending = []

                def on_message(ch, method, props, body, q=q, pending=pending):
                    key = (props.message_id, home_of(q, props))
                    self.events.append(("deliver", q, key, hops(props), by_expiry(props), time.monotonic()))
                    action = self._decide(q, props)
                    # Recorded before the call: pika writes the frame and may then raise on the kill (its
                    # flush finds the socket gone) although the broker already applied it. An ack or reject
                    # recorded but never applied is allowed for (the message comes back), one applied but
                    # unrecorded would read as a loss.
                    self.events.append((action, key, hops(props)))
                    if action == "ack":
                        ch.basic_ack(method.delivery_tag)
                    elif action == "reject":
                        ch.basic_reject(method.delivery_tag, requeue=False)
                    else:
                        ch.basic_nack(method.delivery_tag, requeue=True)
                    if action != "requeue":
                        pending.append((action, key))

                ch.basic_consume(q, on_message)
                chans.append((ch, q, pending))
            while not stop.is_set():
                conn.process_data_events(time_limit=SYNC_INTERVAL_S)
                for ch, q, pending in chans:
                    if pending:
                        batch = list(pending)
                        pending.clear()
                        ch.queue_declare(q, passive=True)  # a round trip: the broker applied the batch
                        self.events.append(("settled", batch))
        except Exception as e:  # noqa: BLE001 - expected once the broker is killed
            if not killed.is_set():
                self.error = f"consumer: {e!r}"


class Torture:
    """Runs `rounds` kill -9 rounds against a KillableMailroom (spawn(), params()) and checks the invariant after
    each restart. run() returns the Totals; log receives one line per round and per violation."""

    def __init__(self, killable, seed, rounds, round_s, keep_going=False, log=print):
        self.killable, self.seed, self.rounds, self.round_s = killable, seed, rounds, round_s
        self.keep_going, self.log = keep_going, log
        self.rng = random.Random(seed)
        self.t = Totals()
        self.ledger = {}  # (mid, home) -> Copy, for the current and the previous round
        self.late_ok = set()  # unconfirmed, never-seen copies of pruned rounds: may still show up once
        self.churn = {}  # round -> {queue name: state}
        self.rnd = 0  # the round being run or checked (for messages)
        self.life = 0  # the broker lifetime (kills so far)
        self.kill_times = {}  # lifetime -> monotonic time of the kill that ended it
        self.pruned_below = 0  # copies of rounds below this were dropped from the ledger

    # ---- invariant bookkeeping ----
    def violation(self, kind, msg):
        self.t.counts[kind] += 1
        line = f"{kind.upper()} seed={self.seed} round={self.rnd}: {msg}"
        self.t.violations.append(line)
        if len([v for v in self.t.violations if v.startswith(kind.upper())]) <= 20:
            self.log(line)

    def _allowed(self, key, c, queue):
        mid, home = key
        if queue == home:
            return True
        if home == Q_WORK and queue == Q_WAIT:
            return True
        return queue == Q_DLQ and home in DLX_QUEUES and c.rejected != NONE

    def _dup(self, kind):
        self.t.duplicates += 1
        self.t.dup_kinds[kind] += 1

    def seen(self, queue, key, via, nhops, expired, at):
        """A copy showed up in `queue` (delivered to the consumer, or drained by the checker) at monotonic time
        `at` in lifetime self.life, after `nhops` dead-letter hops, the last one a TTL expiry if `expired`."""
        mid, home = key
        c = self.ledger.get(key)
        if c is None:
            if key in self.late_ok:
                self.late_ok.discard(key)
                return
            parsed = parse_mid(mid)
            if parsed is not None and parsed[1] < self.pruned_below:
                self.violation("resurrected", f"{mid} (home {home}) in {queue} via {via}: its round {parsed[1]} "
                                              "was settled and checked twice already")
            else:
                self.violation("unknown", f"message_id {mid!r} (home {home}) in {queue} via {via}")
            return
        if not self._allowed(key, c, queue):
            self.violation("misplaced", f"{mid} (home {home}, rejected={c.rejected}) found in {queue} via {via}")
        if c.lost:
            self.log(f"note seed={self.seed} round={self.rnd}: {mid} (home {home}), reported lost, showed up in "
                     f"{queue} via {via}")
        if c.drained or c.acked == SETTLED:
            life = c.drained_life if c.drained else c.settled_life
            why = (f"drained from {c.drained_queue} by the check in lifetime {life}" if c.drained
                   else f"its ack was settled in lifetime {life}")
            if nhops not in c.hops:
                # Another incarnation than the one consumed: a dead-letter hop (reject to the DLQ, tt.work ->
                # tt.wait -> tt.work) leaves its source record until the copy it sent on is fsynced, so a kill in
                # between keeps both (a duplicate by design, not a consumed message coming back).
                self._dup("hop_replayed" if nhops < max(c.hops) else "two_places")
            elif c.drained and life == self.life and via == "drain" and queue != c.drained_queue:
                if not c.undone:
                    self._dup("two_places")
            elif expired:
                # The same incarnation again, made by a TTL expiry: the expired record stays in tt.wait until the
                # copy it sent on is fsynced; a kill in between expires it again at the restart.
                self._dup("expiry_redone")
            elif (home == Q_DELAYED and c.rerelease_life < self.life and self.life - 1 in self.kill_times
                  and (c.due <= self.kill_times[self.life - 1] or c.consumer_life == self.life - 1)
                  and self.kill_times[self.life - 1] - c.due < DELAYED_RERELEASE_S):
                # Released shortly before the last kill: released again at the restart (once per restart).
                self._dup("delayed_rerelease")
                c.rerelease_life, c.due = self.life, at  # released again at the restart, before `at`
            else:
                extra = ""
                if home == Q_DELAYED and self.life - 1 in self.kill_times:
                    extra = (f"; last release bound {c.due - self.kill_times[self.life - 1]:+.3f} s from the kill "
                             f"ending lifetime {self.life - 1}")
                self.violation("resurrected", f"{mid} (home {home}) in {queue} via {via} in lifetime {self.life} "
                                              f"after {nhops} hops: {why} (consumed after {sorted(c.hops)} hops)"
                                              f"{extra}")
        elif c.rejected == SETTLED and home in DLX_QUEUES and queue == home:
            c.undone = True
            self._dup("reject_undone")
        elif c.acked == UNSETTLED and c.ack_life < self.life:
            self._dup("lost_ack")
        elif c.acked == UNSETTLED:
            self.violation("resurrected", f"{mid} (home {home}) delivered again in {queue} via {via} after its ack "
                                          "in the same broker lifetime")
        if home == Q_DELAYED and via == "consumer":
            # Released by then at the latest (a slow timer releases after the due time), and before this
            # lifetime's kill (pika may hand over a delivery read before the kill just after it). A drain comes
            # after a restart: it says nothing about the release before the kill.
            c.due, c.consumer_life = max(c.due, at), self.life

    def _merge_published(self, rnd, recs):
        for rec in recs:
            self.t.published += len(rec.sent)
            for mid, homes, due in rec.sent:
                ok = mid in rec.confirmed
                if ok:
                    self.t.confirmed += 1
                    self.t.confirmed_copies += len(homes)
                for home in homes:
                    self.ledger[(mid, home)] = Copy(confirmed=ok, due=due)

    def _replay_consumer(self, rnd, events):
        last = {}
        for ev in events:
            kind = ev[0]
            if kind == "deliver":
                _, q, key, nhops, expired, at = ev
                self.seen(q, key, "consumer", nhops, expired, at)
                if q in FIFO_QUEUES:
                    parsed = parse_mid(key[0])
                    pos = parsed[1:] if parsed else None
                    if pos is not None and q in last and pos <= last[q]:
                        self.violation("order", f"{q}: consumer got {key[0]} after {last[q]}")
                    last[q] = pos
                continue
            if kind == "settled":
                for action, key in ev[1]:
                    c = self.ledger.get(key)
                    if c is not None and action == "ack" and c.acked == UNSETTLED:
                        c.acked, c.settled_life = SETTLED, self.life
                    elif c is not None and action == "reject" and c.rejected == UNSETTLED:
                        c.rejected, c.settled_life = SETTLED, self.life
                continue
            key = ev[1]
            c = self.ledger.get(key)
            if c is None:
                continue  # already reported by seen()
            if kind == "ack":
                self.t.consumer_acks += 1
                c.acked = max(c.acked, UNSETTLED)
                c.ack_life = self.life
                c.hops.add(ev[2])
            elif kind == "reject":
                self.t.rejects += 1
                c.rejected = max(c.rejected, UNSETTLED)
            else:
                self.t.requeues += 1

    # ---- one round ----
    def _round(self, rnd, proc):
        params = self.killable.params()
        conn = pika.BlockingConnection(params)
        declare_topology(conn.channel())
        conn.close()
        seed = self.rng.getrandbits(32)
        kill_at = random.Random(seed).uniform(0.2, self.round_s)
        pubs = [_Publisher(params, lane, rnd, random.Random(seed + i), random.Random(seed - i))
                for i, lane in enumerate(LANES)]
        churn = _Churn(params, rnd)
        consumer = _Consumer(params, random.Random(seed + 100))
        stop, killed = threading.Event(), threading.Event()
        workers = pubs + [churn, consumer]
        threads = [threading.Thread(target=w.run, args=(stop, killed), daemon=True) for w in workers]
        for th in threads:
            th.start()
        time.sleep(kill_at)
        killed.set()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Taken once the broker is gone: under load it runs a few ms past the moment the signal is decided,
        # and may release a delayed message in that time (read as a resurrection when this was taken first).
        self.kill_times[rnd] = time.monotonic()
        stop.set()
        for th in threads:
            th.join(timeout=15)
        self.rnd, self.life = rnd, rnd
        for w, th in zip(workers, threads):
            if th.is_alive():
                self.violation("error", f"{type(w).__name__} still running 15 s after the kill")
            elif w.error:
                self.violation("error", f"before the kill at {kill_at:.2f} s: {w.error}")
        self._merge_published(rnd, pubs + [churn])
        self.churn[rnd] = dict(churn.queues)
        self._replay_consumer(rnd, consumer.events)
        return kill_at, sum(len(p.confirmed) for p in pubs) + len(churn.confirmed)

    # ---- the check after a restart ----
    def _drain(self, ch, queue, last):
        n = 0
        while True:
            m, props, _ = ch.basic_get(queue, auto_ack=True)
            if m is None:
                return n
            n += 1
            key = (props.message_id, home_of(queue, props))
            nhops = hops(props)
            self.seen(queue, key, "drain", nhops, by_expiry(props), time.monotonic())
            c = self.ledger.get(key)
            if c is not None:
                c.drained, c.drained_life, c.drained_queue = True, self.life, queue
                c.hops.add(nhops)
            self.t.drained += 1
            if queue in FIFO_QUEUES or queue.startswith(CHURN_PREFIX):
                parsed = parse_mid(key[0])
                pos = parsed[1:] if parsed else None
                if pos is not None and queue in last and pos <= last[queue]:
                    self.violation("order", f"{queue}: drained {key[0]} after {last[queue]}")
                last[queue] = pos

    def _open(self):
        """Keys of confirmed copies not yet accounted for (acked, drained, exempt or already reported)."""
        return [k for k, c in self.ledger.items()
                if c.confirmed and not c.drained and c.acked == NONE and not c.exempt and not c.lost]

    def _check(self, rnd):
        self.rnd, self.life = rnd, rnd + 1
        conn = pika.BlockingConnection(self.killable.params())
        ch = conn.channel()

        def exists(declare):
            nonlocal ch
            try:
                declare(ch)
                return True
            except pex.ChannelClosedByBroker as e:
                if e.reply_code != 404:
                    raise
                ch = conn.channel()
                return False

        for ex in EXCHANGES:
            if not exists(lambda c, ex=ex: c.exchange_declare(ex, passive=True)):
                self.violation("definition", f"exchange {ex} missing after the restart")
        for q in DRAIN_ORDER:
            if not exists(lambda c, q=q: c.queue_declare(q, passive=True)):
                self.violation("definition", f"queue {q} missing after the restart")
        last = {}
        gone = set()
        churn = self.churn.pop(rnd, {})
        for name, state in sorted(churn.items()):
            present = exists(lambda c, name=name: c.queue_declare(name, passive=True))
            if state == "deleted" and present:
                self.violation("definition", f"churn queue {name} is back after its delete-ok")
            if state == "declared" and not present:
                self.violation("definition", f"churn queue {name} lost after its declare-ok")
            if present:
                self._drain(ch, name, last)
                ch.queue_delete(name)
            if state != "declared":
                gone.add(name)  # deleted, or its delete was in flight: its copies may be gone
        for key, c in self.ledger.items():
            if key[1] in gone:
                c.exempt = True
        deadline = time.monotonic() + SETTLE_S
        while True:
            for q in DRAIN_ORDER:
                if exists(lambda c, q=q: c.queue_declare(q, passive=True)):
                    self._drain(ch, q, last)
            open_keys = self._open()
            if not open_keys or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        ch.queue_declare(Q_DLQ, passive=True)  # a round trip: the drains' auto-acks were applied
        conn.close()
        if open_keys:
            by_home = {}
            for key in open_keys:
                self.ledger[key].lost = True
                by_home.setdefault(key[1], []).append(key[0])
            self.t.losses += len(open_keys)
            for home, mids in sorted(by_home.items()):
                c0 = self.ledger[(mids[0], home)]
                extra = f", churn queue {churn[home]} at the kill" if home in churn else ""
                self.violation("lost", f"{len(mids)} confirmed copies missing from {home} (and its DLQ/retry "
                                       f"queues) after the restart, e.g. {mids[:5]} (rejected={c0.rejected}, "
                                       f"acked={c0.acked}{extra})")
        # Prune the round before: its copies have been through two checks (delayed ones released recently may
        # still be released again after the next kill: kept a while longer).
        now = time.monotonic()
        for key in [k for k, c in self.ledger.items()
                    if (parse_mid(k[0]) or ("", rnd, 0))[1] < rnd
                    and not (k[1] == Q_DELAYED and now - c.due < 3 * DELAYED_RERELEASE_S)]:
            c = self.ledger.pop(key)
            if (not c.confirmed or c.lost) and not c.drained:
                self.late_ok.add(key)  # unconfirmed (or reported lost): may still show up, once
        self.pruned_below = rnd

    def run(self):
        """All rounds; returns the Totals. Stops after the first round with a violation unless keep_going."""
        start = time.monotonic()
        pika_log = logging.getLogger("pika")
        pika_level = pika_log.level
        pika_log.setLevel(logging.CRITICAL)  # every kill makes pika log connection-lost errors
        proc = self.killable.spawn()
        try:
            for rnd in range(self.rounds):
                before = (self.t.losses, len(self.t.violations), self.t.duplicates)
                kill_at, confirmed = self._round(rnd, proc)
                proc = self.killable.spawn()
                self._check(rnd)
                self.t.rounds += 1
                self.log(f"round {rnd}: kill at {kill_at:.2f} s, {confirmed} messages confirmed, "
                         f"{self.t.duplicates - before[2]} duplicates, {self.t.losses - before[0]} lost, "
                         f"{len(self.t.violations) - before[1]} violations")
                if self.t.violations and not self.keep_going:
                    break
        finally:
            pika_log.setLevel(pika_level)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        self.elapsed = time.monotonic() - start
        self.log(self.summary())
        return self.t

    def summary(self):
        """The one line to copy into RELIABILITY.md."""
        t = self.t
        bad = " ".join(f"{k}={v}" for k, v in t.counts.items() if k != "lost")
        return (f"TORTURE seed={self.seed} rounds={t.rounds} confirmed={t.confirmed} "
                f"confirmed_copies={t.confirmed_copies} consumer_acks={t.consumer_acks} rejects={t.rejects} "
                f"requeues={t.requeues} drained={t.drained} duplicates={t.duplicates} "
                f"({' '.join(f'{k}={v}' for k, v in t.dup_kinds.items())}) losses={t.losses} "
                f"{bad} elapsed={self.elapsed:.0f}s")


def from_env(killable, log=print):
    """A Torture configured by MAILROOM_TORTURE_ROUNDS (default 3), MAILROOM_TORTURE_SEED (default 13),
    MAILROOM_TORTURE_ROUND_S (longest round before the kill, default 1.5) and MAILROOM_TORTURE_KEEP_GOING=1
    (report every violation instead of stopping after the first bad round)."""
    return Torture(killable,
                   seed=int(os.environ.get("MAILROOM_TORTURE_SEED", "13")),
                   rounds=rounds_from_env(),
                   round_s=float(os.environ.get("MAILROOM_TORTURE_ROUND_S", "1.5")),
                   keep_going=os.environ.get("MAILROOM_TORTURE_KEEP_GOING", "") not in ("", "0"),
                   log=log)


def rounds_from_env():
    """MAILROOM_TORTURE_ROUNDS, default 3 (CI)."""
    return int(os.environ.get("MAILROOM_TORTURE_ROUNDS", "3"))
