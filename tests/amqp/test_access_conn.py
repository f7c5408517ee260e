"""Connection-level access (issue 15) with pika: a deleted user's or vhost's connections are closed, and
connection limits hold under concurrent opens, on Mailroom and on the local RabbitMQ; SASL EXTERNAL over
TLS with client certificates (a CA made here with openssl) and the PROXY protocol v1/v2, on Mailroom only
(the local RabbitMQ has neither a TLS nor a PROXY protocol listener).

Users and vhosts are made with Mailroom's HTTP API or `rabbitmqctl` (uniquely named, deleted afterwards).
"""
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse

import pika
import pika.credentials
import pika.exceptions
import pytest

from brokers import free_port, start_mailroom, targets
from test_access import MailroomAdmin, closed_with, connect, target, mailroom_with_api, uid  # noqa: F401


def wait_closed(conn, timeout=10):
    """Pumps `conn` until the broker closes it; returns (reply code, reply text)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.1)
    except pika.exceptions.ConnectionClosedByBroker as e:
        return e.reply_code, e.reply_text
    raise AssertionError("the connection was not closed by the broker")


@pytest.fixture
def user_and_vhost(target):
    """A fresh vhost and a fresh user 'pw' with every permission there (and guest too); deleted at teardown."""
    broker, admin = target
    vhost, user = uid("cvh"), uid("cu")
    admin.add_vhost(vhost)
    admin.add_user(user, "pw")
    admin.set_permissions(vhost, user, ".*", ".*", ".*")
    admin.set_permissions(vhost, "guest", ".*", ".*", ".*")
    try:
        yield broker, admin, vhost, user
    finally:
        admin.delete_user(user)
        admin.delete_vhost(vhost)


def test_deleting_a_user_closes_its_connections_with_320(user_and_vhost):
    broker, admin, vhost, user = user_and_vhost
    conns = [connect(broker, user, "pw", vhost) for _ in range(2)]
    bystander = connect(broker, "guest", "guest", vhost)
    try:
        admin.delete_user(user)
        for c in conns:
            assert wait_closed(c) == (320, f"CONNECTION_FORCED - user '{user}' is deleted")
        bystander.process_data_events(time_limit=0.2)
        assert bystander.is_open
    finally:
        bystander.close()


def test_deleting_a_vhost_closes_its_connections_with_320(user_and_vhost):
    broker, admin, vhost, user = user_and_vhost
    conn = connect(broker, user, "pw", vhost)
    elsewhere = connect(broker, "guest", "guest", "/")
    try:
        admin.delete_vhost(vhost)
        expected = [(320, f"CONNECTION_FORCED - vhost '{vhost}' is deleted")]
        if broker.name == "rabbitmq":
            # RabbitMQ 3.10 closes them from two places that race: the vhost_deleted event handler ("is
            # deleted", what Mailroom always says) and the vhost supervisor stopping ("is down").
            expected.append((320, f"CONNECTION_FORCED - vhost '{vhost}' is down"))
        assert wait_closed(conn) in expected
        elsewhere.process_data_events(time_limit=0.2)
        assert elsewhere.is_open
    finally:
        elsewhere.close()


def open_concurrently(broker, user, vhost, n):
    """Opens `n` connections from `n` threads released together; returns (open connections, refusals)."""
    barrier = threading.Barrier(n)
    opened, refused, lock = [], [], threading.Lock()

    def one():
        barrier.wait()
        try:
            c = connect(broker, user, "pw", vhost)
            with lock:
                opened.append(c)
        except pika.exceptions.AMQPConnectionError as e:
            with lock:
                refused.append(closed_with(e))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return opened, refused


def check_admitted(broker, opened, refused, limit, n):
    """Mailroom admits exactly `limit`. RabbitMQ 3.10 counts connections in its tracking tables, updated
    after a connection opens, so concurrent opens get past its limit (observed here: 12 of 12 admitted
    with a limit of 3): for it only 'at least the limit, the rest refused with 530' holds."""
    print(f"{broker.name}: {len(opened)} of {n} admitted with limit {limit}")
    if broker.name == "mailroom":
        assert len(opened) == limit, refused
    else:
        assert len(opened) >= limit, refused
    assert len(opened) + len(refused) == n
    for code, text in refused:
        assert code == 530 or "530" in text, text


def test_user_connection_limit_under_concurrent_opens(user_and_vhost):
    broker, admin, vhost, user = user_and_vhost
    admin.set_user_limit(user, "max-connections", 3)
    opened, refused = open_concurrently(broker, user, vhost, 12)
    try:
        check_admitted(broker, opened, refused, 3, 12)
    finally:
        for c in opened:
            c.close()


def test_vhost_connection_limit_under_concurrent_opens(user_and_vhost):
    broker, admin, vhost, user = user_and_vhost
    admin.set_vhost_limit(vhost, "max-connections", 4)
    opened, refused = open_concurrently(broker, user, vhost, 12)
    try:
        check_admitted(broker, opened, refused, 4, 12)
    finally:
        for c in opened:
            c.close()


# ---- TLS and EXTERNAL (Mailroom only) -------------------------------------------------------------------

mailroom_only = pytest.mark.skipif("mailroom" not in targets(), reason="Mailroom only")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


class Pki:
    """A CA made with openssl in `d`, and certificates it signs (EC P-256, fast to make)."""

    def __init__(self, d):
        self.d = d
        self.run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-days", "2", "-subj", "/CN=access-conn test CA", "-keyout", "ca.key", "-out", "ca.pem")
        self.ca = d / "ca.pem"
        (d / "index.txt").write_text("")
        (d / "serial").write_text("1000\n")
        (d / "ca.cnf").write_text(
            "[ca]\ndefault_ca = tca\n[tca]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
            "default_md = sha256\npolicy = anything\nunique_subject = no\ncopy_extensions = none\n"
            "[anything]\norganizationName = optional\ncommonName = supplied\n")

    def run(self, *args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.d, timeout=60)

    def issue(self, name, subject, ext, expired=False):
        """A certificate for `subject` (openssl -subj form) with extensions `ext`; returns (cert, key)."""
        self.run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", subject,
                 "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (self.d / f"{name}.ext").write_text(ext)
        dates = ["-startdate", "20200101000000Z", "-enddate", "20210101000000Z"] if expired else ["-days", "2"]
        self.run("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-notext",
                 "-extfile", f"{name}.ext", *dates, "-in", f"{name}.csr", "-out", f"{name}.pem")
        return self.d / f"{name}.pem", self.d / f"{name}.key"

    def server(self):
        return self.issue("server", "/CN=localhost",
                          "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                          "subjectAltName=DNS:localhost,IP:127.0.0.1\n")

    def client(self, name, subject, expired=False):
        return self.issue(name, subject, "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n", expired)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    return Pki(tmp_path_factory.mktemp("pki"))


def mailroom_tls(pki, *extra):
    """A Mailroom with an AMQPS listener requiring client certificates; yields (admin, amqps port)."""
    cert, key = pki.server()
    tls_port, http_port = free_port(), free_port()
    args = ["--http-listen", f"127.0.0.1:{http_port}", "--prometheus-listen", "off",
            "--amqps-listen", f"127.0.0.1:{tls_port}", "--tls-cert", str(cert), "--tls-key", str(key),
            "--tls-ca", str(pki.ca), *extra]
    return start_mailroom(args), MailroomAdmin(http_port), tls_port


def tls_params(pki, port, client=None, credentials=None):
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    return pika.ConnectionParameters("localhost", port, "/", credentials or pika.credentials.ExternalCredentials(),
                                     ssl_options=pika.SSLOptions(ctx, "localhost"),
                                     connection_attempts=1, retry_delay=0, socket_timeout=10)


def grant(admin, user):
    admin.add_user(user, "unused-password")
    admin.set_permissions("/", user, ".*", ".*", ".*")


@mailroom_only
def test_external_with_the_distinguished_name(pki):
    server, admin, port = mailroom_tls(pki, "--tls-verify", "required")
    with server:
        grant(admin, "CN=alice,O=Org")
        alice = pki.client("alice", "/O=Org/CN=alice")
        conn = pika.BlockingConnection(tls_params(pki, port, alice))
        conn.channel().queue_declare("", exclusive=True)
        listed = admin.ok("GET", "/connections")
        assert [c["user"] for c in listed] == ["CN=alice,O=Org"]
        conn.close()
        # A certificate naming no user: 403 as for PLAIN.
        bob = pki.client("bob", "/O=Org/CN=bob")
        with pytest.raises(pika.exceptions.AMQPConnectionError) as e:
            pika.BlockingConnection(tls_params(pki, port, bob))
        assert "403" in str(e.value) or "ACCESS_REFUSED" in str(e.value), e.value
        # A client certificate is required, even for PLAIN.
        grant(admin, "carol")
        with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError, OSError)):
            pika.BlockingConnection(tls_params(pki, port, None, pika.PlainCredentials("carol", "unused-password")))
        # An expired certificate from the same CA is refused.
        old = pki.client("old-alice", "/O=Org/CN=alice", expired=True)
        with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError, OSError)):
            pika.BlockingConnection(tls_params(pki, port, old))


@mailroom_only
def test_external_with_the_common_name(pki):
    server, admin, port = mailroom_tls(pki, "--tls-verify", "required", "--ssl-cert-login-from", "common_name")
    with server:
        grant(admin, "alice")
        conn = pika.BlockingConnection(tls_params(pki, port, pki.client("cn-alice", "/O=Org/CN=alice")))
        assert [c["user"] for c in admin.ok("GET", "/connections")] == ["alice"]
        conn.close()


@mailroom_only
def test_external_is_offered_only_with_a_verified_certificate(pki):
    server, admin, port = mailroom_tls(pki, "--tls-verify", "optional", "--ssl-cert-login-from", "common_name")
    with server:
        grant(admin, "alice")
        # No client certificate: pika finds no EXTERNAL in connection.start and gives up; PLAIN works.
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(tls_params(pki, port, None))
        plain = pika.BlockingConnection(
            tls_params(pki, port, None, pika.PlainCredentials("alice", "unused-password")))
        plain.close()
        with_cert = pika.BlockingConnection(tls_params(pki, port, pki.client("opt-alice", "/CN=alice")))
        with_cert.close()


# ---- PROXY protocol (Mailroom only) ---------------------------------------------------------------------

def v2_header(src, sport, dst, dport):
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
            + socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport))


class ProxyRelay:
    """A local proxy: accepts pika, connects to Mailroom, writes `header`, then pipes both ways."""

    def __init__(self, upstream_port, header):
        self.upstream_port, self.header = upstream_port, header
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            server.sendall(self.header)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def port_of(broker):
    return urllib.parse.urlparse(broker.url).port


@mailroom_only
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_gives_the_client_address(version):
    http_port = free_port()
    with start_mailroom(["--http-listen", f"127.0.0.1:{http_port}", "--prometheus-listen", "off",
                         "--proxy-protocol"]) as broker:
        admin = MailroomAdmin(http_port)
        user = uid("remote")
        admin.add_user(user, "pw")
        admin.set_permissions("/", user, ".*", ".*", ".*")
        header = (b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 5672\r\n" if version == "v1"
                  else v2_header("192.0.2.7", 56324, "10.0.0.1", 5672))
        relay = ProxyRelay(port_of(broker), header)
        try:
            params = lambda u, p: pika.ConnectionParameters("127.0.0.1", relay.port, "/",
                                                            pika.PlainCredentials(u, p), connection_attempts=1)
            conn = pika.BlockingConnection(params(user, "pw"))
            listed = admin.ok("GET", "/connections")
            assert [(c["peer_host"], c["peer_port"]) for c in listed] == [("192.0.2.7", 56324)]
            conn.close()
            # guest is loopback-only, and the header says the client is not on loopback.
            with pytest.raises(pika.exceptions.ProbableAuthenticationError):
                pika.BlockingConnection(params("guest", "guest"))
        finally:
            relay.close()
        # Straight to the port, without a header: closed without an answer.
        with socket.create_connection(("127.0.0.1", port_of(broker)), timeout=10) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            assert s.recv(64) == b""
