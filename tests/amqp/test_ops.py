"""Operating a Mailroom server: the Prometheus listener, the config file, --print-config, JSON logs with the
connection lifecycle, shell completions (Mailroom-only; RabbitMQ's equivalents are plugins and rabbitmq.conf)."""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pika
import pytest

from brokers import free_port, mailroom_bin, start_mailroom, targets

pytestmark = pytest.mark.skipif("mailroom" not in targets(), reason="Mailroom-only operations")


def scrape(port, path="/metrics"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()


def samples(text):
    """{(name, labels): value} of a 0.0.4 text page; labels as the raw `k="v",...` string."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        out[(name, labels.rstrip("}"))] = float(value)
    return out


@contextlib.contextmanager
def json_log_server(*extra, prometheus="off"):
    """A Mailroom server with JSON logs on a free port, listening when this yields `(port, log)`; `log` is
    filled with the parsed log lines once the server has stopped."""
    port = free_port()
    log = []
    with tempfile.TemporaryDirectory(prefix="mailroom-ops-") as d:
        proc = subprocess.Popen([mailroom_bin(), "server", "--amqp-listen", f"127.0.0.1:{port}", "--data-dir", d,
                                 "--http-listen", "127.0.0.1:0", "--prometheus-listen", prometheus,
                                 "--log-format", "json", *extra],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
            yield port, log
        finally:
            proc.terminate()
            stderr = proc.communicate(timeout=20)[1].decode()
            log.extend(json.loads(line) for line in stderr.splitlines() if line.strip())


def test_prometheus_listener_counts_amqp_traffic():
    prom = free_port()
    with start_mailroom(["--prometheus-listen", f"127.0.0.1:{prom}"]) as b:
        before = samples(scrape(prom)[1])
        conn = pika.BlockingConnection(b.params())
        ch = conn.channel()
        ch.confirm_delivery()
        q = ch.queue_declare("", exclusive=True).method.queue
        for i in range(5):
            ch.basic_publish("", q, b"m%d" % i)
        for _ in range(5):
            method, _, _ = ch.basic_get(q)
            ch.basic_ack(method.delivery_tag)
        ch.basic_publish("", q, b"left")
        content_type, text = scrape(prom)
        assert content_type.startswith("text/plain; version=0.0.4")
        after = samples(text)
        amqp = 'protocol="amqp091"'
        classic = 'protocol="amqp091",queue_type="rabbit_classic_queue"'

        def grew(name, labels, by):
            assert after[(name, labels)] - before.get((name, labels), 0) == by, name

        grew("rabbitmq_global_messages_received_total", amqp, 6)
        grew("rabbitmq_global_messages_confirmed_total", amqp, 6)
        grew("rabbitmq_global_messages_delivered_get_manual_ack_total", classic, 5)
        grew("rabbitmq_global_messages_acknowledged_total", classic, 5)
        assert after[("rabbitmq_connections", "")] == 1
        assert after[("rabbitmq_channels", "")] == 1
        assert after[("rabbitmq_queue_messages_ready", "")] == 1
        per_object = samples(scrape(prom, "/metrics/per-object")[1])
        assert per_object[("rabbitmq_queue_messages_ready", f'vhost="/",queue="{q}"')] == 1
        conn.close()
        if shutil.which("promtool"):
            for path in ("/metrics", "/metrics/per-object"):
                check = subprocess.run(["promtool", "check", "metrics"], input=scrape(prom, path)[1],
                                       capture_output=True, text=True, timeout=30)
                assert check.returncode == 0, check.stdout + check.stderr


def test_config_file_with_env_and_flags_over_it():
    with tempfile.TemporaryDirectory(prefix="mailroom-config-") as d:
        path = os.path.join(d, "mailroom.toml")
        with open(path, "w") as f:
            f.write('heartbeat = 7\nframe_max = 65536\nlog-level = "debug"\nproduct-name = "FromFile"\n'
                    'amqp-listen = ["127.0.0.1:0"]\n')
        env = dict(os.environ, MAILROOM_FRAME_MAX="131072")
        out = subprocess.run([mailroom_bin(), "server", "--config", path, "--log-level", "warn", "--print-config"],
                             env=env, capture_output=True, text=True, timeout=30, check=True).stdout
        assert re.search(r"^heartbeat = 7  # config file$", out, re.M), out
        assert re.search(r"^frame-max = 131072  # environment MAILROOM_FRAME_MAX$", out, re.M), out
        assert re.search(r'^log-level = "warn"  # command line$', out, re.M), out
        assert re.search(r'^amqp-listen = \["127.0.0.1:0"\]  # config file$', out, re.M), out
        assert re.search(r"^consumer-timeout-ms = 1800000  # default$", out, re.M), out
        # What --print-config prints is itself a config file that reproduces the same configuration.
        printed = os.path.join(d, "printed.toml")
        with open(printed, "w") as f:
            f.write(out)
        again = subprocess.run([mailroom_bin(), "server", "--config", printed, "--print-config"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
        strip = lambda s: [line.split("  #")[0] for line in s.splitlines()]  # noqa: E731
        assert strip(again) == strip(out)
        # An unknown key is refused with the closest flag's name.
        with open(path, "a") as f:
            f.write("data-dirr = '/tmp'\n")
        bad = subprocess.run([mailroom_bin(), "server", "--config", path, "--print-config"],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0 and "unknown key `data-dirr`" in bad.stderr and "data-dir" in bad.stderr


def test_json_logs_tell_the_connection_lifecycle():
    with json_log_server() as (port, lines):
        params = pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{port}/%2F")
        pika.BlockingConnection(params).close()
        # A client that vanishes without connection.close (here, in the middle of the handshake).
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"AMQP\x00\x00\x09\x01")
            raw.recv(4096)  # connection.start
        time.sleep(0.5)
    assert lines and all("\x1b[" not in json.dumps(line) for line in lines), "no ANSI codes in the log"
    messages = [line["fields"]["message"] for line in lines]
    assert any(m == "accepting AMQP connection" for m in messages), messages
    authenticated = [line for line in lines if line["fields"]["message"].startswith("connection authenticated")]
    assert authenticated and authenticated[0]["fields"]["user"] == "guest" and authenticated[0]["level"] == "INFO"
    assert "closing AMQP connection (the client closed it)" in messages, messages
    assert any("client unexpectedly closed TCP connection" in m for m in messages), messages


def test_worker_threads_sets_the_runtime_threads():
    """--worker-threads N runs connections and queues on N threads (the startup log says how many), and
    the broker works with one; 0 is refused."""
    for threads in ("1", "3"):
        with json_log_server("--worker-threads", threads) as (port, lines):
            conn = pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{port}/%2F"))
            ch = conn.channel()
            q = ch.queue_declare("", exclusive=True).method.queue
            for i in range(100):
                ch.basic_publish("", q, str(i).encode())
            got = [ch.basic_get(q, auto_ack=True)[2] for _ in range(100)]
            assert got == [str(i).encode() for i in range(100)]
            conn.close()
        started = [line for line in lines if line["fields"]["message"] == "runtime started"]
        assert started and started[0]["fields"]["worker_threads"] == int(threads), lines
    bad = subprocess.run([mailroom_bin(), "server", "--worker-threads", "0", "--print-config"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "worker-threads" in bad.stderr, bad.stderr


def test_completions_and_typo_suggestions():
    for shell in ("bash", "zsh", "fish"):
        out = subprocess.run([mailroom_bin(), "completions", shell], capture_output=True, text=True, timeout=30,
                             check=True).stdout
        assert "prometheus-listen" in out and "print-config" in out, shell
    typo = subprocess.run([mailroom_bin(), "server", "--data-dri", "x"], capture_output=True, text=True, timeout=30)
    assert typo.returncode == 2 and "--data-dir" in typo.stderr, typo.stderr


def test_alarm_set_and_cleared_are_logged_and_exported():
    prom = free_port()
    with json_log_server("--memory-high-watermark", "10000", prometheus=f"127.0.0.1:{prom}") as (port, lines):
        params = pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{port}/%2F")
        conn, other = pika.BlockingConnection(params), pika.BlockingConnection(params)
        ch = conn.channel()
        q = ch.queue_declare(f"alarm-{os.getpid()}").method.queue
        ch.basic_publish("", q, b"x" * 20000)  # above the 10,000-byte watermark: the memory alarm

        def alarm():
            return samples(scrape(prom)[1])[("rabbitmq_alarms_memory_used_watermark", "")]

        for _ in range(100):
            if alarm() == 1:
                break
            time.sleep(0.05)
        assert alarm() == 1
        # The publishing connection is blocked now; one that has not published still works.
        other.channel().queue_purge(q)
        for _ in range(100):
            if alarm() == 0:
                break
            time.sleep(0.05)
        assert alarm() == 0
        conn.close()
        other.close()
    alarms = [(line["level"], line["fields"]["message"]) for line in lines if line["fields"].get("alarm") == "memory"]
    assert [level for level, _ in alarms] == ["WARN", "INFO"], alarms
    assert alarms[0][1].startswith("memory resource limit alarm set on node mailroom@")
    assert alarms[1][1].startswith("memory resource limit alarm cleared on node mailroom@")
