"""`mailroom admin peek` and `redrive` against a Mailroom server (RabbitMQ has no equivalent without plugins)."""
import json
import shutil
import subprocess
import time
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
    out = subprocess.run([mailroom_bin(), "admin", "--url", f"http://127.0.0.1:{port}", "--json", *args],
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


def test_kill9_mid_redrive_loses_nothing(tmp_path):
    """SIGKILL the broker while a redrive runs: after a restart every message is in the DLQ or the target
    (a copy in both is a permitted duplicate, counted)."""
    import signal
    import time

    from brokers import _wait_listening

    n = 5000
    amqp_port, http_port = free_port(), free_port()
    cmd = [mailroom_bin(), "server", "--amqp-listen", f"127.0.0.1:{amqp_port}", "--http-listen",
           f"127.0.0.1:{http_port}", "--prometheus-listen", "127.0.0.1:0", "--data-dir", str(tmp_path),
           "--log-level", "warn"]
    procs = []

    def spawn():
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        procs.append(p)
        _wait_listening(amqp_port, p, 20)
        return p

    url = f"amqp://guest:guest@127.0.0.1:{amqp_port}/%2F"
    try:
        proc = spawn()
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        ch.queue_declare("crash-dlq", durable=True)
        ch.queue_declare("crash-target", durable=True)
        for i in range(n):
            ch.basic_publish("", "crash-dlq", f"{i}".encode(), pika.BasicProperties(delivery_mode=2))
        ch.confirm_delivery()
        ch.basic_publish("", "crash-dlq", b"last", pika.BasicProperties(delivery_mode=2))  # fsync covers all
        assert ch.queue_declare("crash-dlq", durable=True, passive=True).method.message_count == n + 1
        conn.close()
        redrive = subprocess.Popen([mailroom_bin(), "admin", "--url", f"http://127.0.0.1:{http_port}",
                                    "redrive", "crash-dlq", "--to-queue", "crash-target"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        redrive.wait(timeout=30)
        spawn()
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        seen = {}
        counts = {}
        for q in ("crash-dlq", "crash-target"):
            counts[q] = 0
            while True:
                m, _, body = ch.basic_get(q, auto_ack=True)
                if m is None:
                    break
                counts[q] += 1
                seen[body] = seen.get(body, 0) + 1
        conn.close()
        expected = {f"{i}".encode() for i in range(n)} | {b"last"}
        assert set(seen) == expected, f"lost {len(expected - set(seen))} messages"
        duplicates = sum(c - 1 for c in seen.values())
        print(f"redrive crash: {counts}, {duplicates} duplicates of {n + 1}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def admin_text(port, *args):
    """`mailroom admin` without --json: the human table."""
    return subprocess.run([mailroom_bin(), "admin", "--url", f"http://127.0.0.1:{port}", *args],
                          check=True, capture_output=True, timeout=30, text=True).stdout


def test_every_resource_through_the_cli(server, tmp_path):
    broker, port = server
    tag = uuid.uuid4().hex[:8]
    q, x = f"cli-q-{tag}", f"cli-x-{tag}"
    admin(port, "declare", "exchange", x, "--type", "topic")
    admin(port, "declare", "queue", q, "--arguments", '{"x-max-length": 100}')
    admin(port, "declare", "binding", x, q, "--routing-key", "a.#")
    table = admin_text(port, "list", "queues")
    header = table.splitlines()[0].split()
    assert header[:2] == ["name", "durable"] and "messages_ready" in header
    assert any(line.split()[0] == q for line in table.splitlines()[1:]), table
    assert any(e["name"] == x and e["type"] == "topic" for e in admin(port, "list", "exchanges"))
    assert any(b["source"] == x and b["destination"] == q and b["routing_key"] == "a.#"
               for b in admin(port, "list", "bindings"))
    assert admin(port, "publish", "hello", "--exchange", x, "--routing-key", "a.b") == {"routed": True}
    admin(port, "publish", "second", "--routing-key", q)
    got = admin(port, "get", q, "--count", "2", "--ackmode", "ack_requeue_true")
    assert [m["payload"] for m in got] == ["hello", "second"]
    assert "hello" in admin_text(port, "get", q)
    assert admin(port, "purge", q) == {"purged": q}
    assert admin(port, "get", q) == []
    # A client connection shows in the list and closes on request, with the reason sent to the client.
    conn = pika.BlockingConnection(broker.params())
    conn.channel().basic_consume(q, lambda *a: None, consumer_tag="cli-consumer")
    conns = []
    for _ in range(50):
        conns = admin(port, "list", "connections")
        if conns:
            break
        time.sleep(0.1)
    assert len(conns) == 1 and conns[0]["user"] == "guest"
    assert any(c["queue"]["name"] == q and c["consumer_tag"] == "cli-consumer"
               for c in admin(port, "list", "consumers"))
    admin(port, "close-connection", conns[0]["name"], "--reason", "maintenance")
    with pytest.raises(pika.exceptions.ConnectionClosed) as closed:
        for _ in range(50):
            conn.process_data_events(time_limit=0.1)
    assert closed.value.reply_code == 320 and "maintenance" in closed.value.reply_text
    # Definitions round trip: export, delete, import brings the queue, exchange and binding back.
    path = tmp_path / "defs.json"
    admin(port, "definitions", "export", "--file", str(path))
    assert any(d["name"] == q for d in json.loads(path.read_text())["queues"])
    admin(port, "delete", "binding", x, q, "--properties-key", "a.#")
    admin(port, "delete", "queue", q)
    admin(port, "delete", "exchange", x)
    assert not any(e["name"] == q for e in admin(port, "list", "queues"))
    admin(port, "definitions", "import", str(path))
    assert any(e["name"] == q for e in admin(port, "list", "queues"))
    assert any(b["source"] == x and b["destination"] == q for b in admin(port, "list", "bindings"))
    for what in ("channels", "vhosts", "policies", "nodes"):
        assert isinstance(admin(port, "list", what), list), what
        assert admin_text(port, "list", what)


def admin_fails(port, *args):
    out = subprocess.run([mailroom_bin(), "admin", "--url", f"http://127.0.0.1:{port}", "--json", *args],
                         capture_output=True, timeout=30, text=True)
    assert out.returncode != 0, out.stdout
    return out.stderr


def can_open(broker, user, password, vhost):
    try:
        pika.BlockingConnection(broker.params(credentials=pika.PlainCredentials(user, password),
                                              virtual_host=vhost, connection_attempts=1)).close()
        return True
    except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError,
            pika.exceptions.ConnectionClosedByBroker, pika.exceptions.AMQPConnectionError):
        return False


def test_users_permissions_vhosts_and_limits_through_the_cli(server):
    broker, port = server
    tag = uuid.uuid4().hex[:8]
    user, vhost = f"cli-user-{tag}", f"cli-vhost-{tag}"
    admin(port, "vhost", "add", vhost)
    assert any(v["name"] == vhost for v in admin(port, "vhost", "list"))
    assert admin(port, "user", "add", user, "--password", "s3cret", "--tags", "monitoring,management") == \
        {"user": user, "tags": ["monitoring", "management"]}
    listed = {u["name"]: u for u in admin(port, "user", "list")}
    assert sorted(listed[user]["tags"]) == ["management", "monitoring"]
    assert user in admin_text(port, "user", "list")
    # No permission on the vhost yet: refused; after `permission set`: in; after `clear`: refused again.
    assert not can_open(broker, user, "s3cret", vhost)
    admin(port, "--vhost", vhost, "permission", "set", user, "^cli-", ".*", ".*")
    perms = admin(port, "permission", "list", "--user", user)
    assert perms == [{"user": user, "vhost": vhost, "configure": "^cli-", "write": ".*", "read": ".*"}]
    table = admin_text(port, "permission", "list")
    assert table.splitlines()[0].split() == ["user", "vhost", "configure", "write", "read"]
    assert can_open(broker, user, "s3cret", vhost)
    # The configure pattern is enforced: a queue outside it is refused with 403.
    conn = pika.BlockingConnection(broker.params(credentials=pika.PlainCredentials(user, "s3cret"),
                                                 virtual_host=vhost))
    ch = conn.channel()
    ch.queue_declare(f"cli-{tag}")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        ch.queue_declare(f"other-{tag}")
    assert refused.value.reply_code == 403
    conn.close()
    # Updating the tags keeps the password; a new password replaces the old one.
    admin(port, "user", "update", user, "--tags", "administrator")
    assert next(u for u in admin(port, "user", "list") if u["name"] == user)["tags"] == ["administrator"]
    assert can_open(broker, user, "s3cret", vhost)
    subprocess.run([mailroom_bin(), "admin", "--url", f"http://127.0.0.1:{port}", "user", "update", user,
                    "--password-stdin"], input="n3w\n", check=True, capture_output=True, timeout=30, text=True)
    assert not can_open(broker, user, "s3cret", vhost) and can_open(broker, user, "n3w", vhost)
    # Topic permissions.
    admin(port, "--vhost", vhost, "topic-permission", "set", user, "amq.topic", "^orders\\.", "^orders\\.")
    assert admin(port, "topic-permission", "list", "--user", user) == [
        {"user": user, "vhost": vhost, "exchange": "amq.topic", "write": "^orders\\.", "read": "^orders\\."}]
    admin(port, "--vhost", vhost, "topic-permission", "clear", user)
    assert admin(port, "topic-permission", "list", "--user", user) == []
    # Limits: a vhost connection limit of 0 refuses the user's connection; clearing it lets it in.
    admin(port, "--vhost", vhost, "vhost-limit", "set", "max-connections", "0")
    assert {"vhost": vhost, "value": {"max-connections": 0}} in admin(port, "vhost-limit", "list")
    assert not can_open(broker, user, "n3w", vhost)
    admin(port, "--vhost", vhost, "vhost-limit", "clear", "max-connections")
    assert can_open(broker, user, "n3w", vhost)
    admin(port, "user-limit", "set", user, "max-connections", "0")
    assert {"user": user, "value": {"max-connections": 0}} in admin(port, "user-limit", "list")
    assert not can_open(broker, user, "n3w", vhost)
    admin(port, "user-limit", "clear", user, "max-connections")
    assert can_open(broker, user, "n3w", vhost)
    assert "unknown vhost limit" in admin_fails(port, "vhost-limit", "set", "max-bananas", "1")
    admin(port, "--vhost", vhost, "permission", "clear", user)
    assert admin(port, "permission", "list", "--user", user) == []
    assert not can_open(broker, user, "n3w", vhost)
    # Deleting: the user can no longer log in, the vhost is gone; deleting again says why it fails.
    admin(port, "user", "delete", user)
    admin(port, "vhost", "delete", vhost)
    assert not any(u["name"] == user for u in admin(port, "user", "list"))
    assert not any(v["name"] == vhost for v in admin(port, "vhost", "list"))
    assert "HTTP 404" in admin_fails(port, "user", "delete", user)


def test_redrive_shows_progress(server):
    broker, port = server
    tag = uuid.uuid4().hex[:8]
    work, dlq = f"pwork-{tag}", f"pdlq-{tag}"
    conn = pika.BlockingConnection(broker.params())
    ch = conn.channel()
    ch.queue_declare(work)
    ch.queue_declare(dlq)
    n = 20000
    for i in range(n):
        ch.basic_publish("", dlq, b"x" * 64)
    ch.queue_declare(dlq, passive=True)  # a round trip: every publish has arrived
    out = subprocess.run([mailroom_bin(), "admin", "--url", f"http://127.0.0.1:{port}", "--json", "--progress",
                          "redrive", dlq, "--to-queue", work], check=True, capture_output=True, timeout=120,
                         text=True)
    assert json.loads(out.stdout) == {"moved": n, "skipped": 0}
    lines = [line for line in out.stderr.splitlines() if line.startswith("redriving: ")]
    # Each line reads "redriving: MOVED/TOTAL moved, ..." (a fast redrive may finish before the first).
    for line in lines:
        moved, total = line.split()[1].split("/")
        assert total == str(n) and 0 <= int(moved) <= n, line
    assert ch.queue_declare(work, passive=True).method.message_count == n
    conn.close()


def make_cert(d):
    """A CA and a certificate for 127.0.0.1 signed by it (openssl)."""
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d, timeout=60)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=admin-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
        "-out", "server.csr")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "server.ext", "-out", "server.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_admin_over_https(server, tmp_path):
    """`--url https://...` through a TLS-terminating proxy in front of the HTTP API: with --cacert the
    certificate is checked (a wrong CA fails), with --insecure it is not (and a warning says so)."""
    import socket
    import ssl
    import threading

    broker, port = server
    ca, cert, key = make_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))
    tls_port = listener.getsockname()[1]
    stop = threading.Event()

    def pipe(src, dst):
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                continue
            try:
                client = ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", port))
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    url = f"https://127.0.0.1:{tls_port}"
    try:
        def run(*args):
            return subprocess.run([mailroom_bin(), "admin", "--url", url, "--json", *args],
                                  capture_output=True, timeout=30, text=True)
        ok = run("--cacert", str(ca), "vhost", "list")
        assert ok.returncode == 0, ok.stderr
        assert any(v["name"] == "/" for v in json.loads(ok.stdout))
        (tmp_path / "other").mkdir()
        other_ca, _, _ = make_cert(tmp_path / "other")
        bad = run("--cacert", str(other_ca), "vhost", "list")
        assert bad.returncode != 0 and "TLS" in bad.stderr, bad.stderr
        insecure = run("--insecure", "vhost", "list")
        assert insecure.returncode == 0 and "warning: --insecure" in insecure.stderr, insecure.stderr
    finally:
        stop.set()
        listener.close()
