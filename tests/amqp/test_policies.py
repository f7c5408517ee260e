"""Policies applied to existing queues without redeclaring, on both brokers.

RabbitMQ: `rabbitmqctl set_policy NAME PATTERN DEFINITION --priority N --apply-to queues` / `clear_policy`.
Mailroom: `mailroom admin --url http://127.0.0.1:<http port> policy set ...` against a server started with
`--http-listen 127.0.0.1:<free port>`.
"""
import contextlib
import json
import subprocess
import time
import uuid

import pika
import pytest

from brokers import free_port, mailroom_bin, rabbitmq_broker, start_mailroom, targets


class Policies:
    def __init__(self, kind, http_port=None):
        self.kind = kind
        self.http_port = http_port
        self.names = []

    def _admin(self, *args):
        cmd = [mailroom_bin(), "admin", "--url", f"http://127.0.0.1:{self.http_port}",
               "--user", "guest", "--password", "guest", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)

    def set(self, name, pattern, definition, priority=0):
        self.names.append(name)
        if self.kind == "rabbitmq":
            subprocess.run(["rabbitmqctl", "set_policy", name, pattern, json.dumps(definition),
                            "--priority", str(priority), "--apply-to", "queues"],
                           check=True, capture_output=True, timeout=60)
        else:
            self._admin("policy", "set", name, pattern, json.dumps(definition),
                        "--priority", str(priority), "--apply-to", "queues")
        # RabbitMQ applies policies asynchronously to queue processes.
        time.sleep(0.5 if self.kind == "rabbitmq" else 0.05)

    def clear(self, name):
        if self.kind == "rabbitmq":
            subprocess.run(["rabbitmqctl", "clear_policy", name], check=True, capture_output=True, timeout=60)
        else:
            self._admin("policy", "delete", name)
        self.names.remove(name)

    def clear_all(self):
        for n in list(self.names):
            with contextlib.suppress(Exception):
                self.clear(n)


@pytest.fixture(params=targets())
def target(request):
    if request.param == "rabbitmq":
        policies = Policies("rabbitmq")
        try:
            yield rabbitmq_broker(), policies
        finally:
            policies.clear_all()
    else:
        port = free_port()
        with start_mailroom(["--http-listen", f"127.0.0.1:{port}"]) as b:
            _wait_http(port)
            yield b, Policies("mailroom", port)


def _wait_http(port, timeout=10):
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mailroom HTTP API not listening")


def _channel(broker):
    conn = pika.BlockingConnection(broker.params())
    ch = conn.channel()
    ch.confirm_delivery()  # publishes are settled before the counts are read
    return conn, ch


def _count(ch, queue):
    return ch.queue_declare(queue, passive=True).method.message_count


def _publish(ch, queue, n, prefix="m"):
    for i in range(n):
        ch.basic_publish("", queue, f"{prefix}{i}".encode())


def _drain(ch, queue):
    bodies = []
    while True:
        method, _, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body.decode())


def test_max_length_policy_applies_to_existing_queue(target):
    broker, policies = target
    conn, ch = _channel(broker)
    try:
        q = f"pol-len-{uuid.uuid4().hex[:8]}"
        ch.queue_declare(q, auto_delete=False)
        _publish(ch, q, 5)
        assert _count(ch, q) == 5
        policies.set(f"{q}-p", f"^{q}$", {"max-length": 2})
        # The existing queue is truncated (drop-head) and stays limited, without a redeclare.
        assert _count(ch, q) == 2
        _publish(ch, q, 3, prefix="n")
        assert _drain(ch, q) == ["n1", "n2"]
        policies.clear(f"{q}-p")
        _publish(ch, q, 4)
        assert _count(ch, q) == 4
        ch.queue_delete(q)
    finally:
        policies.clear_all()
        conn.close()


def test_message_ttl_policy_applies_to_existing_queue(target):
    broker, policies = target
    conn, ch = _channel(broker)
    try:
        q = f"pol-ttl-{uuid.uuid4().hex[:8]}"
        ch.queue_declare(q)
        policies.set(f"{q}-p", f"^{q}$", {"message-ttl": 200})
        _publish(ch, q, 3)
        assert _count(ch, q) == 3
        time.sleep(0.6)
        assert _count(ch, q) == 0
        ch.queue_delete(q)
    finally:
        policies.clear_all()
        conn.close()


def test_min_of_argument_and_policy(target):
    broker, policies = target
    conn, ch = _channel(broker)
    try:
        q = f"pol-min-{uuid.uuid4().hex[:8]}"
        ch.queue_declare(q, arguments={"x-max-length": 3})
        policies.set(f"{q}-p", f"^{q}$", {"max-length": 10})
        _publish(ch, q, 6)
        assert _count(ch, q) == 3  # the argument is smaller
        policies.set(f"{q}-p", f"^{q}$", {"max-length": 1})
        assert _count(ch, q) == 1  # now the policy is smaller
        ch.queue_delete(q)
    finally:
        policies.clear_all()
        conn.close()


def test_argument_wins_for_overflow_and_highest_priority_applies(target):
    broker, policies = target
    conn, ch = _channel(broker)
    try:
        q = f"pol-ovf-{uuid.uuid4().hex[:8]}"
        ch.queue_declare(q, arguments={"x-overflow": "drop-head"})
        policies.set(f"{q}-low", f"^{q}", {"max-length": 5}, priority=1)
        policies.set(f"{q}-high", f"^{q}$", {"max-length": 2, "overflow": "reject-publish"}, priority=5)
        _publish(ch, q, 4)
        # max-length 2 from the higher-priority policy; its overflow loses to the declared drop-head.
        assert _count(ch, q) == 2
        assert _drain(ch, q) == ["m2", "m3"]
        ch.queue_delete(q)
    finally:
        policies.clear_all()
        conn.close()
