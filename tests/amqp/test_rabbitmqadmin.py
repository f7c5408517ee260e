"""RabbitMQ's own management CLI, `rabbitmqadmin` v2, driven against Mailroom unchanged: show overview; list,
declare and delete every resource; publish and get; purge; definitions export and import; health checks;
close a connection. Each command must exit 0 (or fail where RabbitMQ fails) and print the expected objects.

The binary comes from `tests/management/setup.sh` (`cargo install rabbitmqadmin`); without it the test is
skipped, or fails when CI=true. RABBITMQADMIN names another binary.
"""
import json
import os
import re
import shutil
import subprocess
import time
import uuid

import pika
import pytest

from brokers import free_port, start_mailroom, targets

pytestmark = pytest.mark.skipif("mailroom" not in targets(), reason="drives a Mailroom server")


def rabbitmqadmin_binary():
    """rabbitmqadmin v2 (the one on Debian's PATH may be the old Python v1, which takes other flags)."""
    candidates = [os.environ.get("RABBITMQADMIN"), os.path.expanduser("~/.cargo/bin/rabbitmqadmin"),
                  shutil.which("rabbitmqadmin")]
    for c in candidates:
        if not c or not os.access(c, os.X_OK):
            continue
        try:
            out = subprocess.run([c, "--version"], capture_output=True, text=True, timeout=10).stdout
        except OSError:
            continue
        if out.startswith("rabbitmqadmin 2."):
            return c
    return None


@pytest.fixture(scope="module")
def admin():
    binary = rabbitmqadmin_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("rabbitmqadmin v2 missing: run tests/management/setup.sh")
        pytest.skip("rabbitmqadmin v2 not installed (tests/management/setup.sh installs it)")
    http_port = free_port()
    with start_mailroom(["--http-listen", f"127.0.0.1:{http_port}"]) as broker:
        base = [binary, "--host", "127.0.0.1", "--port", str(http_port), "--username", "guest",
                "--password", "guest", "--non-interactive"]

        def run(*args, ok=True):
            out = subprocess.run(base + list(args), capture_output=True, text=True, timeout=60)
            if ok:
                assert out.returncode == 0, f"rabbitmqadmin {' '.join(args)}: {out.returncode}\n{out.stdout}\n{out.stderr}"
            return out

        deadline = time.monotonic() + 10
        while run("show", "overview", ok=False).returncode != 0:
            assert time.monotonic() < deadline, "the HTTP API did not come up"
            time.sleep(0.1)
        yield run, broker


def test_rabbitmqadmin_drives_mailroom(admin, tmp_path):
    run, broker = admin
    t = uuid.uuid4().hex[:8]
    qn, xn, pn = f"ra-q-{t}", f"ra-x-{t}", f"ra-p-{t}"

    out = run("show", "overview").stdout
    assert "Mailroom" in out and "3.10.8" in out

    run("declare", "queue", "--name", qn, "--durable", "true", "--arguments", '{"x-max-length": 50}')
    run("declare", "exchange", "--name", xn, "--type", "topic")
    run("declare", "binding", "--source", xn, "--destination-type", "queue", "--destination", qn,
        "--routing-key", "a.#")
    run("declare", "policy", "--name", pn, "--pattern", f"^{qn}$", "--definition", '{"max-length": 10}',
        "--apply-to", "queues")
    assert qn in run("list", "queues").stdout
    assert xn in run("list", "exchanges").stdout
    assert "a.#" in run("list", "bindings").stdout
    assert pn in run("list", "policies").stdout
    assert "/" in run("list", "vhosts").stdout
    assert "mailroom@" in run("list", "nodes").stdout
    run("list", "parameters")
    run("list", "operator_policies")

    assert "routed" in run("publish", "message", "--exchange", xn, "--routing-key", "a.b", "--payload",
                           f"hello-{t}").stdout
    run("publish", "message", "--routing-key", qn, "--payload", f"second-{t}")
    out = run("get", "messages", "--queue", qn, "--count", "1", "--ack-mode", "ack_requeue_true").stdout
    assert f"hello-{t}" in out
    out = run("get", "messages", "--queue", qn, "--count", "1").stdout
    assert f"hello-{t}" in out
    run("purge", "queue", "--name", qn)
    assert f"second-{t}" not in run("get", "messages", "--queue", qn, "--count", "1").stdout

    conn = pika.BlockingConnection(broker.params(client_properties={"connection_name": f"ra-conn-{t}"}))
    ch = conn.channel()
    ch.basic_consume(qn, lambda *a: None, consumer_tag=f"ra-ctag-{t}")
    out = run("list", "connections").stdout
    assert "AMQP 0-9-1" in out and "guest" in out
    assert "(1)" in run("list", "channels").stdout
    assert f"ra-ctag-{t}" in run("list", "consumers").stdout
    names = re.findall(r"127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+", out)
    assert len(names) == 1, out
    conn_name = names[0]
    run("close", "connection", "--name", conn_name)
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)

    path = tmp_path / "defs.json"
    run("definitions", "export", "--file", str(path))
    exported = json.loads(path.read_text())
    assert any(q["name"] == qn for q in exported["queues"])
    assert any(b["source"] == xn for b in exported["bindings"])
    run("delete", "binding", "--source", xn, "--destination-type", "queue", "--destination", qn,
        "--routing-key", "a.#")
    assert "a.#" not in run("list", "bindings").stdout
    run("definitions", "import", "--file", str(path))
    assert "a.#" in run("list", "bindings").stdout, "the import brought the binding back"

    run("health_check", "local_alarms")
    run("health_check", "cluster_wide_alarms")
    run("health_check", "port_listener", "--port", str(broker.port))
    run("health_check", "protocol_listener", "--protocol", "amqp")
    assert run("health_check", "port_listener", "--port", "1", ok=False).returncode != 0

    run("delete", "policy", "--name", pn)
    run("delete", "exchange", "--name", xn)
    run("delete", "queue", "--name", qn)
    assert qn not in run("list", "queues").stdout
    assert run("delete", "queue", "--name", qn, ok=False).returncode != 0, "404, as RabbitMQ"
    run("delete", "queue", "--name", qn, "--idempotently")
