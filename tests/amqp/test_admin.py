"""`mailroom admin peek` and `redrive` against a Mailroom server (RabbitMQ has no equivalent without plugins)."""
import json
import subprocess
import uuid

import pika
import pytest

from brokers import free_port, mailroom_bin, start_mailroom, targets

pytestmark = pytest.mark.skipif("mailroom" not in targets(), reason="Mailroom-only admin commands")


@pytest.fixture
def server():
    port = free_port()
    with start_mailroom(["--http-listen", f"127.0.0.1:{port}"]) as b:
        yield b, port


def admin(port, *args):
    out = subprocess.run([mailroom_bin(), "admin", "--url", f"http://127.0.0.1:{port}", *args],
                         check=True, capture_output=True, timeout=30, text=True)
    return json.loads(out.stdout) if out.stdout.strip() else None


def test_peek_and_redrive_through_the_cli(server):
    broker, port = server
    conn = pika.BlockingConnection(broker.params())
    ch = conn.channel()
    ch.confirm_delivery()
    tag = uuid.uuid4().hex[:8]
    work, dlq, dlx = f"work-{tag}", f"dlq-{tag}", f"dlx-{tag}"
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    ch.queue_declare(work, arguments={"x-dead-letter-exchange": dlx})
    for i in range(5):
        ch.basic_publish("", work, f"m{i}".encode(),
                         pika.BasicProperties(headers={"kind": "odd" if i % 2 else "even"}, content_type="text/plain"))
    for _ in range(5):
        method, _, _ = ch.basic_get(work)
        ch.basic_reject(method.delivery_tag, requeue=False)
    assert ch.queue_declare(dlq, passive=True).method.message_count == 5

    page = admin(port, "peek", dlq, "--offset", "1", "--count", "2")
    assert [m["payload"] for m in page] == ["m1", "m2"]
    assert page[0]["properties"]["headers"]["x-death"][0]["queue"] == work
    assert page[0]["properties"]["content_type"] == "text/plain"
    assert ch.queue_declare(dlq, passive=True).method.message_count == 5

    out = admin(port, "redrive", dlq, "--count", "1", "--to-queue", work)
    assert out["moved"] == 1
    out = admin(port, "redrive", dlq, "--header", "kind=odd")
    assert out["moved"] == 2
    out = admin(port, "redrive", dlq)
    assert out == {"moved": 2, "skipped": 0}
    assert ch.queue_declare(dlq, passive=True).method.message_count == 0
    bodies = []
    while True:
        method, props, body = ch.basic_get(work, auto_ack=True)
        if method is None:
            break
        bodies.append(body.decode())
        assert props.headers["x-death"][0]["reason"] == "rejected"
    assert sorted(bodies) == ["m0", "m1", "m2", "m3", "m4"]
    conn.close()
