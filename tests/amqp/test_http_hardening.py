"""The management HTTP listener's hardening on a real Mailroom (issue 15): the Host check against DNS
rebinding (with --http-allowed-hosts), cross-site request refusals, the body size limit, the HTTPS
listener (--https-listen with the AMQPS certificate flags, reloaded on SIGHUP), and the management
permission levels by tag. Where RabbitMQ's management API answers (RABBITMQ_MGMT_URL, e.g. the throwaway
oracle of tests/management/rabbitmq-oracle.sh), the permission cases and body-less PUTs are sent to it
too and the status codes compared.
"""
import base64
import contextlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.parse
import uuid

import pika
import pytest

from brokers import free_port, mailroom_bin, targets

pytestmark = pytest.mark.skipif("mailroom" not in targets(), reason="drives a Mailroom server")

RABBITMQ_MGMT_URL = os.environ.get("RABBITMQ_MGMT_URL", "http://127.0.0.1:35672")


def auth(user="guest", password="guest"):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request(port, method, path, body=None, headers=None, host=None, tls_context=None):
    """One request on its own connection: (status, parsed JSON or None)."""
    if tls_context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("localhost", port, timeout=10, context=tls_context)
    hdrs = {"Authorization": auth()}
    hdrs.update(headers or {})
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host or f"localhost:{port}")
    for k, v in hdrs.items():
        conn.putheader(k, v)
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    if data is not None:
        conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        parsed = json.loads(raw) if raw.strip() else None
    except ValueError:
        parsed = raw
    return resp.status, parsed


def make_cert(directory, name):
    """A self-signed certificate for localhost (openssl), as cert and key paths."""
    cert, key = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


@contextlib.contextmanager
def mailroom(extra=()):
    """A Mailroom with every listener on a free port; yields (process, http port); its AMQP port is
    `process.amqp_port`."""
    http_port, amqp_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="mailroom-http-hard-") as data:
        cmd = [mailroom_bin(), "server", "--amqp-listen", f"127.0.0.1:{amqp_port}", "--data-dir", data,
               "--http-listen", f"127.0.0.1:{http_port}", "--prometheus-listen", "off", "--log-level", "warn",
               *extra]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        proc.amqp_port = amqp_port
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    request(http_port, "GET", "/api/overview")
                    break
                except OSError:
                    assert proc.poll() is None, "mailroom exited"
                    assert time.monotonic() < deadline, "mailroom did not start"
                    time.sleep(0.05)
            yield proc, http_port
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server_process():
    with mailroom(["--http-allowed-hosts", "mq.internal,proxy.example:8080"]) as (proc, port):
        yield proc, port


@pytest.fixture(scope="module")
def server(server_process):
    return server_process[1]


def rabbit_port():
    """The RabbitMQ management port to compare with, or None."""
    url = urllib.parse.urlparse(RABBITMQ_MGMT_URL)
    try:
        status, body = request(url.port, "GET", "/api/overview", host=f"{url.hostname}:{url.port}")
    except OSError:
        return None
    return url.port if status == 200 and isinstance(body, dict) and "rabbitmq_version" in body else None


def test_host_header_must_name_loopback_or_an_allowed_host(server):
    for host in [f"localhost:{server}", f"127.0.0.1:{server}", f"[::1]:{server}", "mq.internal",
                 "MQ.INTERNAL:15672", "proxy.example:8080"]:
        assert request(server, "GET", "/api/overview", host=host)[0] == 200, host
    for host in ["evil.example", f"evil.example:{server}", "proxy.example:9090", "127.0.0.1.nip.io"]:
        status, body = request(server, "GET", "/api/overview", host=host)
        assert status == 403, host
        assert body["error"] == "access_refused"
        assert request(server, "GET", "/metrics", host=host)[0] == 403


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
])
def test_cross_site_mutations_are_refused(server, headers):
    vhost = f"csrf-{uuid.uuid4().hex[:8]}"
    status, body = request(server, "PUT", f"/api/vhosts/{vhost}", headers=headers)
    assert status == 403, body
    assert body["error"] == "cross_site_request"
    assert request(server, "GET", f"/api/vhosts/{vhost}")[0] == 404


@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded", "text/plain;charset=UTF-8", "multipart/form-data; boundary=b"])
def test_form_bodies_are_refused(server, content_type):
    name = f"form-{uuid.uuid4().hex[:8]}"
    status, body = request(server, "PUT", f"/api/queues/%2F/{name}", body={"durable": False},
                           headers={"Content-Type": content_type})
    assert status == 415, body
    assert set(body) == {"error", "reason"}
    assert request(server, "GET", f"/api/queues/%2F/{name}")[0] == 404


def test_same_origin_requests_pass(server):
    vhost = f"same-{uuid.uuid4().hex[:8]}"
    headers = {"Origin": f"http://localhost:{server}", "Sec-Fetch-Site": "same-origin",
               "Content-Type": "application/json"}
    assert request(server, "PUT", f"/api/vhosts/{vhost}", body={}, headers=headers)[0] == 201
    assert request(server, "DELETE", f"/api/vhosts/{vhost}", headers=headers)[0] == 204


def test_bodyless_put_needs_no_content_type(server):
    """RabbitMQ's docs: `curl -X PUT /api/vhosts/x` with no body. Same status on both brokers."""
    ports = [server] + ([rabbit_port()] if rabbit_port() else [])
    for port in ports:
        vhost = f"bare-{uuid.uuid4().hex[:8]}"
        host = f"localhost:{port}"
        assert request(port, "PUT", f"/api/vhosts/{vhost}", host=host)[0] == 201, port
        assert request(port, "DELETE", f"/api/vhosts/{vhost}", host=host)[0] == 204, port


def test_oversized_body_gets_413(server):
    name = f"big-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"arguments": {"x-note": "a" * (2 * 1024 * 1024)}}).encode()
    status, answer = request(server, "PUT", f"/api/queues/%2F/{name}", body=body,
                             headers={"Content-Type": "application/json"})
    assert status == 413
    assert answer["error"] == "payload_too_large"
    assert "body size limit" in answer["reason"]


# (method, path, body) cases sent as each user; the expected statuses are RabbitMQ's (checked against the
# oracle when it answers).
def permission_cases(mine, theirs):
    return [
        ("GET", "/api/overview", None),
        ("GET", "/api/vhosts", None),
        ("GET", f"/api/vhosts/{mine}", None),
        ("GET", f"/api/vhosts/{theirs}", None),
        ("GET", f"/api/queues/{theirs}", None),
        ("GET", f"/api/queues/{theirs}/q", None),
        ("GET", f"/api/queues/{mine}/q", None),
        ("GET", f"/api/exchanges/{theirs}", None),
        ("PUT", f"/api/queues/{theirs}/new", {"durable": False}),
        ("PUT", f"/api/queues/{mine}/new", {"durable": False}),
        ("DELETE", f"/api/queues/{mine}/new", None),
        ("PUT", f"/api/policies/{mine}/p", {"pattern": "^zz$", "definition": {"max-length": 1}}),
        ("PUT", f"/api/policies/{theirs}/p", {"pattern": "^zz$", "definition": {"max-length": 1}}),
        ("GET", "/api/users", None),
        ("PUT", f"/api/users/u-{mine}", {"password": "x", "tags": ""}),
        ("PUT", f"/api/vhosts/{mine}-new", None),
        ("DELETE", f"/api/vhosts/{theirs}", None),
        ("PUT", f"/api/permissions/{theirs}/guest", {"configure": ".*", "write": ".*", "read": ".*"}),
        ("GET", "/api/permissions", None),
        ("GET", "/api/nodes", None),
        ("GET", "/api/definitions", None),
        ("GET", "/api/whoami", None),
    ]


def run_permission_cases(port, tag_users, mine, theirs):
    """Creates the vhosts, queues and users on the broker at `port`, runs every case as every user;
    returns {(user tag, method, path): status} and the names each user's /api/vhosts and /api/queues list."""
    host = f"localhost:{port}"
    admin = {"Content-Type": "application/json"}
    for v in (mine, theirs):
        assert request(port, "PUT", f"/api/vhosts/{v}", host=host)[0] in (201, 204)
        assert request(port, "PUT", f"/api/queues/{v}/q", body={"durable": False}, headers=admin, host=host)[0] in (201, 204)
    statuses, lists = {}, {}
    try:
        for tag, user in tag_users.items():
            assert request(port, "PUT", f"/api/users/{user}", body={"password": "pw", "tags": tag},
                           headers=admin, host=host)[0] in (201, 204)
            if tag != "monitoring":
                assert request(port, "PUT", f"/api/permissions/{mine}/{user}",
                               body={"configure": ".*", "write": ".*", "read": ".*"}, headers=admin, host=host)[0] in (201, 204)
            headers = {"Authorization": auth(user, "pw"), "Content-Type": "application/json"}
            for method, path, body in permission_cases(mine, theirs):
                status, _ = request(port, method, path, body=body, headers=headers, host=host)
                statuses[(tag, method, path.replace(mine, "MINE").replace(theirs, "THEIRS"))] = status
            for path in ("/api/vhosts", "/api/queues"):
                status, body = request(port, "GET", path, headers=headers, host=host)
                lists[(tag, path)] = sorted((i.get("vhost", i["name"]), i["name"]) for i in body
                                            if i.get("vhost", i["name"]) in (mine, theirs))
    finally:
        for user in tag_users.values():
            request(port, "DELETE", f"/api/users/{user}", host=host)
        for v in (mine, theirs):
            request(port, "DELETE", f"/api/vhosts/{v}", host=host)
            request(port, "DELETE", f"/api/vhosts/{v}-new", host=host)
    return statuses, lists


TAGS = ["management", "policymaker", "monitoring"]


def test_tags_and_vhost_permissions_as_rabbitmq(server):
    suffix = uuid.uuid4().hex[:8]
    mine, theirs = f"mine-{suffix}", f"theirs-{suffix}"
    users = {tag: f"{tag}-{suffix}" for tag in TAGS}
    statuses, lists = run_permission_cases(server, users, mine, theirs)
    # What RabbitMQ's management plugin answers (rabbit_web_dispatch_access_control).
    for tag in TAGS:
        # Only users with permissions in a vhost reach its paths (monitoring included, as RabbitMQ 3.10).
        assert statuses[(tag, "GET", "/api/queues/MINE/q")] == (401 if tag == "monitoring" else 200)
        assert statuses[(tag, "GET", "/api/vhosts/MINE")] == 401
        assert statuses[(tag, "GET", "/api/users")] == 401
        assert statuses[(tag, "PUT", "/api/vhosts/MINE-new")] == 401
        assert statuses[(tag, "PUT", "/api/permissions/THEIRS/guest")] == 401
        assert statuses[(tag, "PUT", "/api/queues/THEIRS/new")] == 401
    for tag in ("management", "policymaker"):
        assert statuses[(tag, "GET", "/api/queues/THEIRS/q")] == 401
        assert statuses[(tag, "GET", "/api/vhosts/THEIRS")] == 401
        assert statuses[(tag, "PUT", "/api/queues/MINE/new")] == 201
        assert lists[(tag, "/api/vhosts")] == [(mine, mine)]
        assert lists[(tag, "/api/queues")] == [(mine, "q")]
    assert statuses[("monitoring", "GET", "/api/queues/THEIRS/q")] == 401
    assert statuses[("monitoring", "GET", "/api/nodes")] == 200
    assert statuses[("management", "GET", "/api/nodes")] == 401
    # Monitoring sees every vhost's name but, as RabbitMQ 3.10's filter_vhost, only the objects of
    # vhosts it has permissions in.
    assert lists[("monitoring", "/api/vhosts")] == [(mine, mine), (theirs, theirs)]
    assert lists[("monitoring", "/api/queues")] == []
    assert statuses[("policymaker", "PUT", "/api/policies/MINE/p")] == 201
    assert statuses[("policymaker", "PUT", "/api/policies/THEIRS/p")] == 401
    assert statuses[("management", "PUT", "/api/policies/MINE/p")] == 401

    port = rabbit_port()
    if port is None:
        pytest.skip(f"no RabbitMQ management API at {RABBITMQ_MGMT_URL} to compare with")
    rabbit_statuses, rabbit_lists = run_permission_cases(port, users, mine, theirs)
    different = {k: (statuses[k], rabbit_statuses[k]) for k in statuses if statuses[k] != rabbit_statuses[k]}
    assert not different, f"(mailroom, rabbitmq) statuses differ: {different}"
    assert lists == rabbit_lists


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_https_serves_the_api_and_reloads_on_sighup():
    with tempfile.TemporaryDirectory(prefix="mailroom-https-") as d:
        cert, key = make_cert(d, "first")
        https_port = free_port()
        args = ["--https-listen", f"127.0.0.1:{https_port}", "--tls-cert", cert, "--tls-key", key]
        with mailroom(args) as (proc, _http_port):
            first = ssl.create_default_context(cafile=cert)
            status, overview = request(https_port, "GET", "/api/overview", tls_context=first)
            assert status == 200
            assert any(l["protocol"] == "https" and l["port"] == https_port for l in overview["listeners"])
            # TLS 1.1 and older are refused.
            old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            old.load_verify_locations(cert)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            with pytest.raises((ssl.SSLError, OSError)):
                request(https_port, "GET", "/api/overview", tls_context=old)
            # The same hardening on the HTTPS listener.
            assert request(https_port, "PUT", "/api/vhosts/x", tls_context=first,
                           headers={"Origin": "https://evil.example"})[0] == 403
            # SIGHUP: new connections get the new certificate.
            second_cert, second_key = make_cert(d, "second")
            os.replace(second_cert, cert)
            os.replace(second_key, key)
            proc.send_signal(signal.SIGHUP)
            second = ssl.create_default_context(cafile=cert)
            deadline = time.monotonic() + 5
            while True:
                try:
                    assert request(https_port, "GET", "/api/overview", tls_context=second)[0] == 200
                    break
                except ssl.SSLError:
                    assert time.monotonic() < deadline, "the reloaded certificate was not served"
                    time.sleep(0.1)
            with pytest.raises(ssl.SSLError):
                request(https_port, "GET", "/api/overview", tls_context=first)


def test_connections_are_their_owners(server_process):
    """RabbitMQ's is_authorized_user and filter_conn_ch_list: a management user sees and closes only its
    own connections; monitoring sees everyone's and closes none but its own; administrators close any."""
    proc, port = server_process
    suffix = uuid.uuid4().hex[:8]
    vhost = f"conns-{suffix}"
    admin = {"Content-Type": "application/json"}
    assert request(port, "PUT", f"/api/vhosts/{vhost}")[0] == 201
    users = {tag: f"{tag}-c-{suffix}" for tag in ("management", "monitoring")}
    users["other"] = f"other-c-{suffix}"
    for tag, user in users.items():
        tags = "management" if tag == "other" else tag
        assert request(port, "PUT", f"/api/users/{user}", body={"password": "pw", "tags": tags}, headers=admin)[0] == 201
        assert request(port, "PUT", f"/api/permissions/{vhost}/{user}",
                       body={"configure": ".*", "write": ".*", "read": ".*"}, headers=admin)[0] == 201
    params = pika.ConnectionParameters("127.0.0.1", proc.amqp_port, vhost,
                                       pika.PlainCredentials(users["management"], "pw"))
    conn = pika.BlockingConnection(params)
    try:
        def as_user(tag, method, path):
            return request(port, method, path, headers={"Authorization": auth(users[tag], "pw")})

        deadline = time.monotonic() + 5
        while True:
            status, listed = as_user("management", "GET", "/api/connections")
            mine = [c for c in listed if c["user"] == users["management"]]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 200 and len(mine) == 1, listed
        name = urllib.parse.quote(mine[0]["name"], safe="")
        assert as_user("other", "GET", "/api/connections")[1] == []
        assert as_user("other", "GET", f"/api/vhosts/{vhost}/connections")[1] == []
        status, body = as_user("other", "GET", f"/api/connections/{name}")
        assert (status, body["reason"]) == (401, "User not authorised to access object")
        assert as_user("other", "GET", f"/api/connections/{name}/channels")[0] == 401
        assert as_user("other", "DELETE", f"/api/connections/{name}")[0] == 401
        assert [c["name"] for c in as_user("monitoring", "GET", "/api/connections")[1]] == [mine[0]["name"]]
        assert as_user("monitoring", "GET", f"/api/connections/{name}")[0] == 200
        assert as_user("monitoring", "DELETE", f"/api/connections/{name}")[0] == 401
        assert conn.is_open
        assert as_user("management", "GET", f"/api/connections/{name}")[0] == 200
        assert as_user("management", "DELETE", f"/api/connections/{name}")[0] == 204
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        for user in users.values():
            request(port, "DELETE", f"/api/users/{user}")
        request(port, "DELETE", f"/api/vhosts/{vhost}")
