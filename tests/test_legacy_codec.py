"""protocol.legacy's request decoder on hostile packets."""

from __future__ import annotations

import pytest

from protocol.errors import ClientError
from protocol.legacy import MAX_PACKET_SIZE, parse_request


def test_deeply_nested_arguments_are_an_invalid_request() -> None:
    depth = 10_000
    packet = b'{"method":"Initialize","args":' + b"[" * depth + b"]" * depth + b"}"
    assert len(packet) <= MAX_PACKET_SIZE
    with pytest.raises(ClientError, match="^invalid request: JSON nested too deeply"):
        parse_request(packet)


def test_moderately_nested_arguments_still_decode() -> None:
    request = parse_request(b'{"method":"OpenImage","args":[[[["x"]]]]}')
    assert request.method == "OpenImage"
    assert request.args == [[[["x"]]]]
