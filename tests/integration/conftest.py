"""Shared fixtures of the integration tests: real servers in subprocesses on 127.0.0.1.

The servers themselves (`spawn`, `moto_endpoint`), the fresh pipeline environment
(`pipeline_env`) and the shared data live in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def closed_endpoint(free_port: Callable[[], int]) -> str:
    """An http://127.0.0.1 URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
