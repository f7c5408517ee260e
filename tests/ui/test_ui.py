"""The web UI in a real headless Chromium (Debian's), driven by ui_test.mjs with playwright-core.

This file starts a Mailroom (brokers.py: MAILROOM_BIN or target/debug/mailroom) with its management
listener on a free port, creates a source queue that dead-letters into a DLQ with pika, dead-letters one
message and publishes three more (JSON, text, binary), and keeps a second connection open for the UI to
close, with a consumer on a third queue. The browser script logs in, sees the queue, pages through 25 more, watches its depth change while this side publishes
(on its request), peeks, gets, redrives the dead-lettered message back to its source, closes the
connection, binds and publishes through an exchange, declares, publishes to, purges and deletes a queue,
adds a policy, downloads and uploads definitions. Screenshots and the downloaded definitions are kept in
tests/ui/artifacts/ (gitignored), or $UI_ARTIFACTS.

Needs what tests/ui/setup.sh installs; without it the test skips with the reason (fails with CI=true).
"""
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pika
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "amqp"))

from brokers import free_port, start_mailroom  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = os.environ.get("UI_ARTIFACTS", os.path.join(HERE, "artifacts"))
SOURCE, DLQ, VICTIM, CONSUMED = "ui-orders", "ui-orders.dlq", "ui-test-victim", "ui-consumed"
BROWSER_TIMEOUT_S = 150


def missing(reason):
    reason = f"{reason} (run tests/ui/setup.sh)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def http(base, method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode())
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read()
        return json.loads(text) if text else None


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@pytest.mark.timeout(BROWSER_TIMEOUT_S + 60)
def test_web_ui_in_chromium():
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"no Chromium at {CHROMIUM}")
    node = shutil.which("node")
    if not node:
        missing("no node")
    if not os.path.isfile(os.path.join(HERE, "node_modules", "playwright-core", "package.json")):
        missing("playwright-core is not installed in tests/ui/node_modules")

    http_port = free_port()
    with start_mailroom(["--http-listen", f"127.0.0.1:{http_port}"]) as broker:
        wait_port(http_port)
        base = f"http://127.0.0.1:{http_port}"
        # The UI is served without credentials; the API behind it wants them.
        with urllib.request.urlopen(base + "/", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/html")
            assert b"/ui/app.js" in resp.read()

        conn = pika.BlockingConnection(broker.params(heartbeat=0, client_properties={"connection_name": "ui-test-publisher"}))
        victim = pika.BlockingConnection(broker.params(heartbeat=0, client_properties={"connection_name": VICTIM}))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.queue_declare(DLQ, durable=True)
            ch.queue_declare(SOURCE, durable=True, arguments={
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": DLQ})
            persistent = pika.BasicProperties(delivery_mode=2)
            # The first message is rejected into the DLQ (with its x-death history).
            ch.basic_publish("", SOURCE, b"order 99 (failed)", persistent)
            method, _, _ = ch.basic_get(SOURCE)
            ch.basic_reject(method.delivery_tag, requeue=False)
            ch.basic_publish("", SOURCE, json.dumps({"order": 1, "item": "book"}).encode(), pika.BasicProperties(
                delivery_mode=2, content_type="application/json", headers={"x-tenant": "acme"}))
            ch.basic_publish("", SOURCE, b"plain text order 2", persistent)
            ch.basic_publish("", SOURCE, b"\x00\x01\xffhello", persistent)
            # More queues than a page holds (paging), and a consumer for the queue page to list.
            for i in range(25):
                http(base, "PUT", f"/api/queues/%2F/ui-page-{i:02}", {"durable": False})
            vch = victim.channel()
            vch.queue_declare(CONSUMED, durable=False)
            vch.basic_consume(CONSUMED, lambda *a: None, consumer_tag="ui-test-consumer")
            deadline = time.monotonic() + 10
            while http(base, "GET", f"/api/queues/%2F/{DLQ}")["messages"] != 1:
                assert time.monotonic() < deadline, "the rejected message never reached the DLQ"
                time.sleep(0.05)

            env = dict(os.environ, MAILROOM_UI_URL=base, UI_ARTIFACTS=ARTIFACTS, CHROMIUM=CHROMIUM,
                       SOURCE_QUEUE=SOURCE, DLQ=DLQ, VICTIM_CONNECTION=VICTIM, CONSUMED_QUEUE=CONSUMED)
            proc = subprocess.Popen([node, os.path.join(HERE, "ui_test.mjs")], cwd=HERE, env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            published = 0
            out = []
            try:
                # The script's requests come on its stdout, one a line; everything else is its log.
                for line in proc.stdout:
                    line = line.rstrip("\n")
                    out.append(line)
                    print(line)
                    if line.startswith("PUBLISH "):
                        for i in range(int(line.split()[1])):
                            ch.basic_publish("", SOURCE, f"order {3 + i}".encode(), persistent)
                            published += 1
                        proc.stdin.write("OK\n")
                        proc.stdin.flush()
                    elif line.startswith("LOGIN "):
                        # The user and permission the UI created let a real client in.
                        _, user, password, vhost = line.split()
                        try:
                            pika.BlockingConnection(broker.params(
                                credentials=pika.PlainCredentials(user, password), virtual_host=vhost)).close()
                            answer = "OK"
                        except pika.exceptions.AMQPError as e:
                            answer = f"login failed: {e!r}"
                        proc.stdin.write(answer + "\n")
                        proc.stdin.flush()
                rc = proc.wait(timeout=BROWSER_TIMEOUT_S)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            err = proc.stderr.read()
            assert rc == 0, f"the browser script failed:\n{err}\n(screenshots in {ARTIFACTS})"
            assert out[-1] == "ALL OK"

            # What the UI did, as the API sees it: 3 + 2 published, 1 redriven back, 1 published through
            # amq.direct once the UI bound it; the DLQ empty.
            assert published == 2
            assert http(base, "GET", f"/api/queues/%2F/{SOURCE}")["messages"] == 7
            assert http(base, "GET", f"/api/queues/%2F/{DLQ}")["messages"] == 0
            assert http(base, "GET", "/api/queues/%2F/ui-imported")["name"] == "ui-imported"
            # The queue the UI declared, published to, purged and deleted is gone.
            with pytest.raises(urllib.error.HTTPError) as gone:
                http(base, "GET", "/api/queues/%2F/ui-scratch")
            assert gone.value.code == 404
            assert http(base, "GET", "/api/policies/%2F/ui-cap")["definition"] == {"max-length": 100}
            # The user, vhost and permission the UI created.
            assert http(base, "GET", "/api/users/ui-user")["tags"] == ["monitoring", "management"]
            assert http(base, "GET", "/api/permissions/ui-vhost/ui-user") == {
                "user": "ui-user", "vhost": "ui-vhost", "configure": "^ui-", "write": ".*", "read": ".*"}
            # The connection the UI closed is closed, with the UI's reason.
            with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
                victim.process_data_events(time_limit=2)
                victim.channel()
            assert closed.value.reply_code == 320
            assert "management UI" in closed.value.reply_text
            # The downloaded definitions are RabbitMQ's format.
            with open(os.path.join(ARTIFACTS, "definitions.json")) as f:
                defs = json.load(f)
            assert {"queues", "exchanges", "bindings"} <= defs.keys()
            for name in ("overview.png", "queues.png", "queue-peek.png", "redrive.png"):
                assert os.path.getsize(os.path.join(ARTIFACTS, name)) > 10_000, name
        finally:
            for c in (conn, victim):
                with contextlib.suppress(pika.exceptions.AMQPError):
                    if c.is_open:
                        c.close()
