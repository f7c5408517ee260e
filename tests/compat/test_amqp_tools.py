"""The C client (librabbitmq's amqp-tools) the way shell scripts use it."""
import os
import shutil
import subprocess
import time

import pytest

from conftest import HERE, missing

TOOLS = ["amqp-declare-queue", "amqp-publish", "amqp-consume", "amqp-get", "amqp-delete-queue"]


@pytest.fixture(scope="module", autouse=True)
def amqp_tools():
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        missing(f"amqp-tools is not installed (missing {', '.join(absent)})")


def test_shell_pipeline(target, names):
    q = names("compat-c")
    proc = subprocess.run(["sh", os.path.join(HERE, "c", "pipeline.sh"), target.url, q],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:7] == [
        f"declared: {q}",
        "got: first",
        "consumed: second",
        "consumed: third",
        "consumed: fourth",
        # amqp-get exits 2 when the queue is empty, 1 on a server error.
        "empty get exit: 2",
        "deleted with: 0",
    ], proc.stdout
    assert "404" in lines[7] and "NOT_FOUND" in lines[7], lines
    assert lines[8] == "missing get exit: 1"


def test_consume_on_a_server_named_queue_bound_to_an_exchange(target, names):
    # amqp-consume -e declares a server-named exclusive queue and binds it; publish until it has one.
    key = names("compat-c-key")
    consumer = subprocess.Popen(
        ["amqp-consume", "-u", target.url, "-e", "amq.topic", "-r", f"{key}.#", "-c", "1", "--", "cat"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while consumer.poll() is None and time.monotonic() < deadline:
            subprocess.run(["amqp-publish", "-u", target.url, "-e", "amq.topic", "-r", f"{key}.a.b",
                            "-b", "routed by topic"], check=True, timeout=10)
            time.sleep(0.2)
        out, err = consumer.communicate(timeout=10)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    assert consumer.returncode == 0, err
    assert out == "routed by topic"


def test_idle_consumer_with_one_second_heartbeats_stays_connected(target, names):
    q = names("compat-c-hb")
    subprocess.run(["amqp-declare-queue", "-u", target.url, "-q", q], check=True, capture_output=True, timeout=10)
    consumer = subprocess.Popen(
        ["amqp-consume", "-u", target.url, "--heartbeat=1", "-q", q, "-c", "1", "--", "cat"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.5)
        assert consumer.poll() is None, consumer.communicate()
        subprocess.run(["amqp-publish", "-u", target.url, "-r", q, "-b", "after idling"], check=True, timeout=10)
        out, err = consumer.communicate(timeout=10)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    assert consumer.returncode == 0, err
    assert out == "after idling"
