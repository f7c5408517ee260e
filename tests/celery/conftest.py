"""Celery smoke tests against each broker target (same AMQP_TARGETS / RABBITMQ_URL / MAILROOM_BIN
environment as tests/amqp; the broker machinery is shared with tests/amqp/brokers.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "amqp"))

from brokers import rabbitmq_broker, start_mailroom, targets  # noqa: E402

DEFAULT_TIMEOUT_S = 60


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S))


@pytest.fixture(scope="session")
def celery_mailroom_server():
    try:
        cm = start_mailroom()
        broker = cm.__enter__()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield broker
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="module", params=targets())
def celery_broker(request):
    if request.param == "rabbitmq":
        return rabbitmq_broker()
    return request.getfixturevalue("celery_mailroom_server")
