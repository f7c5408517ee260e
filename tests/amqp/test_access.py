"""Users, vhosts, permissions and limits (issue 15): the same reply codes and closes on Mailroom and on
the local RabbitMQ.

Users, vhosts and permissions are set through Mailroom's HTTP API and, on RabbitMQ, with `rabbitmqctl`
(only uniquely named users and vhosts made here, deleted afterwards; plugins are never touched). Mailroom
runs its own server here, with its HTTP API on a free port (guest is its administrator, from loopback).
"""
import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pika
import pika.exceptions
import pytest

from brokers import free_port, rabbitmq_broker, start_mailroom, targets


def uid(prefix):
    return f"mr_acc_{prefix}_{uuid.uuid4().hex[:8]}"


class MailroomAdmin:
    """Sets users and permissions through Mailroom's HTTP API (as guest, its administrator)."""

    def __init__(self, http_port):
        self.base = f"http://127.0.0.1:{http_port}/api"

    def call(self, method, path, body=None, auth=("guest", "guest")):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        import base64
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                text = resp.read()
                return resp.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as e:
            text = e.read()
            return e.code, (json.loads(text) if text else None)

    def ok(self, method, path, body=None):
        status, answer = self.call(method, path, body)
        assert status in (200, 201, 204), (method, path, status, answer)
        return answer

    @staticmethod
    def q(name):
        return urllib.parse.quote(name, safe="")

    def add_vhost(self, name):
        self.ok("PUT", f"/vhosts/{self.q(name)}")

    def delete_vhost(self, name):
        self.call("DELETE", f"/vhosts/{self.q(name)}")

    def add_user(self, name, password, tags=""):
        self.ok("PUT", f"/users/{self.q(name)}", {"password": password, "tags": tags})

    def delete_user(self, name):
        self.call("DELETE", f"/users/{self.q(name)}")

    def set_permissions(self, vhost, user, configure, write, read):
        self.ok("PUT", f"/permissions/{self.q(vhost)}/{self.q(user)}",
                {"configure": configure, "write": write, "read": read})

    def set_topic_permissions(self, vhost, user, exchange, write, read):
        self.ok("PUT", f"/topic-permissions/{self.q(vhost)}/{self.q(user)}",
                {"exchange": exchange, "write": write, "read": read})

    def set_user_limit(self, user, name, value):
        self.ok("PUT", f"/user-limits/{self.q(user)}/{name}", {"value": value})

    def set_vhost_limit(self, vhost, name, value):
        self.ok("PUT", f"/vhost-limits/{self.q(vhost)}/{name}", {"value": value})


def rabbitmqctl(*args):
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout


class RabbitAdmin:
    """The same operations with rabbitmqctl on the shared RabbitMQ (own users and vhosts only)."""

    def add_vhost(self, name):
        rabbitmqctl("add_vhost", name)

    def delete_vhost(self, name):
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, timeout=60)

    def add_user(self, name, password, tags=""):
        rabbitmqctl("add_user", name, password)
        if tags:
            rabbitmqctl("set_user_tags", name, *tags.split(","))

    def delete_user(self, name):
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True, timeout=60)

    def set_permissions(self, vhost, user, configure, write, read):
        rabbitmqctl("set_permissions", "-p", vhost, user, configure, write, read)

    def set_topic_permissions(self, vhost, user, exchange, write, read):
        rabbitmqctl("set_topic_permissions", "-p", vhost, user, exchange, write, read)

    def set_user_limit(self, user, name, value):
        rabbitmqctl("set_user_limits", user, json.dumps({name: value}))

    def set_vhost_limit(self, vhost, name, value):
        rabbitmqctl("set_vhost_limits", "-p", vhost, json.dumps({name: value}))


@pytest.fixture(scope="module")
def mailroom_with_api():
    http_port = free_port()
    with start_mailroom(["--http-listen", f"127.0.0.1:{http_port}"]) as b:
        yield b, MailroomAdmin(http_port)


@pytest.fixture(params=targets())
def target(request):
    """(Broker, admin) for each target."""
    if request.param == "rabbitmq":
        if shutil.which("rabbitmqctl") is None:
            pytest.skip("rabbitmqctl not installed")
        return rabbitmq_broker(), RabbitAdmin()
    return request.getfixturevalue("mailroom_with_api")


@pytest.fixture
def scope(target):
    """A fresh vhost where guest has every permission and a fresh user with password 'pw' and none yet;
    both deleted at teardown."""
    broker, admin = target
    vhost, user = uid("vhost"), uid("user")
    admin.add_vhost(vhost)
    admin.add_user(user, "pw")
    admin.set_permissions(vhost, "guest", ".*", ".*", ".*")
    try:
        yield broker, admin, vhost, user
    finally:
        admin.delete_user(user)
        admin.delete_vhost(vhost)


def connect(broker, user, password, vhost):
    params = pika.ConnectionParameters(broker.host, broker.port, vhost, pika.PlainCredentials(user, password),
                                       connection_attempts=1, retry_delay=0, socket_timeout=10)
    return pika.BlockingConnection(params)


def closed_with(exc):
    """The (reply code, reply text) of a broker close, also when pika wraps it in a handshake error."""
    inner = exc
    if isinstance(exc, pika.exceptions.AMQPConnectionError) and exc.args and isinstance(exc.args[0], Exception):
        inner = exc.args[0]
    if isinstance(inner, (pika.exceptions.ConnectionClosedByBroker, pika.exceptions.ChannelClosedByBroker)):
        return inner.reply_code, inner.reply_text
    text = str(exc)
    return None, text


LOGIN_REFUSED = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile."


def test_wrong_password_is_refused_with_403(scope):
    broker, _admin, vhost, user = scope
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as e:
        connect(broker, user, "wrong", vhost)
    assert "(403)" in str(e.value) and LOGIN_REFUSED in str(e.value)


def test_unknown_user_is_refused_like_a_wrong_password(target):
    broker, _admin = target
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as e:
        connect(broker, uid("nobody"), "pw", "/")
    assert "(403)" in str(e.value) and LOGIN_REFUSED in str(e.value)


def test_vhost_without_permissions_is_refused_with_530(scope):
    broker, _admin, vhost, user = scope
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as e:
        connect(broker, user, "pw", vhost)
    assert "(530)" in str(e.value)
    assert f"NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'" in str(e.value)


def channel_refusal(broker, user, vhost, action, password="pw"):
    """Runs `action(channel)` as `user` and returns the channel close it caused."""
    conn = connect(broker, user, password, vhost)
    try:
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            action(ch)
        return e.value.reply_code, e.value.reply_text
    finally:
        if conn.is_open:
            conn.close()


def guest_setup(broker, vhost, action):
    conn = connect(broker, "guest", "guest", vhost)
    try:
        action(conn.channel())
    finally:
        conn.close()


def test_configure_denied_closes_the_channel_with_403(scope):
    broker, admin, vhost, user = scope
    admin.set_permissions(vhost, user, "^allowed$", ".*", ".*")
    code, text = channel_refusal(broker, user, vhost, lambda ch: ch.queue_declare("denied"))
    assert (code, text) == (403, f"ACCESS_REFUSED - access to queue 'denied' in vhost '{vhost}' refused for user '{user}'")
    code, text = channel_refusal(broker, user, vhost, lambda ch: ch.exchange_declare("denied_x", "direct"))
    assert (code, text) == (403, f"ACCESS_REFUSED - access to exchange 'denied_x' in vhost '{vhost}' refused for user '{user}'")
    # The allowed name works.
    conn = connect(broker, user, "pw", vhost)
    conn.channel().queue_declare("allowed", auto_delete=True)
    conn.close()


def test_write_denied_on_publish_closes_the_channel_with_403(scope):
    broker, admin, vhost, user = scope
    admin.set_permissions(vhost, user, ".*", "^$", ".*")

    def publish(ch):
        ch.confirm_delivery()
        ch.basic_publish("amq.direct", "k", b"m")

    code, text = channel_refusal(broker, user, vhost, publish)
    assert (code, text) == (403, f"ACCESS_REFUSED - access to exchange 'amq.direct' in vhost '{vhost}' refused for user '{user}'")

    def publish_default(ch):
        ch.confirm_delivery()
        ch.basic_publish("", "q", b"m")

    code, text = channel_refusal(broker, user, vhost, publish_default)
    assert (code, text) == (403, f"ACCESS_REFUSED - access to exchange 'amq.default' in vhost '{vhost}' refused for user '{user}'")


def test_write_denied_on_bind_closes_the_channel_with_403(scope):
    broker, admin, vhost, user = scope
    admin.set_permissions(vhost, user, ".*", "^$", ".*")
    guest_setup(broker, vhost, lambda ch: ch.queue_declare("bq"))
    code, text = channel_refusal(broker, user, vhost, lambda ch: ch.queue_bind("bq", "amq.direct", "k"))
    assert (code, text) == (403, f"ACCESS_REFUSED - access to queue 'bq' in vhost '{vhost}' refused for user '{user}'")


def test_read_denied_closes_the_channel_with_403(scope):
    broker, admin, vhost, user = scope
    admin.set_permissions(vhost, user, ".*", ".*", "^$")
    guest_setup(broker, vhost, lambda ch: ch.queue_declare("rq"))
    expected = (403, f"ACCESS_REFUSED - access to queue 'rq' in vhost '{vhost}' refused for user '{user}'")
    assert channel_refusal(broker, user, vhost, lambda ch: ch.basic_get("rq")) == expected
    assert channel_refusal(broker, user, vhost, lambda ch: ch.basic_consume("rq", lambda *a: None)) == expected
    assert channel_refusal(broker, user, vhost, lambda ch: ch.queue_purge("rq")) == expected
    code, text = channel_refusal(broker, user, vhost, lambda ch: ch.queue_bind("rq", "amq.direct", "k"))
    assert (code, text) == (403, f"ACCESS_REFUSED - access to exchange 'amq.direct' in vhost '{vhost}' refused for user '{user}'")


def test_topic_permission_denied_closes_the_channel_with_403(scope):
    broker, admin, vhost, user = scope
    admin.set_permissions(vhost, user, ".*", ".*", ".*")
    admin.set_topic_permissions(vhost, user, "amq.topic", "^allowed\\.", ".*")
    conn = connect(broker, user, "pw", vhost)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish("amq.topic", "allowed.x", b"m")  # no error
    conn.close()

    def publish(ch):
        ch.confirm_delivery()
        ch.basic_publish("amq.topic", "denied.x", b"m")

    code, text = channel_refusal(broker, user, vhost, publish)
    assert (code, text) == (
        403,
        f"ACCESS_REFUSED - access to topic 'denied.x' in exchange 'amq.topic' in vhost '{vhost}' refused for user '{user}'",
    )


def test_user_channel_limit_closes_the_connection_with_530(scope):
    broker, admin, vhost, user = scope
    admin.set_permissions(vhost, user, ".*", ".*", ".*")
    admin.set_user_limit(user, "max-channels", 1)
    conn = connect(broker, user, "pw", vhost)
    conn.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as e:
        conn.channel()
    assert e.value.reply_code == 530
    assert e.value.reply_text.startswith("NOT_ALLOWED - ")


def test_vhost_connection_limit_refuses_with_530(scope):
    broker, admin, vhost, user = scope
    admin.set_permissions(vhost, user, ".*", ".*", ".*")
    admin.set_vhost_limit(vhost, "max-connections", 1)
    first = connect(broker, user, "pw", vhost)
    try:
        with pytest.raises(pika.exceptions.AMQPConnectionError) as e:
            connect(broker, user, "pw", vhost)
        assert "(530)" in str(e.value), str(e.value)
    finally:
        first.close()


def test_vhost_queue_limit_closes_the_channel_with_406(scope):
    broker, admin, vhost, user = scope
    admin.set_permissions(vhost, user, ".*", ".*", ".*")
    admin.set_vhost_limit(vhost, "max-queues", 1)
    conn = connect(broker, user, "pw", vhost)
    try:
        ch = conn.channel()
        ch.queue_declare("q1")
        ch.queue_declare("q1")  # redeclaring is not creating
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_declare("q2")
        assert e.value.reply_code == 406
    finally:
        if conn.is_open:
            conn.close()


# ---- Mailroom only: users made through its HTTP API and imported from RabbitMQ ----

@pytest.fixture
def mailroom_scope(mailroom_with_api):
    broker, admin = mailroom_with_api
    user = uid("user")
    yield broker, admin, user
    admin.delete_user(user)


def test_a_user_created_through_the_http_api_logs_in(mailroom_scope):
    broker, admin, user = mailroom_scope
    status, _ = admin.call("PUT", f"/users/{user}", {"password": "s3cret", "tags": "management"})
    assert status == 201
    status, _ = admin.call("PUT", f"/permissions/%2F/{user}", {"configure": ".*", "write": ".*", "read": ".*"})
    assert status == 201
    conn = connect(broker, user, "s3cret", "/")
    conn.channel().queue_declare("", exclusive=True)
    conn.close()
    assert admin.call("GET", "/whoami", auth=(user, "s3cret")) == (200, {"name": user, "tags": ["management"]})
    # A management user may not manage users.
    assert admin.call("GET", "/users", auth=(user, "s3cret"))[0] == 401
    # A deleted user can no longer log in.
    assert admin.call("DELETE", f"/users/{user}")[0] == 204
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        connect(broker, user, "s3cret", "/")


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None or "rabbitmq" not in targets(),
                    reason="needs the local RabbitMQ and rabbitmqctl")
def test_a_user_imported_from_rabbitmq_logs_in_with_its_password(mailroom_scope):
    broker, admin, user = mailroom_scope
    rabbit = RabbitAdmin()
    rabbit.add_user(user, "from-rabbit", "monitoring")
    try:
        rabbit.set_permissions("/", user, "^x$", ".*", ".*")
        exported = json.loads(rabbitmqctl("export_definitions", "-"))
    finally:
        rabbit.delete_user(user)
    mine = [u for u in exported["users"] if u["name"] == user]
    assert mine and mine[0]["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    doc = {
        "users": mine,
        "permissions": [p for p in exported["permissions"] if p["user"] == user],
        "vhosts": [{"name": "/"}],
    }
    status, _ = admin.call("POST", "/definitions", doc)
    assert status in (200, 201, 204)
    got = admin.call("GET", f"/users/{user}")[1]
    assert got["password_hash"] == mine[0]["password_hash"] and got["tags"] == ["monitoring"]
    conn = connect(broker, user, "from-rabbit", "/")
    ch = conn.channel()
    ch.queue_declare("x", auto_delete=True)
    conn.close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        connect(broker, user, "wrong", "/")
    # The imported permissions hold: configure only on 'x'.
    code, text = channel_refusal(broker, user, "/", lambda c: c.queue_declare("y"), password="from-rabbit")
    assert (code, text) == (403, f"ACCESS_REFUSED - access to queue 'y' in vhost '/' refused for user '{user}'")


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None or "rabbitmq" not in targets(),
                    reason="needs the local RabbitMQ and rabbitmqctl")
def test_limits_imported_from_rabbitmq_hold(mailroom_scope):
    """A vhost limit and a user limit set on RabbitMQ, exported with rabbitmqctl and imported: both hold."""
    broker, admin, user = mailroom_scope
    vhost = f"{user}-v"
    rabbit = RabbitAdmin()
    rabbit.add_vhost(vhost)
    rabbit.add_user(user, "from-rabbit")
    try:
        rabbit.set_permissions(vhost, user, ".*", ".*", ".*")
        rabbit.set_permissions("/", user, ".*", ".*", ".*")
        rabbit.set_vhost_limit(vhost, "max-connections", 1)
        rabbit.set_user_limit(user, "max-connections", 2)
        exported = json.loads(rabbitmqctl("export_definitions", "-"))
    finally:
        rabbit.delete_user(user)
        rabbit.delete_vhost(vhost)
    doc = {
        "users": [u for u in exported["users"] if u["name"] == user],
        "vhosts": [v for v in exported["vhosts"] if v["name"] in (vhost, "/")],
        "permissions": [p for p in exported["permissions"] if p["user"] == user],
        "parameters": [p for p in exported.get("parameters", []) if p.get("vhost") == vhost],
    }
    assert doc["users"][0].get("limits") == {"max-connections": 2}, doc["users"]
    assert any(p["component"] == "vhost-limits" for p in doc["parameters"]), exported.get("parameters")
    status, _ = admin.call("POST", "/definitions", doc)
    assert status in (200, 201, 204)
    try:
        first = connect(broker, user, "from-rabbit", vhost)
        # The vhost's max-connections 1: a second connection to it is refused.
        with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
            connect(broker, user, "from-rabbit", vhost)
        assert "(530)" in str(refused.value) and "connection limit" in str(refused.value), str(refused.value)
        # The user's max-connections 2: one more elsewhere, then refused.
        second = connect(broker, user, "from-rabbit", "/")
        with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
            connect(broker, user, "from-rabbit", "/")
        assert "(530)" in str(refused.value), str(refused.value)
        first.close()
        second.close()
    finally:
        admin.call("DELETE", f"/vhosts/{urllib.parse.quote(vhost, safe='')}")


# ---- Mailroom only: AMQPS (--amqps-listen) and certificate reload on SIGHUP ----

def make_ca_and_server_cert(d, name):
    """A CA and a server certificate for 127.0.0.1 signed by it, made with openssl in directory `d`."""
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d, timeout=60)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}-ca",
        "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.pem")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", f"{name}.key", "-out", f"{name}.csr")
    (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.pem", "-CAkey", f"{name}-ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return d / f"{name}-ca.pem", d / f"{name}.pem", d / f"{name}.key"


def tls_connect(port, ca):
    import ssl
    ctx = ssl.create_default_context(cafile=str(ca))
    params = pika.ConnectionParameters("127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest"),
                                       ssl_options=pika.SSLOptions(ctx, "127.0.0.1"),
                                       connection_attempts=1, socket_timeout=10)
    return pika.BlockingConnection(params)


def pid_with_arg(arg):
    """The pid of the process whose command line holds `arg` (our own server's unique data dir)."""
    import os
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if arg.encode() in f.read().split(b"\0"):
                        return int(pid)
            except OSError:
                pass
    raise AssertionError(f"no process with argument {arg}")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
@pytest.mark.skipif("mailroom" not in targets(), reason="Mailroom only")
def test_amqps_listener_serves_tls_and_reloads_certificates_on_sighup(tmp_path):
    import os
    import signal
    import ssl
    import time
    ca1, cert1, key1 = make_ca_and_server_cert(tmp_path, "one")
    ca2, cert2, key2 = make_ca_and_server_cert(tmp_path, "two")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(cert1, live_cert)
    shutil.copy(key1, live_key)
    tls_port = free_port()
    data_dir = str(tmp_path / "data")
    with start_mailroom(["--http-listen", "127.0.0.1:0", "--amqps-listen", f"127.0.0.1:{tls_port}",
                         "--tls-cert", str(live_cert), "--tls-key", str(live_key)], data_dir=data_dir):
        old = tls_connect(tls_port, ca1)
        old.channel().queue_declare("", exclusive=True)
        shutil.copy(cert2, live_cert)
        shutil.copy(key2, live_key)
        os.kill(pid_with_arg(data_dir), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                new = tls_connect(tls_port, ca2)
                break
            except pika.exceptions.AMQPConnectionError:
                assert time.monotonic() < deadline, "the new certificate was not served after SIGHUP"
                time.sleep(0.2)
        new.channel().queue_declare("", exclusive=True)
        new.close()
        with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError)):
            tls_connect(tls_port, ca1)
        # The connection accepted before the reload keeps working.
        old.channel().queue_declare("", exclusive=True)
        old.close()
