"""Broker targets for the protocol tests: the local RabbitMQ (the oracle) and Mailroom.

Shared by tests/amqp/conftest.py and tests/celery/conftest.py.

Environment:
  AMQP_TARGETS   comma list of targets, default "mailroom,rabbitmq"
  RABBITMQ_URL   default amqp://guest:guest@127.0.0.1:5672/%2F
  MAILROOM_BIN   default <repo>/target/debug/mailroom
  MAILROOM_EXTRA_ARGS  extra flags appended to every `mailroom server` command (shell-split)
"""
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass

import pika

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
STARTUP_TIMEOUT_S = 20.0

# Every Mailroom a test starts, through start_mailroom or its own command line, inherits these unless it
# passes the flag itself (clap reads them; a flag overrides them): without them each server would bind
# the defaults (15672, 15692) and two servers running at once would collide.
os.environ.setdefault("MAILROOM_HTTP_LISTEN", "127.0.0.1:0")
os.environ.setdefault("MAILROOM_PROMETHEUS_LISTEN", "127.0.0.1:0")


def targets():
    raw = os.environ.get("AMQP_TARGETS", "mailroom,rabbitmq")
    names = [t.strip() for t in raw.split(",") if t.strip()]
    for n in names:
        if n not in ("mailroom", "rabbitmq"):
            raise ValueError(f"AMQP_TARGETS: unknown target {n!r} (want mailroom and/or rabbitmq)")
    return names


@dataclass
class Broker:
    name: str  # 'mailroom' or 'rabbitmq'
    url: str   # amqp://user:pass@host:port/vhost

    def params(self, **overrides):
        """pika.URLParameters for this broker; keyword overrides set attributes (heartbeat=...)."""
        p = pika.URLParameters(self.url)
        for k, v in overrides.items():
            setattr(p, k, v)
        return p

    @property
    def host(self):
        return urllib.parse.urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self):
        return urllib.parse.urlparse(self.url).port or 5672

    def url_with(self, user=None, password=None, vhost=None):
        u = urllib.parse.urlparse(self.url)
        user = urllib.parse.quote(user if user is not None else urllib.parse.unquote(u.username or "guest"), safe="")
        password = urllib.parse.quote(password if password is not None else urllib.parse.unquote(u.password or "guest"), safe="")
        path = u.path if vhost is None else "/" + urllib.parse.quote(vhost, safe="")
        return f"amqp://{user}:{password}@{self.host}:{self.port}{path}"


def rabbitmq_broker():
    return Broker("rabbitmq", os.environ.get("RABBITMQ_URL", DEFAULT_RABBITMQ_URL))


def mailroom_bin():
    return os.environ.get("MAILROOM_BIN", os.path.join(REPO, "target", "debug", "mailroom"))


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _wait_listening(port, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mailroom exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mailroom did not accept connections on port {port} within {timeout} s")


@contextlib.contextmanager
def start_mailroom(extra_args=(), data_dir=None, port=None, preexec_fn=None):
    """Start a Mailroom server on a free port with its own data dir (or `data_dir`, kept); yield a Broker.
    `preexec_fn` runs in the child before exec (e.g. to lower its resource limits).

    Usage: with start_mailroom(["--consumer-timeout-ms", "2000"]) as b: ...
    """
    binary = mailroom_bin()
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise FileNotFoundError(
            f"mailroom binary not found at {binary}: run cargo build first (or set MAILROOM_BIN)")
    port = port or free_port()
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mailroom-test-"))
        cmd = [binary, "server", "--amqp-listen", f"127.0.0.1:{port}",
               "--data-dir", data_dir, "--log-level", "warn"]
        cmd += shlex.split(os.environ.get("MAILROOM_EXTRA_ARGS", ""))
        cmd += list(extra_args)
        # A free port for every listener the caller did not choose (port 0: the kernel picks one).
        for flag in ("--http-listen", "--prometheus-listen"):
            if not any(a == flag or a.startswith(flag + "=") for a in cmd):
                cmd += [flag, "127.0.0.1:0"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)
        try:
            _wait_listening(port, proc, STARTUP_TIMEOUT_S)
            yield Broker("mailroom", f"amqp://guest:guest@127.0.0.1:{port}/%2F")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
