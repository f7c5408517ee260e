"""The per-object Prometheus families of connections and channels, and `/metrics/detailed`, compared with a
RabbitMQ 3.10 node's `rabbitmq_prometheus` (the throwaway oracle of rabbitmq-oracle.sh: Prometheus at
RABBITMQ_PROMETHEUS_URL, default http://127.0.0.1:35692; AMQP at RABBITMQ_ORACLE_AMQP_URL). The same client
traffic goes to both brokers; then every family RabbitMQ serves for it must be on Mailroom's page with the
same metric names and label names (Erlang-only series excepted).
"""
import os
import re
import time
import urllib.error
import urllib.request
import uuid

import pika
import pytest

from brokers import free_port, start_mailroom, targets
from test_management_api import RABBITMQ_ORACLE_AMQP_URL
from test_message_stats import drive_traffic

pytestmark = pytest.mark.skipif("mailroom" not in targets(), reason="drives a Mailroom server")

RABBITMQ_PROMETHEUS_URL = os.environ.get("RABBITMQ_PROMETHEUS_URL", "http://127.0.0.1:35692")
FAMILIES = ["connection_coarse_metrics", "connection_metrics", "channel_metrics", "channel_exchange_metrics",
            "channel_queue_metrics", "queue_coarse_metrics", "queue_consumer_count", "queue_metrics"]
# Series of Erlang processes, memory accounting or classic-queue internals Mailroom has no equivalent of,
# the Erlang client's own scrape telemetry, and the head message's timestamp (not in Mailroom's metrics).
NOT_KEPT = re.compile(r"^telemetry_|head_message_timestamp|"
                      r"reductions|_process_memory|consumer_capacity|consumer_utilisation|messages_ram$|"
                      r"messages_ready_ram|messages_unacked_ram|messages_persistent|disk_reads|disk_writes|"
                      r"messages_unacked_bytes|paged_out_bytes|consumer_prefetch")
# On every page; Mailroom's labels add its own product's name and version to RabbitMQ's.
IDENTITY = {"rabbitmq_build_info", "rabbitmq_identity_info"}


def scrape(url):
    with urllib.request.urlopen(url, timeout=20) as resp:
        return resp.read().decode()


def families_of(text):
    """{metric name: set of label names} of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', line[len(name):].split("} ")[0]))
        out.setdefault(name, set()).update(labels)
    return out


def value_of(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def mailroom():
    prometheus_port = free_port()
    with start_mailroom(["--prometheus-listen", f"127.0.0.1:{prometheus_port}"]) as b:
        yield b, f"http://127.0.0.1:{prometheus_port}"


def test_detailed_and_per_object_families_match_rabbitmq(mailroom):
    try:
        scrape(RABBITMQ_PROMETHEUS_URL + "/metrics/detailed")
    except (OSError, urllib.error.URLError):
        pytest.skip(f"no rabbitmq_prometheus at {RABBITMQ_PROMETHEUS_URL} (tests/management/rabbitmq-oracle.sh)")
    broker, prometheus = mailroom
    t = uuid.uuid4().hex[:8]
    query = "?" + "&".join(f"family={f}" for f in FAMILIES)
    theirs_conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_ORACLE_AMQP_URL + "?heartbeat=0"))
    ours_conn = pika.BlockingConnection(broker.params(heartbeat=0))
    x, qa, qb = f"ms-x-{t}", f"ms-a-{t}", f"ms-b-{t}"
    try:
        assert drive_traffic(theirs_conn, t, close=False) == (x, qa, qb)
        drive_traffic(ours_conn, t, close=False)
        # RabbitMQ's channel counts reach its metrics tables at its next stats emission.
        deadline = time.monotonic() + 30
        while True:
            theirs = scrape(RABBITMQ_PROMETHEUS_URL + "/metrics/detailed" + query)
            if value_of(theirs, "rabbitmq_detailed_channel_messages_acked_total", queue=qa) == 9 \
                    and value_of(theirs, "rabbitmq_detailed_channel_messages_published_total", exchange=x) == 10:
                break
            assert time.monotonic() < deadline, theirs
            time.sleep(1)
        ours = scrape(prometheus + "/metrics/detailed" + query)
        differences = []
        their_families, our_families = families_of(theirs), families_of(ours)
        for name, labels in sorted(their_families.items()):
            if NOT_KEPT.search(name):
                continue
            if name not in our_families:
                differences.append(f"detailed: {name} missing")
            elif our_families[name] != labels and not (name in IDENTITY and our_families[name] >= labels):
                differences.append(f"detailed: {name} labels {sorted(our_families[name])} vs {sorted(labels)}")
        extra = set(our_families) - set(their_families)
        if extra:
            differences.append(f"detailed: series RabbitMQ does not serve {sorted(extra)}")
        # The same counts for the same traffic, exchange by exchange and queue by queue.
        for name, key, objects in (("rabbitmq_detailed_channel_messages_published_total", "exchange", (x, "amq.direct")),
                                   ("rabbitmq_detailed_channel_messages_confirmed_total", "exchange", (x, "amq.direct")),
                                   ("rabbitmq_detailed_channel_messages_unroutable_returned_total", "exchange",
                                    ("amq.direct",)),
                                   ("rabbitmq_detailed_channel_messages_acked_total", "queue", (qa, qb)),
                                   ("rabbitmq_detailed_channel_messages_delivered_total", "queue", (qa, qb)),
                                   ("rabbitmq_detailed_channel_get_ack_total", "queue", (qa, qb)),
                                   ("rabbitmq_detailed_channel_get_empty_total", "queue", (qa,)),
                                   ("rabbitmq_detailed_channel_messages_redelivered_total", "queue", (qb,))):
            for o in objects:
                mine, theirs_v = value_of(ours, name, **{key: o}), value_of(theirs, name, **{key: o})
                if mine != theirs_v:
                    differences.append(f"{name}{{{key}={o}}}: {mine} vs RabbitMQ {theirs_v}")
        # /metrics/per-object: the same names and labels for the channel and connection families.
        their_per = families_of(scrape(RABBITMQ_PROMETHEUS_URL + "/metrics/per-object"))
        our_per = families_of(scrape(prometheus + "/metrics/per-object"))
        for name, labels in sorted(their_per.items()):
            if not re.match(r"rabbitmq_(channel|connection)_", name) or NOT_KEPT.search(name):
                continue
            if name not in our_per:
                differences.append(f"per-object: {name} missing")
            elif our_per[name] != labels:
                differences.append(f"per-object: {name} labels {sorted(our_per[name])} vs {sorted(labels)}")
        # No family asked for: the same (identity) series on both.
        bare = families_of(scrape(prometheus + "/metrics/detailed"))
        their_bare = families_of(scrape(RABBITMQ_PROMETHEUS_URL + "/metrics/detailed"))
        if set(bare) != {n for n in their_bare if not NOT_KEPT.search(n)}:
            differences.append(f"detailed without a family: {sorted(bare)} vs {sorted(their_bare)}")
        assert not differences, "\n".join(differences)
    finally:
        for conn in (theirs_conn, ours_conn):
            try:
                ch = conn.channel()
                for name in (qa, qb):
                    ch.queue_delete(name)
                ch.exchange_delete(x)
            finally:
                conn.close()
