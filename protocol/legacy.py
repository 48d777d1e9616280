"""skopeo's experimental-image-proxy protocol: requests in, replies out.

One JSON object per SOCK_SEQPACKET packet of at most 32 KiB. A request is
``{"method": M, "args": [...]}``; a reply is ``{"success", "value", "pipeid",
"error_code", "error"}`` in that field order, with 0 to 2 fds beside it.

Argument checks and their error texts follow the Go reference, because
clients show those texts to users and some match on them. Where the reference
is broken we are stricter and say so: a negative, fractional or boolean number
is refused instead of being silently truncated, and a reply that would not
fit in a packet becomes an error reply instead of a failed send.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.errors import ClientError, ImageProxyError
from protocol.image import go_json

#: The protocol version we speak: skopeo's 0.2.8 plus OpenJsonRPCFdPass.
PROTOCOL_VERSION = "0.2.9"

#: The largest packet either side sends.
MAX_PACKET_SIZE = 32 * 1024

#: JavaScript's Number.MAX_SAFE_INTEGER: larger integers lose precision in
#: clients that parse JSON numbers as doubles, so the reference refuses them.
MAX_SAFE_INTEGER = 2**53 - 1

# error_code values (protocol 0.2.8).
ERROR_CODE_PIPE = "EPIPE"
ERROR_CODE_RETRYABLE = "retryable"
ERROR_CODE_OTHER = "other"


class Request(msgspec.Struct):
    method: str
    args: list[Any] = msgspec.field(default_factory=list)


class Reply(msgspec.Struct):
    success: bool
    value: Any
    pipeid: int
    # Servers before protocol 0.2.8 (skopeo 1.9 speaks 0.2.3) send no
    # ``error_code``, and a client must still decode their replies; ``error``
    # has a default only because it follows a field with one.
    error_code: str = ""
    error: str = ""


class LayerInfo(msgspec.Struct):
    """One entry of GetLayerInfo's value, fields in the reference's order."""

    digest: str
    size: int
    media_type: str


_request_decoder = msgspec.json.Decoder(Request)


def parse_request(packet: bytes) -> Request:
    """Decode one request packet; a bad one is the client's fault."""
    try:
        return _request_decoder.decode(packet)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ClientError(f"invalid request: {exc}") from None
    except RecursionError:
        # msgspec recurses once per nesting level; a packet holds enough
        # brackets to exhaust the interpreter's stack, and unwinding leaves
        # nothing behind, so this is just another malformed request.
        raise ClientError("invalid request: JSON nested too deeply") from None


def go_type_name(value: Any) -> str:
    """Name a decoded JSON value's type the way Go's ``%T`` does."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    return "map[string]interface {}"


def expect_arg_count(args: list[Any], count: int, message: str) -> None:
    if len(args) != count:
        raise ClientError(message)


def parse_u64(value: Any) -> int:
    """A non-negative integer argument, checked like the reference and more."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClientError(f"expecting numeric, not {go_type_name(value)}")
    if value > MAX_SAFE_INTEGER:
        raise ClientError(f"out of range integer for numeric {float(value):f}")
    if value < 0 or (isinstance(value, float) and not value.is_integer()):
        raise ClientError(f"expecting a non-negative integer, not {value!r}")
    return int(value)


def parse_string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ClientError(f"expecting string {what}, not {go_type_name(value)}")
    return value


def error_code_for(error: BaseException) -> str:
    if isinstance(error, BrokenPipeError):
        return ERROR_CODE_PIPE
    if isinstance(error, ImageProxyError) and error.retryable:
        return ERROR_CODE_RETRYABLE
    return ERROR_CODE_OTHER


def encode_success(value: Any, pipeid: int = 0) -> bytes:
    """A success reply; if it would not fit in a packet, an error reply."""
    packet = go_json(Reply(True, value, pipeid, "", ""))
    if len(packet) > MAX_PACKET_SIZE:
        return encode_error(
            ClientError(
                f"reply of {len(packet)} bytes exceeds the {MAX_PACKET_SIZE}-byte "
                "packet limit (use the piped variant of this method)"
            )
        )
    return packet


def is_success(reply: bytes) -> bool:
    """Whether an encoded reply is a success (replies start with that field)."""
    return reply.startswith(b'{"success":true')


def encode_error(error: BaseException) -> bytes:
    message = str(error) or type(error).__name__
    # Keep the reply within one packet even for an enormous message.
    if len(message) > MAX_PACKET_SIZE // 2:
        message = message[: MAX_PACKET_SIZE // 2] + "... (truncated)"
    return go_json(Reply(False, None, 0, error_code_for(error), message))


def encode_pipe_error(error: BaseException) -> bytes:
    """The ``{"code", "message"}`` object GetRawBlob writes to its error fd."""
    return go_json({"code": error_code_for(error), "message": str(error)})
