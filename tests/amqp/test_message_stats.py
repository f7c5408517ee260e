"""`message_stats` in the management API (issue 16): exact counts per queue, exchange, vhost and overall
after a known mix of publishes, gets, consumes, acks, requeues and unroutable publishes; rates that rise
above 0 after traffic and fall back to 0 once it stops (Mailroom samples every 5 s, as RabbitMQ emits
stats); and the field names compared with a RabbitMQ management node's where one answers
(RABBITMQ_MGMT_URL with its AMQP port at RABBITMQ_ORACLE_AMQP_URL: tests/management/rabbitmq-oracle.sh).
"""
import time
import uuid

import pika
import pytest

from brokers import free_port, start_mailroom, targets
from test_management_api import RABBITMQ_ORACLE_AMQP_URL, Api, answering_api, q, rabbit_api

pytestmark = pytest.mark.skipif("mailroom" not in targets(), reason="drives a Mailroom server")

# One sampling interval and some slack: a rate covers the interval between the last two samples.
RATE_WAIT = 16


@pytest.fixture(scope="module")
def mailroom():
    http_port, prometheus_port = free_port(), free_port()
    with start_mailroom(["--http-listen", f"127.0.0.1:{http_port}",
                         "--prometheus-listen", f"127.0.0.1:{prometheus_port}"]) as b:
        api = answering_api(http_port)
        api.prometheus = f"http://127.0.0.1:{prometheus_port}"
        yield b, api


def tag():
    return uuid.uuid4().hex[:8]


def stats(obj):
    return obj.get("message_stats") or {}


def counts(ms):
    return {k: v for k, v in ms.items() if not k.endswith("_details")}


def drive_traffic(conn, t, close=True):
    """The same known traffic on any broker: 10 confirmed publishes to a fanout bound to queues a and b,
    then a: 2 gets acked, 1 no-ack get, 7 consumed and acked, 1 empty get; b: 1 get nacked back (so
    redelivered later), 10 consumed no-ack; then one mandatory and one plain unroutable publish."""
    ch = conn.channel()
    ch.confirm_delivery()
    x, qa, qb = f"ms-x-{t}", f"ms-a-{t}", f"ms-b-{t}"
    ch.exchange_declare(x, "fanout", auto_delete=False)
    for name in (qa, qb):
        ch.queue_declare(name)
        ch.queue_bind(name, x)
    for i in range(10):
        ch.basic_publish(x, "", f"m{i}".encode())
    for _ in range(2):
        method, _, _ = ch.basic_get(qa)
        ch.basic_ack(method.delivery_tag)
    assert ch.basic_get(qa, auto_ack=True)[0] is not None
    got = []

    def on_a(c, method, _props, _body):
        got.append(method.delivery_tag)
        c.basic_ack(method.delivery_tag)

    ch.basic_qos(prefetch_count=100)
    ctag = ch.basic_consume(qa, on_a)
    deadline = time.monotonic() + 10
    while len(got) < 7:
        assert time.monotonic() < deadline, got
        conn.process_data_events(time_limit=0.1)
    ch.basic_cancel(ctag)
    assert ch.basic_get(qa)[0] is None
    method, _, _ = ch.basic_get(qb)
    ch.basic_nack(method.delivery_tag, requeue=True)
    got_b = []
    ctag = ch.basic_consume(qb, lambda c, m, p, b: got_b.append(m.redelivered), auto_ack=True)
    deadline = time.monotonic() + 10
    while len(got_b) < 10:
        assert time.monotonic() < deadline, got_b
        conn.process_data_events(time_limit=0.1)
    ch.basic_cancel(ctag)
    assert got_b.count(True) == 1
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish("amq.direct", f"nowhere-{t}", b"returned", mandatory=True)
    ch.basic_publish("amq.direct", f"nowhere-{t}", b"dropped")
    if close:
        ch.close()
    return x, qa, qb


def test_counts_are_exact_per_queue_exchange_vhost_and_overall(mailroom):
    broker, api = mailroom
    t = tag()
    before = counts(stats(api.get("/api/overview")))
    vhost_before = counts(stats(api.get("/api/vhosts/%2F")))
    conn = pika.BlockingConnection(broker.params())
    try:
        x, qa, qb = drive_traffic(conn, t)
    finally:
        conn.close()

    a = stats(api.get(f"/api/queues/%2F/{q(qa)}"))
    assert counts(a) == {"publish": 10, "deliver": 7, "deliver_no_ack": 0, "get": 2, "get_no_ack": 1,
                         "get_empty": 1, "deliver_get": 10, "redeliver": 0, "ack": 9}
    b = stats(api.get(f"/api/queues/%2F/{q(qb)}"))
    assert counts(b) == {"publish": 10, "deliver": 0, "deliver_no_ack": 10, "get": 1, "get_no_ack": 0,
                         "get_empty": 0, "deliver_get": 11, "redeliver": 1, "ack": 0}
    for ms in (a, b):
        for k in counts(ms):
            assert isinstance(ms[f"{k}_details"]["rate"], (int, float)), (k, ms)
    assert counts(stats(api.get(f"/api/exchanges/%2F/{q(x)}"))) == {"publish_in": 10, "publish_out": 20}
    listed = [e for e in api.get("/api/exchanges/%2F") if e["name"] == x]
    assert counts(stats(listed[0])) == {"publish_in": 10, "publish_out": 20}
    listed = [i for i in api.get("/api/queues/%2F") if i["name"] == qa]
    assert counts(stats(listed[0]))["ack"] == 9

    after = counts(stats(api.get("/api/overview")))
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta == {"publish": 12, "confirm": 12, "deliver": 7, "deliver_no_ack": 10, "get": 3, "get_no_ack": 1,
                     "get_empty": 1, "deliver_get": 21, "redeliver": 1, "ack": 9, "return_unroutable": 1,
                     "drop_unroutable": 1}
    vhost_after = counts(stats(api.get("/api/vhosts/%2F")))
    vdelta = {k: vhost_after[k] - vhost_before.get(k, 0) for k in vhost_after}
    assert vdelta == {"publish": 12, "deliver": 7, "deliver_no_ack": 10, "get": 3, "get_no_ack": 1, "get_empty": 1,
                      "deliver_get": 21, "redeliver": 1, "ack": 9}


def rate(ms, key):
    return (ms.get(f"{key}_details") or {}).get("rate")


def test_rates_rise_with_traffic_then_fall_back(mailroom):
    broker, api = mailroom
    t = tag()
    conn = pika.BlockingConnection(broker.params())
    try:
        ch = conn.channel()
        name = f"ms-rate-{t}"
        ch.queue_declare(name)
        for i in range(200):
            ch.basic_publish("", name, b"x")
        ch.queue_declare(name)  # a round trip: every publish has reached the queue
    finally:
        conn.close()
    path = f"/api/queues/%2F/{q(name)}"

    def poll(check, what):
        deadline = time.monotonic() + RATE_WAIT
        while True:
            queue, overview = api.get(path), api.get("/api/overview")
            if check(stats(queue), stats(overview)):
                return queue, overview
            assert time.monotonic() < deadline, (what, stats(queue), stats(overview))
            time.sleep(0.5)

    queue, overview = poll(lambda qs, os_: rate(qs, "publish") > 0 and rate(os_, "publish") > 0, "rates above 0")
    # At most 200 messages over one 5 s interval (fewer if the burst straddled a sample).
    assert 0 < rate(stats(queue), "publish") <= 200 / 4.5, stats(queue)
    assert stats(queue)["publish"] == 200
    default_exchange = [e for e in api.get("/api/exchanges/%2F") if e["name"] == ""][0]
    poll(lambda qs, os_: rate(qs, "publish") == 0 and rate(os_, "publish") == 0, "rates back to 0")
    assert stats(api.get(path))["publish"] == 200
    assert "publish_in_details" in stats(default_exchange)


# Counts RabbitMQ keeps that Mailroom does not: disk I/O of classic queues (no equivalent counters here), and
# per-vhost confirms and unroutable publishes (kept only node-wide: per vhost they would need a counter on
# the publish path).
NOT_KEPT = {"disk_reads", "disk_writes", "disk_reads_details", "disk_writes_details"}
NOT_KEPT_PER_VHOST = {"confirm", "return_unroutable", "drop_unroutable", "confirm_details",
                      "return_unroutable_details", "drop_unroutable_details"}


def test_field_names_match_rabbitmq(mailroom):
    rabbit = rabbit_api()
    if rabbit is None:
        pytest.skip("no RabbitMQ management API (start one: tests/management/rabbitmq-oracle.sh start)")
    try:
        theirs_conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_ORACLE_AMQP_URL))
    except pika.exceptions.AMQPConnectionError:
        pytest.skip(f"no AMQP listener at {RABBITMQ_ORACLE_AMQP_URL} for the RabbitMQ management node")
    broker, api = mailroom
    t = tag()
    try:
        x, qa, qb = drive_traffic(theirs_conn, t)
    finally:
        theirs_conn.close()
    ours_conn = pika.BlockingConnection(broker.params())
    try:
        drive_traffic(ours_conn, t)
    finally:
        ours_conn.close()
    paths = {"overview": "/api/overview", "vhost": "/api/vhosts/%2F", "exchange": f"/api/exchanges/%2F/{q(x)}",
             "queue a": f"/api/queues/%2F/{q(qa)}", "queue b": f"/api/queues/%2F/{q(qb)}"}
    # RabbitMQ's stats reach its API after an emission interval (5 s by default); wait for every count.
    deadline = time.monotonic() + 30
    while True:
        theirs = {k: stats(rabbit.get(p)) for k, p in paths.items()}
        # (publish_in can reach RabbitMQ's API an emission after publish_out.)
        if counts(theirs["queue a"]).get("ack") == 9 and counts(theirs["exchange"]).get("publish_out") == 20 \
                and counts(theirs["exchange"]).get("publish_in") == 10 \
                and counts(theirs["queue b"]).get("deliver_no_ack") == 10:
            break
        assert time.monotonic() < deadline, theirs
        time.sleep(1)
    differences = []
    for what, path in paths.items():
        ours = stats(api.get(path))
        missing = set(theirs[what]) - set(ours) - NOT_KEPT - (NOT_KEPT_PER_VHOST if what == "vhost" else set())
        if missing:
            differences.append(f"{what}: fields missing {sorted(missing)}")
        extra = set(ours) - set(theirs[what])
        if extra:
            differences.append(f"{what}: fields RabbitMQ does not have {sorted(extra)}")
        for k in set(ours) & set(theirs[what]):
            if k.endswith("_details") and set(theirs[what][k]) >= {"rate"} and "rate" not in ours[k]:
                differences.append(f"{what}: {k} has no rate")
    # The same traffic gives the same per-object counts on both brokers.
    for what in ("exchange", "queue a", "queue b"):
        ours = counts(stats(api.get(paths[what])))
        for k, v in counts(theirs[what]).items():
            if k in ours and ours[k] != v:
                differences.append(f"{what}: {k} = {ours[k]}, RabbitMQ {v}")
    for p in (paths["queue a"], paths["queue b"], paths["exchange"]):
        rabbit.call("DELETE", p)
    assert not differences, "\n".join(differences)


# What drive_traffic does on its one channel, as that channel's message_stats count it.
CHANNEL_COUNTS = {"publish": 12, "confirm": 12, "deliver": 7, "deliver_no_ack": 10, "get": 3, "get_no_ack": 1,
                  "get_empty": 1, "deliver_get": 21, "redeliver": 1, "ack": 9, "return_unroutable": 1,
                  "drop_unroutable": 1}


# drive_traffic's channel, per exchange and per queue ({t}: the test's tag), as RabbitMQ's channel_exchange_metrics
# and channel_queue_metrics count it (and its channel's `publishes` and `deliveries`).
PUBLISHES = {"ms-x-{t}": {"publish": 10, "confirm": 10, "return_unroutable": 0, "drop_unroutable": 0},
             "amq.direct": {"publish": 2, "confirm": 2, "return_unroutable": 1, "drop_unroutable": 1}}
DELIVERIES = {"ms-a-{t}": {"deliver": 7, "deliver_no_ack": 0, "get": 2, "get_no_ack": 1, "get_empty": 1,
                           "redeliver": 0, "ack": 9, "deliver_get": 10},
              "ms-b-{t}": {"deliver": 0, "deliver_no_ack": 10, "get": 1, "get_no_ack": 0, "get_empty": 0,
                           "redeliver": 1, "ack": 0, "deliver_get": 11}}
EXCHANGE_SERIES = {f"rabbitmq_channel_messages_{m}_total": {x: c[k] for x, c in PUBLISHES.items()}
                   for m, k in (("published", "publish"), ("confirmed", "confirm"),
                                ("unroutable_returned", "return_unroutable"),
                                ("unroutable_dropped", "drop_unroutable"))}
QUEUE_SERIES = {f"rabbitmq_channel_{m}_total": {qn: c[k] for qn, c in DELIVERIES.items()}
                for m, k in (("get_ack", "get"), ("get", "get_no_ack"), ("messages_delivered_ack", "deliver"),
                             ("messages_delivered", "deliver_no_ack"), ("messages_redelivered", "redeliver"),
                             ("messages_acked", "ack"), ("get_empty", "get_empty"))}


def breakdown(items, kind):
    """{object name: counts} of a channel's `publishes` (kind "exchange") or `deliveries` ("queue")."""
    return {i[kind]["name"]: counts(i["stats"]) for i in items}


def named_connection(api, name, wait_for=lambda c: True, timeout=30):
    """The connection whose client named itself `name` (connection_name), once `wait_for` holds for it."""
    deadline = time.monotonic() + timeout
    while True:
        found = [c for c in api.get("/api/connections") if c.get("user_provided_name") == name]
        if found and wait_for(found[0]):
            return found[0]
        assert time.monotonic() < deadline, found
        time.sleep(0.5)


def test_channel_message_stats_and_connection_octets(mailroom):
    broker, api = mailroom
    t = tag()
    name = f"ms-client-{t}"
    conn = pika.BlockingConnection(broker.params(client_properties={"connection_name": name}))
    try:
        drive_traffic(conn, t, close=False)
        c = named_connection(api, name)
        channels = api.get(f"/api/connections/{q(c['name'])}/channels")
        assert len(channels) == 1, channels
        assert counts(stats(channels[0])) == CHANNEL_COUNTS
        one = api.get(f"/api/channels/{q(channels[0]['name'])}")
        assert counts(stats(one)) == CHANNEL_COUNTS
        listed = [ch for ch in api.get("/api/channels") if ch["name"] == channels[0]["name"]]
        assert counts(stats(listed[0])) == CHANNEL_COUNTS
        # Octets: both ways, with packet counts, growing with traffic; rates above 0 within a sample.
        assert c["recv_oct"] > 0 and c["send_oct"] > 0 and c["recv_cnt"] > 0 and c["send_cnt"] > 0, c
        before = c["recv_oct"]
        conn.channel().basic_publish("", f"ms-a-{t}", b"y" * 10000)
        c = named_connection(api, name, lambda c: c["recv_oct"] >= before + 10000 and
                             c["recv_oct_details"]["rate"] > 0 and c["send_oct_details"]["rate"] > 0)
        # A channel's rates: the 12 publishes were within the last sample intervals, so publish's rate rises
        # above 0 (or already fell back if the test was slow: then it is 0, never missing).
        deadline = time.monotonic() + RATE_WAIT
        while rate(stats(api.get(f"/api/channels/{q(channels[0]['name'])}")), "publish") == 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for k in CHANNEL_COUNTS:
            assert isinstance(stats(one)[f"{k}_details"]["rate"], (int, float))
    finally:
        conn.close()


def test_channel_publishes_and_deliveries_per_exchange_and_queue(mailroom):
    broker, api = mailroom
    t = tag()
    name = f"ms-per-{t}"
    conn = pika.BlockingConnection(broker.params(client_properties={"connection_name": name}))
    try:
        drive_traffic(conn, t, close=False)
        c = named_connection(api, name)
        channel = api.get(f"/api/connections/{q(c['name'])}/channels")[0]["name"]
        one = api.get(f"/api/channels/{q(channel)}")
        want = {x.format(t=t): n for x, n in PUBLISHES.items()}
        assert breakdown(one["publishes"], "exchange") == want
        assert breakdown(one["deliveries"], "queue") == {qn.format(t=t): n for qn, n in DELIVERIES.items()}
        for item in one["publishes"] + one["deliveries"]:
            assert (item.get("exchange") or item.get("queue"))["vhost"] == "/"
            for k in counts(item["stats"]):
                assert isinstance(item["stats"][f"{k}_details"]["rate"], (int, float)), item
        # The breakdown sums to the channel's totals.
        totals = counts(stats(one))
        for k in ("publish", "confirm", "return_unroutable", "drop_unroutable"):
            assert sum(n[k] for n in want.values()) == totals[k], k
        for k in ("deliver", "deliver_no_ack", "get", "get_no_ack", "get_empty", "redeliver", "ack"):
            assert sum(n[k] for n in DELIVERIES.values()) == totals[k], k
        # A deleted queue leaves the breakdown (RabbitMQ drops its rows too); the totals keep its counts.
        conn.channel().queue_delete(f"ms-b-{t}")
        one = api.get(f"/api/channels/{q(channel)}")
        assert list(breakdown(one["deliveries"], "queue")) == [f"ms-a-{t}"]
        assert counts(stats(one))["deliver_no_ack"] == 10
        # The list shows no breakdown, as RabbitMQ's.
        listed = [ch for ch in api.get("/api/channels") if ch["name"] == channel][0]
        assert "publishes" not in listed and "deliveries" not in listed
    finally:
        conn.close()


def test_send_pend_counts_bytes_waiting_for_a_client_that_does_not_read():
    """send_pend (RabbitMQ: bytes in the socket's send queue; Mailroom: bytes queued for the connection's
    writer) rises while a consumer reads nothing and falls back to 0 once it reads."""
    t = tag()
    name, queue = f"ms-pend-{t}", f"ms-pend-{t}"
    http_port, prometheus_port = free_port(), free_port()
    # No outbound bound: the deliveries the socket cannot take wait in the writer's queue (and a minute's
    # write deadline: the client reads nothing for a while on purpose).
    with start_mailroom(["--http-listen", f"127.0.0.1:{http_port}", "--prometheus-listen",
                         f"127.0.0.1:{prometheus_port}", "--max-outbound-bytes", "0",
                         "--write-deadline-ms", "60000"]) as broker:
        api = Api(f"http://127.0.0.1:{http_port}")
        slow = pika.BlockingConnection(broker.params(client_properties={"connection_name": name}, heartbeat=0))
        publisher = pika.BlockingConnection(broker.params())
        try:
            slow_ch = slow.channel()
            slow_ch.queue_declare(queue, auto_delete=True)
            got = []
            slow_ch.basic_consume(queue, lambda c, m, p, b: got.append(len(b)), auto_ack=True)
            c = named_connection(api, name)
            assert c["send_pend"] == 0, c
            # 32 MiB for a client that reads nothing until asked: a few MiB fill the socket's buffers, the
            # rest waits in the writer's queue.
            pub_ch = publisher.channel()
            body = b"p" * (1 << 20)
            for _ in range(32):
                pub_ch.basic_publish("", queue, body)
            pub_ch.queue_declare(queue, passive=True)
            c = named_connection(api, name, lambda c: c["send_pend"] > 1 << 20)
            per_object = scrape(f"http://127.0.0.1:{prometheus_port}/metrics/per-object")
            assert samples(per_object, "rabbitmq_connection_pending_packets")['{channel="%s"}' % c["name"]] > 0
            deadline = time.monotonic() + 60
            while len(got) < 32:
                assert time.monotonic() < deadline, len(got)
                slow.process_data_events(time_limit=0.2)
            named_connection(api, name, lambda c: c["send_pend"] == 0)
        finally:
            publisher.close()
            slow.close()


def test_channel_and_connection_fields_match_rabbitmq(mailroom):
    rabbit = rabbit_api()
    if rabbit is None:
        pytest.skip("no RabbitMQ management API (start one: tests/management/rabbitmq-oracle.sh start)")
    broker, api = mailroom
    t = tag()
    name = f"ms-cmp-{t}"
    try:
        theirs_conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_ORACLE_AMQP_URL + "?heartbeat=0"))
    except pika.exceptions.AMQPConnectionError:
        pytest.skip(f"no AMQP listener at {RABBITMQ_ORACLE_AMQP_URL} for the RabbitMQ management node")
    theirs_conn.close()
    params = pika.URLParameters(RABBITMQ_ORACLE_AMQP_URL)
    params.client_properties = {"connection_name": name}
    params.heartbeat = 0
    theirs_conn = pika.BlockingConnection(params)
    ours_conn = pika.BlockingConnection(broker.params(client_properties={"connection_name": name}, heartbeat=0))
    try:
        drive_traffic(theirs_conn, t, close=False)
        drive_traffic(ours_conn, t, close=False)
        # RabbitMQ's counts reach its API at its next stats emission.
        theirs = named_connection(rabbit, name, lambda c: c.get("recv_oct", 0) > 0)
        deadline = time.monotonic() + 30
        while True:
            their_channel = rabbit.get(f"/api/connections/{q(theirs['name'])}/channels")[0]
            if counts(stats(their_channel)).get("ack") == 9:
                break
            assert time.monotonic() < deadline, their_channel
            time.sleep(1)
        ours = named_connection(api, name)
        our_channel = api.get(f"/api/connections/{q(ours['name'])}/channels")[0]
        assert counts(stats(their_channel)) == CHANNEL_COUNTS
        assert counts(stats(our_channel)) == counts(stats(their_channel))
        assert set(stats(our_channel)) == set(stats(their_channel))
        octet_fields = {"recv_oct", "recv_oct_details", "send_oct", "send_oct_details", "recv_cnt", "send_cnt"}
        assert octet_fields <= set(theirs) and octet_fields <= set(ours)
        # The same client sent the same bytes to both brokers (RabbitMQ's count may lag one emission).
        theirs = named_connection(rabbit, name, lambda c: c["recv_oct"] >= ours["recv_oct"], timeout=15)
        assert theirs["recv_oct"] == ours["recv_oct"], (theirs["recv_oct"], ours["recv_oct"])
    finally:
        for c in (theirs_conn, ours_conn):
            c.close()
        for p in (f"/api/queues/%2F/ms-a-{t}", f"/api/queues/%2F/ms-b-{t}", f"/api/exchanges/%2F/ms-x-{t}"):
            rabbit.call("DELETE", p)


def scrape(url):
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def samples(text, metric):
    """{labels text: value} of every sample of `metric` (labels text "" when unlabelled)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            head, value = line.rsplit(" ", 1)
            out[head[len(metric):]] = float(value)
    return out


def test_prometheus_connection_and_channel_series(mailroom):
    import shutil
    import subprocess
    broker, api = mailroom
    t = tag()
    name = f"ms-prom-{t}"
    conn = pika.BlockingConnection(broker.params(client_properties={"connection_name": name}))
    try:
        drive_traffic(conn, t, close=False)
        c = named_connection(api, name)
        channel = api.get(f"/api/connections/{q(c['name'])}/channels")[0]["name"]
        per_object = scrape(api.prometheus + "/metrics/per-object")
        label = '{channel="%s"}' % channel
        # RabbitMQ's channel_exchange_metrics: one sample per channel and exchange, labelled channel, vhost,
        # exchange; channel_queue_metrics: per channel and queue (channel, vhost, queue).
        for metric, per in EXCHANGE_SERIES.items():
            got = {k: v for k, v in samples(per_object, metric).items() if channel in k}
            want = {'{channel="%s",vhost="/",exchange="%s"}' % (channel, x.format(t=t)): n for x, n in per.items()}
            assert got == want, metric
        for metric, per in QUEUE_SERIES.items():
            got = {k: v for k, v in samples(per_object, metric).items() if channel in k}
            want = {'{channel="%s",vhost="/",queue="%s"}' % (channel, qn.format(t=t)): n for qn, n in per.items()}
            assert got == want, metric
        assert samples(per_object, "rabbitmq_channel_consumers")[label] == 0
        assert samples(per_object, "rabbitmq_channel_messages_unacked")[label] == 0
        conn_label = '{channel="%s"}' % c["name"]
        assert samples(per_object, "rabbitmq_connection_incoming_bytes_total")[conn_label] >= c["recv_oct"] > 0
        assert samples(per_object, "rabbitmq_connection_outgoing_bytes_total")[conn_label] >= c["send_oct"] > 0
        assert samples(per_object, "rabbitmq_connection_incoming_packets_total")[conn_label] > 0
        assert samples(per_object, "rabbitmq_connection_channels")[conn_label] == 1
        assert samples(per_object, "rabbitmq_connection_pending_packets")[conn_label] >= 0
        # /metrics: one unlabelled sum per series, at least this client's counts.
        aggregated = scrape(api.prometheus + "/metrics")
        assert samples(aggregated, "rabbitmq_channel_messages_published_total")[""] >= 12
        assert samples(aggregated, "rabbitmq_channel_messages_acked_total")[""] >= 9
        # /metrics/detailed: the families asked for, per object, named rabbitmq_detailed_*, nothing else.
        detailed = scrape(api.prometheus + "/metrics/detailed?family=channel_exchange_metrics"
                          "&family=queue_coarse_metrics&vhost=%2F")
        published = samples(detailed, "rabbitmq_detailed_channel_messages_published_total")
        assert published['{channel="%s",vhost="/",exchange="ms-x-%s"}' % (channel, t)] == 10
        assert samples(detailed, "rabbitmq_detailed_queue_messages_ready")['{vhost="/",queue="ms-a-%s"}' % t] == 0
        names = {line.split("{")[0].split(" ")[0] for line in detailed.splitlines() if not line.startswith("#")}
        identity = {"rabbitmq_build_info", "rabbitmq_identity_info"}  # on every page, as RabbitMQ 3.10.8's
        assert identity <= names and all(n.startswith("rabbitmq_detailed_channel_messages_")
                                         or n.startswith("rabbitmq_detailed_queue_messages")
                                         for n in names - identity), names
        assert not [n for n in names if "channel_messages_acked" in n], "channel_queue_metrics not asked for"
        bare = scrape(api.prometheus + "/metrics/detailed")
        assert {line.split("{")[0] for line in bare.splitlines() if not line.startswith("#")} == identity
        assert samples(aggregated, "rabbitmq_connection_incoming_bytes_total")[""] >= c["recv_oct"]
        if shutil.which("promtool"):
            for text in (per_object, aggregated, detailed):
                check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                                       text=True, timeout=30)
                assert check.returncode == 0, check.stdout + check.stderr
    finally:
        conn.close()
