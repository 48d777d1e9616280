"""Shared fixtures: the anyio backend and the test images."""

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # The proxy runs on asyncio in production; test on what ships.
    return "asyncio"
