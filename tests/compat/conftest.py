"""Fixtures for the client-compatibility suite: real programs in other stacks (Node amqplib, Go amqp091-go,
the C amqp-tools, Python aio-pika) run against each broker target and report what they saw.

Same environment as tests/amqp (AMQP_TARGETS, RABBITMQ_URL, MAILROOM_BIN; brokers.py starts Mailroom).
Prepare the stacks with tests/compat/setup.sh. A test whose stack is missing skips with the reason,
unless CI=true, where it fails.
"""
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "amqp"))

from brokers import Broker, free_port, rabbitmq_broker, start_mailroom, targets  # noqa: E402

DEFAULT_TIMEOUT_S = 90
NODE_DIR = os.path.join(HERE, "node")
GO_BIN = os.path.join(HERE, "go", "bin", "compat-go")
GO_SRC = os.path.join(HERE, "go", "main.go")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S))


def missing(reason):
    """Skip (or, with CI=true, fail) a test whose client stack is not installed."""
    reason = f"{reason} (run tests/compat/setup.sh)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


class Target:
    """A broker target as the programs see it: its name, URL and (where it listens there) an IPv6 URL."""

    def __init__(self, broker: Broker, url6=None):
        self.name = broker.name
        self.url = broker.url
        self.broker = broker
        self.url6 = url6

    def __repr__(self):
        return f"Target({self.name})"


@pytest.fixture(scope="session")
def compat_mailroom():
    """One Mailroom for the session, on 127.0.0.1 and [::1] (same port)."""
    port = free_port()
    try:
        cm = start_mailroom(["--amqp-listen", f"[::1]:{port}", "--http-listen", "127.0.0.1:0"], port=port)
        broker = cm.__enter__()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield Target(broker, url6=f"amqp://guest:guest@[::1]:{port}/%2F")
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def blocking_mailroom():
    """A Mailroom whose memory alarm trips at 20 kB of queued messages, for connection.blocked tests (the shared
    RabbitMQ's watermark is not ours to change)."""
    if "mailroom" not in targets():
        pytest.skip("needs the mailroom target (connection.blocked needs a broker whose alarm we can trip)")
    try:
        cm = start_mailroom(["--memory-high-watermark", "20000", "--http-listen", "127.0.0.1:0"])
        broker = cm.__enter__()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield Target(broker)
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(params=targets())
def target(request) -> Target:
    if request.param == "rabbitmq":
        # The shared RabbitMQ listens on 127.0.0.1 only.
        return Target(rabbitmq_broker())
    return request.getfixturevalue("compat_mailroom")


@pytest.fixture
def names(target):
    """Unique resource names for one test; queues given out are deleted afterwards (via pika)."""
    made = []

    def make(prefix="compat"):
        n = f"{prefix}-{uuid.uuid4().hex[:10]}"
        made.append(n)
        return n

    yield make
    import pika

    try:
        conn = pika.BlockingConnection(target.broker.params())
    except Exception:
        return
    try:
        for n in made:
            ch = conn.channel()
            ch.queue_delete(n)
            ch.close()
            ch = conn.channel()
            ch.exchange_delete(n)
            ch.close()
    finally:
        conn.close()


def run_json(cmd, timeout=60, env=None, cwd=None):
    """Runs a client program; returns (exit code, JSON events it printed one per line, stderr)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    events = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            events.append(json.loads(line))
    return proc.returncode, events, proc.stderr


def by_event(events, name):
    return [e for e in events if e.get("event") == name]


@pytest.fixture(scope="session")
def node():
    """Runs tests/compat/node/<program>.js with arguments; needs node and `npm ci` done."""
    exe = shutil.which("node")
    if exe is None:
        missing("node is not installed")
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "amqplib")):
        missing("amqplib is not installed in tests/compat/node (npm ci)")

    def run(program, *args, timeout=60):
        return run_json([exe, os.path.join(NODE_DIR, program), *args], timeout=timeout, cwd=NODE_DIR)

    return run


@pytest.fixture(scope="session")
def go_program():
    """Runs the Go client program (tests/compat/go, built offline against Debian's amqp091-go)."""
    if not os.path.isfile(GO_BIN) or os.path.getmtime(GO_BIN) < os.path.getmtime(GO_SRC):
        if shutil.which("go") is None:
            missing("go (golang-go) is not installed")
        build = subprocess.run(["sh", os.path.join(HERE, "go", "build.sh")], capture_output=True, text=True)
        if build.returncode != 0:
            missing(f"the Go program does not build: {build.stderr.strip()[-500:]}")

    def run(*args, timeout=60):
        return run_json([GO_BIN, *args], timeout=timeout)

    return run
