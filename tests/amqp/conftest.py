"""Fixtures for the AMQP protocol tests.

Every test taking `broker` (or `amqp`) runs once per target in AMQP_TARGETS
(default "mailroom,rabbitmq"). Mailroom is started once per session; see brokers.py.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

pytest.register_assert_rewrite("helpers")

from brokers import Broker, rabbitmq_broker, start_mailroom, targets  # noqa: E402
from helpers import Amqp  # noqa: E402

DEFAULT_TIMEOUT_S = 30
SLOW_TIMEOUT_S = 120


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: large or time-consuming test (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    # pytest-timeout: nothing may hang forever, whatever ini file pytest found.
    for item in items:
        if item.get_closest_marker("timeout") is None:
            t = SLOW_TIMEOUT_S if item.get_closest_marker("slow") else DEFAULT_TIMEOUT_S
            item.add_marker(pytest.mark.timeout(t))


@pytest.fixture(scope="session")
def mailroom_server():
    """One Mailroom server for the whole session (started only if a test needs it)."""
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
def broker(request) -> Broker:
    if request.param == "rabbitmq":
        return rabbitmq_broker()
    return request.getfixturevalue("mailroom_server")


@pytest.fixture
def amqp(broker):
    """An Amqp helper: one open connection and channel, unique names, cleanup at teardown."""
    a = Amqp(broker)
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def mailroom_factory():
    """start_mailroom(extra_args) as a fixture, for tests that need special server flags."""
    return start_mailroom
