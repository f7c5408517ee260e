"""`/api/overview` for users who may not see the whole node, compared with a RabbitMQ 3.10 management node
(the throwaway oracle of rabbitmq-oracle.sh: RABBITMQ_MGMT_URL=http://127.0.0.1:35672, its AMQP port at
RABBITMQ_ORACLE_AMQP_URL). The same users, vhosts, queues, messages and connections are made on both brokers
through their own APIs (never on the shared node on 5672); then each user's overview is read from both.

RabbitMQ's rule (rabbit_mgmt_wm_overview, rabbit_mgmt_db:overview): monitoring and administrator users see
the whole node; a management or policymaker user sees the totals of the vhosts it has permissions in
(queues, exchanges, queue_totals, message_stats) and of its own connections and channels, no consumers
total, and no node, listeners or contexts.
"""
import time
import urllib.parse
import uuid

import pika
import pytest

from brokers import free_port, start_mailroom, targets
from test_management_api import ERLANG_OR_STATS, RABBITMQ_ORACLE_AMQP_URL, Api, answering_api, q, rabbit_api

pytestmark = pytest.mark.skipif("mailroom" not in targets(), reason="drives a Mailroom server")

PASSWORD = "ovw-pass"


class UserApi(Api):
    """An Api client logged in as another user."""

    def __init__(self, base, user, password):
        super().__init__(base)
        import base64
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, method, path, body=None, headers=None):
        return super().call(method, path, body, {**(headers or {}), "Authorization": self.auth})


@pytest.fixture(scope="module")
def mailroom():
    http_port = free_port()
    with start_mailroom(["--http-listen", f"127.0.0.1:{http_port}"]) as b:
        api = answering_api(http_port)
        yield b, api


def amqp_params(url, user, vhost):
    """pika parameters for `url`'s host and port, as `user` in `vhost`."""
    u = urllib.parse.urlparse(url)
    return pika.ConnectionParameters(host=u.hostname, port=u.port or 5672, virtual_host=vhost,
                                     credentials=pika.PlainCredentials(user, PASSWORD), heartbeat=0)


def setup(api, amqp_url, t):
    """Vhosts a and b (2 and 3 messages in one queue each), users mgmt (management; permissions in a),
    pm (policymaker; a and b) and mon (monitoring; none), made through `api` as guest; the messages
    published over AMQP at `amqp_url`."""
    va, vb = f"ovw-a-{t}", f"ovw-b-{t}"
    users = {"mgmt": ("management", [va]), "pm": ("policymaker", [va, vb]), "mon": ("monitoring", [])}
    for v in (va, vb):
        assert api.call("PUT", f"/api/vhosts/{q(v)}")[0] in (201, 204)
        # guest declares and publishes there.
        assert api.call("PUT", f"/api/permissions/{q(v)}/guest",
                        {"configure": ".*", "write": ".*", "read": ".*"})[0] in (201, 204)
    for name, (tags, vhosts) in users.items():
        user = f"ovw-{name}-{t}"
        assert api.call("PUT", f"/api/users/{user}", {"password": PASSWORD, "tags": tags})[0] in (201, 204)
        for v in vhosts:
            status = api.call("PUT", f"/api/permissions/{q(v)}/{user}",
                              {"configure": ".*", "write": ".*", "read": ".*"})[0]
            assert status in (201, 204)
    for v, n in ((va, 2), (vb, 3)):
        # Published over AMQP by guest, with confirms: the counts are the vhost's message_stats.
        u = urllib.parse.urlparse(amqp_url)
        params = pika.ConnectionParameters(host=u.hostname, port=u.port, virtual_host=v,
                                           credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0)
        conn = pika.BlockingConnection(params)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.queue_declare("ovw-q")
            for i in range(n):
                ch.basic_publish("", "ovw-q", f"m{i}".encode())
        finally:
            conn.close()
    return va, vb


def teardown(api, t):
    for name in ("mgmt", "pm", "mon"):
        api.call("DELETE", f"/api/users/ovw-{name}-{t}")
    for v in (f"ovw-a-{t}", f"ovw-b-{t}"):
        api.call("DELETE", f"/api/vhosts/{q(v)}")


def overview_of(api, user):
    status, body, _ = UserApi(api.base, user, PASSWORD).call("GET", "/api/overview")
    assert status == 200, (user, status, body)
    return body


def exchanges_in(api, vhost):
    return len(api.get(f"/api/exchanges/{q(vhost)}"))


def check_rule(api, t, va, vb, wait=False):
    """Each user's overview on one broker, against what guest sees of the same objects there. `wait`: the
    broker's queue totals reach its overview after a stats emission (RabbitMQ: every 5 s)."""
    mgmt, pm, mon = (f"ovw-{n}-{t}" for n in ("mgmt", "pm", "mon"))
    deadline = time.monotonic() + (30 if wait else 0)
    while True:
        seen = {u: overview_of(api, u) for u in (mgmt, pm, mon)}
        if seen[mgmt].get("queue_totals", {}).get("messages") == 2 \
                and seen[pm].get("queue_totals", {}).get("messages") == 5 \
                and (seen[mgmt].get("message_stats") or {}).get("publish") == 2 \
                and (seen[pm].get("message_stats") or {}).get("publish") == 5 \
                and seen[mgmt]["object_totals"].get("connections") == 1:
            break
        assert time.monotonic() < deadline, seen
        time.sleep(1)
    o = seen[mgmt]["object_totals"]
    assert (o["queues"], o["exchanges"]) == (1, exchanges_in(api, va)), o
    assert (o["connections"], o["channels"]) == (1, 1), o
    assert "consumers" not in o, o
    for key in ("node", "listeners", "contexts"):
        assert key not in seen[mgmt], (key, sorted(seen[mgmt]))
    o = seen[pm]["object_totals"]
    assert (o["queues"], o["exchanges"]) == (2, exchanges_in(api, va) + exchanges_in(api, vb)), o
    assert (o["connections"], o["channels"]) == (0, 0), o
    assert seen[pm]["message_stats"]["publish"] == 5
    # Monitoring: the whole node, as guest (an administrator) sees it (read again while other tests sharing
    # the broker change it).
    deadline = time.monotonic() + 10
    while True:
        mine, whole = overview_of(api, mon), api.get("/api/overview")
        o, w = mine["object_totals"], whole["object_totals"]
        if all(o[k] == w[k] for k in ("queues", "exchanges")):
            break
        assert time.monotonic() < deadline, (o, w)
    assert "consumers" in o and "node" in mine and "listeners" in mine
    return seen


def test_overview_is_cut_as_rabbitmq_cuts_it(mailroom):
    broker, api = mailroom
    rabbit = rabbit_api()
    if rabbit is None:
        pytest.skip("no RabbitMQ management API (tests/management/rabbitmq-oracle.sh start; RABBITMQ_MGMT_URL)")
    t = uuid.uuid4().hex[:8]
    connections = []
    try:
        seen = {}
        for name, b_api, amqp_url in (("rabbitmq", rabbit, RABBITMQ_ORACLE_AMQP_URL), ("mailroom", api, broker.url)):
            va, vb = setup(b_api, amqp_url, t)
            # mgmt's own connection, with one channel.
            conn = pika.BlockingConnection(amqp_params(amqp_url, f"ovw-mgmt-{t}", va))
            conn.channel()
            connections.append(conn)
            seen[name] = check_rule(b_api, t, va, vb, wait=name == "rabbitmq")
        # The same fields, user by user (Mailroom may add its own, never lack RabbitMQ's).
        differences = []
        for user in seen["rabbitmq"]:
            theirs, ours = seen["rabbitmq"][user], seen["mailroom"][user]
            # (Erlang's and the stats database's fields excepted, as test_management_api.py excepts them.)
            missing = set(theirs) - set(ours) - ERLANG_OR_STATS
            if missing:
                differences.append(f"{user}: fields missing {sorted(missing)}")
            extra = {"node", "listeners", "contexts"} & (set(ours) - set(theirs))
            if extra:
                differences.append(f"{user}: fields RabbitMQ leaves out {sorted(extra)}")
            missing = set(theirs["object_totals"]) - set(ours["object_totals"])
            extra = set(ours["object_totals"]) - set(theirs["object_totals"]) - {"vhosts"}
            if missing or extra:
                differences.append(f"{user}: object_totals {sorted(ours['object_totals'])} vs {sorted(theirs['object_totals'])}")
            missing = set(theirs["queue_totals"]) - set(ours["queue_totals"])
            if missing:
                differences.append(f"{user}: queue_totals fields missing {sorted(missing)}")
        assert not differences, "\n".join(differences)
    finally:
        for c in connections:
            try:
                c.close()
            except Exception:
                pass
        teardown(rabbit, t)
        teardown(api, t)
