"""Fixtures of the management API comparison tests: the helpers of tests/amqp (brokers.py, the Api client of
test_management_api.py) on the path, and a time limit on every test, as tests/amqp has."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "amqp"))

DEFAULT_TIMEOUT_S = 120


def pytest_collection_modifyitems(config, items):
    # pytest-timeout, when installed: nothing may hang forever.
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S))
