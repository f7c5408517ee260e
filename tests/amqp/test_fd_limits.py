"""File descriptors (issue 13): the broker keeps a reserve of descriptors for its stores.

Started under `ulimit -n 256` with 50 durable queues holding confirmed messages, connections are opened
until the broker refuses one (closed at once). Meanwhile an existing connection still publishes, with
confirms, to every queue; after the extra connections close, the broker accepts again and every queue
gives back every message. Mailroom only: RabbitMQ's limit is set for its whole node, which the shared
oracle must not have changed.
"""
import os
import resource
import time

import pika
import pytest

from brokers import start_mailroom, targets

pytestmark = pytest.mark.skipif("mailroom" not in targets(), reason="Mailroom only (a per-process descriptor limit)")

QUEUES = 50
PER_QUEUE = 20
LIMIT = 256


def low_nofile_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def confirmed_publish(ch, queue, body):
    ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)


@pytest.mark.timeout(120)
def test_descriptor_exhaustion_refuses_connections_and_loses_nothing():
    extra_args = os.environ.get("MAILROOM_FD_TEST_ARGS", "").split()  # e.g. "--fd-reserve 0" to see it fail
    with start_mailroom(extra_args, preexec_fn=low_nofile_limit) as broker:
        params = broker.params(heartbeat=0, blocked_connection_timeout=None, socket_timeout=5)
        first = pika.BlockingConnection(params)
        ch = first.channel()
        ch.confirm_delivery()
        names = [f"fd-q-{i}" for i in range(QUEUES)]
        for name in names:
            ch.queue_declare(name, durable=True)
            for j in range(PER_QUEUE):
                confirmed_publish(ch, name, f"{name}-{j}".encode())

        extra, refused = [], None
        for _ in range(LIMIT + 10):
            try:
                c = pika.BlockingConnection(params)
                c.channel()  # a refused socket fails here at the latest
                extra.append(c)
            except pika.exceptions.AMQPError as e:
                refused = e
                break
        assert refused is not None, f"{len(extra)} extra connections and none refused under ulimit -n {LIMIT}"
        assert len(extra) > 10, "the reserve leaves room for connections"

        # At the limit, the existing connection still stores and confirms a message in every queue, and
        # new durable queues (new store files) can still be declared and written.
        for name in names:
            confirmed_publish(ch, name, f"{name}-late".encode())
        for i in range(5):
            ch.queue_declare(f"fd-new-{i}", durable=True)
            confirmed_publish(ch, f"fd-new-{i}", b"new")
            names.append(f"fd-new-{i}")

        for c in extra:
            c.close()
        time.sleep(0.5)  # the broker recounts its descriptors at most every 100 ms
        again = pika.BlockingConnection(params)
        got = again.channel()
        for name in names:
            bodies = []
            while True:
                method, _, body = got.basic_get(name, auto_ack=True)
                if method is None:
                    break
                bodies.append(body.decode())
            want = ["new"] if name.startswith("fd-new-") else [f"{name}-{j}" for j in range(PER_QUEUE)] + [f"{name}-late"]
            assert bodies == want, f"{name}: {len(bodies)} of {len(want)} messages back"
        again.close()
        first.close()
