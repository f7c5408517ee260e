"""Compatibility with the RabbitMQ Java client (Debian's librabbitmq-client-java 5.x).

tests/compat/java/Compat.java drives one client feature per subcommand and prints what the client saw
as `key=value` lines; these tests run it against every target in AMQP_TARGETS (Mailroom started here,
RabbitMQ at RABBITMQ_URL: see tests/amqp/brokers.py) and assert on those observations. The driver is
built by tests/compat/setup.d/java.sh (javac, no Maven). Without a JDK or the client jar the tests
skip, or fail when CI=true.
"""
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "amqp"))

from brokers import _wait_listening, free_port, mailroom_bin, rabbitmq_broker, start_mailroom, targets  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SETUP = os.path.join(HERE, "setup.d", "java.sh")
BUILD = os.path.join(HERE, "java", "build")
JARS = "/usr/share/java"
# The client logs through slf4j: slf4j-simple shows its warnings (recovery attempts) on stderr.
CLASSPATH_JARS = ["amqp-client.jar", "slf4j-api.jar", "slf4j-simple.jar"]
SCENARIO_TIMEOUT_S = 60
# Mailroom's memory watermark for the connection.blocked case: three 100 kB bodies cross it.
TINY_WATERMARK = 200_000

pytestmark = pytest.mark.timeout(120)


def _missing_tool(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def java_classpath():
    """Builds the driver (idempotent) and returns the classpath to run it with."""
    if shutil.which("java") is None or shutil.which("javac") is None:
        _missing_tool("no java/javac on PATH: apt-get install default-jdk-headless librabbitmq-client-java")
    r = subprocess.run(["bash", SETUP], capture_output=True, text=True, timeout=300)
    if "SKIP" in r.stdout or r.returncode != 0:
        _missing_tool(f"tests/compat/setup.d/java.sh: {r.stdout.strip()} {r.stderr.strip()}")
    jars = [os.path.join(JARS, j) for j in CLASSPATH_JARS if os.path.isfile(os.path.join(JARS, j))]
    return os.pathsep.join([BUILD, *jars])


@pytest.fixture(scope="session")
def java_mailroom():
    """One Mailroom server for the scenarios that need no special flags."""
    try:
        cm = start_mailroom()
        broker = cm.__enter__()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield broker
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(params=targets())
def java_target(request):
    if request.param == "rabbitmq":
        return rabbitmq_broker()
    return request.getfixturevalue("java_mailroom")


def parse(stdout):
    """The driver's `key=value` lines as a dict (the value is everything after the first '=')."""
    seen = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            seen[key] = value
    return seen


def run_java(classpath, scenario, url, nio=False):
    r = subprocess.run(["java", f"-Dcompat.nio={str(nio).lower()}", "-cp", classpath, "Compat", scenario, url],
                       capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"Compat {scenario} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return parse(r.stdout)


@pytest.mark.parametrize("nio", [False, True], ids=["socket", "nio"])
def test_publish_consume_manual_ack_get(java_classpath, java_target, nio):
    seen = run_java(java_classpath, "basic", java_target.url, nio=nio)
    assert seen["declare_queue"] == "true"
    assert seen["prefetch_window"] == "2"
    assert seen["bodies"] == "b0,b1,b2,b3,b4"
    assert seen["delivery_tags"] == "1,2,3,4,5"
    # content-type/correlation-id/message-id/delivery-mode/header i/header s/redelivered/exchange/rk/tag
    assert seen["meta"] == ",".join(f"text/plain/c{i}/m{i}/2/{i}/v{i}/false//true/true" for i in range(5))
    assert seen["requeued"] == "requeue-me/false -> requeue-me/true"
    assert seen["cancel_ok_tag_matches"] == "true"
    assert seen["get"] == "g1/remaining=1/redelivered=false/content_type=text/plain"
    assert seen["get_autoack"] == "g2/remaining=0"
    assert seen["get_empty"] == "null"
    assert seen["passive"] == "messages=0/consumers=0"
    assert seen["delete_count"] == "1"


@pytest.mark.parametrize("nio", [False, True], ids=["socket", "nio"])
def test_publisher_confirms_wait_and_listener(java_classpath, java_target, nio):
    seen = run_java(java_classpath, "confirms", java_target.url, nio=nio)
    assert seen["first_seq"] == "1"
    assert seen["wait_for_confirms"] == "true"
    assert seen["next_seq"] == "21"
    # The listener's acks (single or `multiple`) cover exactly tags 1..500, none twice.
    assert seen["listener_acked"] == "500/first=1/last=500"
    assert seen["listener_nacked"] == "0"
    assert seen["listener_double_confirmed"] == "0"
    assert seen["queue_messages"] == "520"
    # x-overflow=reject-publish on a one-message queue: 1 acked, 2 and 3 nacked, channel stays open.
    assert seen["wait_for_confirms_with_nacks"] == "false"
    assert seen["capped_acked"] == "1"
    assert seen["capped_nacked"] == "2,3"
    assert seen["capped_channel_open"] == "true"
    assert seen["capped_messages"] == "1"


def test_mandatory_unroutable_basic_return(java_classpath, java_target):
    seen = run_java(java_classpath, "returns", java_target.url)
    assert seen["returned"] == "312/NO_ROUTE/true/nowhere/lost/lost-1/application/octet-stream"
    # The return arrives before the confirm of the same publish; all three publishes are acked.
    # ("+" marks multiple=true: Mailroom sets it on single acks, RabbitMQ does not; both are valid.)
    events = [e.rstrip("+") for e in seen["events"].split(",")]
    assert events == ["return:lost", "ack:1", "ack:2", "ack:3"]
    assert seen["routed_body"] == "kept"
    assert seen["channel_open"] == "true"


def test_consumer_cancel_notification_on_queue_delete(java_classpath, java_target):
    seen = run_java(java_classpath, "cancel", java_target.url)
    assert seen["client_advertises_cancel_notify"] == "true"
    assert seen["delivered"] == "before-delete"
    assert seen["handle_cancel_tag_matches"] == "true"
    assert seen["handle_cancel_ok_called"] == "false"
    assert seen["channel_open"] == "true"
    assert seen["server_named_prefix"] == "true"


def test_rpc_client_and_server_over_direct_reply_to(java_classpath, java_target):
    seen = run_java(java_classpath, "rpc", java_target.url)
    assert seen["replies"] == "pong:ping0,pong:ping1,pong:ping2"
    # RpcClient 5.x replies through amq.rabbitmq.reply-to; the server sees the broker's opaque name.
    assert seen["reply_to_prefix"] == "true"
    assert seen["calls_seen_by_server"] == "3"
    assert seen["channels_open"] == "true,true"


def test_one_second_heartbeat_keeps_an_idle_connection_open(java_classpath, java_target):
    seen = run_java(java_classpath, "heartbeat", java_target.url)
    assert seen["negotiated_heartbeat"] == "1"
    assert seen["open_after_idle"] == "true"
    assert seen["get_after_idle"] == "still-here"


def test_connection_blocked_listener(java_classpath, java_target):
    if java_target.name != "mailroom":
        pytest.skip("needs a broker with a tiny memory watermark; RabbitMQ's is per node and the shared "
                    "node must not be reconfigured")
    with start_mailroom(["--memory-high-watermark", str(TINY_WATERMARK)]) as b:
        seen = run_java(java_classpath, "blocked", b.url)
    assert seen["first_event"] == "blocked:low on memory"
    assert seen["drained_by_consumer_connection"] == "3"
    assert seen["second_event"] == "unblocked"
    assert seen["after_unblock"] == "after"


def _spawn_mailroom(data_dir, port):
    # The HTTP API is not used here: port 0 keeps it off the shared default port.
    cmd = [mailroom_bin(), "server", "--amqp-listen", f"127.0.0.1:{port}", "--http-listen", "127.0.0.1:0",
           "--data-dir", data_dir, "--log-level", "warn"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    _wait_listening(port, proc, 20)
    return proc


def _stop(proc, sig):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_automatic_recovery_after_broker_restart(java_classpath, java_target, stop_signal):
    """The client reconnects by itself, redeclares its topology (durable exchange, queue, binding and a
    server-named exclusive queue, which the restart deleted), re-registers both consumers, gets back the
    persistent message it held unacked (redelivered), and receives a message published after the restart."""
    if java_target.name != "mailroom":
        pytest.skip("restarting the shared RabbitMQ node (stop_app/start_app) would break the other suites "
                    "running against it")
    if not os.path.isfile(mailroom_bin()):
        pytest.fail(f"mailroom binary not found at {mailroom_bin()}", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="mailroom-java-recover-") as data_dir, \
            tempfile.TemporaryFile(mode="w+") as stderr:
        port = free_port()
        procs = [_spawn_mailroom(data_dir, port)]
        java = subprocess.Popen(
            ["java", "-cp", java_classpath, "Compat", "recover", f"amqp://guest:guest@127.0.0.1:{port}/%2F"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True)
        lines = queue.Queue()  # the driver's stdout lines, then None at its end

        def pump():
            for line in java.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        recovered_after = None
        try:
            out = []
            deadline = time.monotonic() + SCENARIO_TIMEOUT_S
            while not out or not out[-1].startswith("READY="):
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                assert line is not None, f"driver ended before READY: {out}\n{_read(stderr)}"
                out.append(line)
            _stop(procs[0], stop_signal)
            restarted = time.monotonic()
            procs.append(_spawn_mailroom(data_dir, port))
            while True:
                line = lines.get(timeout=SCENARIO_TIMEOUT_S)
                if line is None:
                    break
                if line.startswith("recovery_events="):
                    recovered_after = time.monotonic() - restarted
                out.append(line)
            assert java.wait(timeout=10) == 0, f"driver failed: {out}\n{_read(stderr)}"
        finally:
            if java.poll() is None:
                java.kill()
                java.wait()
            for p in procs:
                _stop(p, signal.SIGTERM)
    seen = parse("".join(out))
    if recovered_after is not None:
        print(f"recovered {recovered_after:.2f} s after the restart began")
    assert seen["before"] == "before,before"
    expected_close = "shutdown:320" if stop_signal == signal.SIGTERM else "shutdown:io"
    assert seen["inflight_unacked"] == "inflight/redelivered=false"
    assert seen["inflight_after_recovery"] == "inflight/redelivered=true"
    assert seen["recovery_events"] == f"{expected_close},started,recovered"
    assert seen["connection_open"] == "true"
    assert seen["channel_open"] == "true"
    # The server-named queue did not survive the restart: the client declared a new one and moved its
    # binding and consumer to it.
    assert seen["server_named_queue_renamed"] == "true"
    assert seen["server_named_queue_new_prefix"] == "true"
    assert seen["after_confirmed"] == "true"
    assert seen["after"] == "after,after"
    assert seen["after_consumer_tags_kept"] == "true,true"
    assert seen["after_redelivered"] == "false,false"
    assert seen["durable_extra_delivery"] == "null"
    assert seen["durable_queue"] == "messages=0/consumers=1"
    assert seen["closed"] == "true"


def _read(f):
    f.seek(0)
    return f.read()[-4000:]
