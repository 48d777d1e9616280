# JSON-RPC 2.0 with fd passing (jsonrpc-fdpass), without I/O.
#
# The wire is a SOCK_STREAM of JSON objects back to back, with no length
# prefix, and a FIFO of fds that arrive as SCM_RIGHTS alongside the bytes.
# A message carrying N fds says so with a top-level "fds": N.
#
# Strategy of the framer: a byte scanner keeps its state (nesting depth,
# inside-a-string, after-a-backslash, position) between feeds, so every byte
# is examined once: O(n) in bytes received however the stream is chunked.
# Inside an object it only looks for the bytes that can change that state
# ('{', '}', '[', ']', '"'; inside a string '"' and '\'), letting `re` skip
# the rest at C speed. UTF-8 continuation bytes are never ASCII, so scanning
# bytes is safe. When the brace depth returns to 0 the object is complete and
# msgspec decodes it (another O(message) pass, which also catches syntax
# errors the scanner does not look for). Consumed bytes are dropped from the
# front of the buffer only once they are at least half of it, so compaction
# is amortized O(n) too.
#
# Bounds: at most `max_message_size` bytes of one message are buffered; a
# longer message is a fatal error, so a peer cannot make us buffer forever.
# Objects and arrays nest at most MAX_NESTING_DEPTH levels, checked by the
# scanner before msgspec sees the message, because msgspec's decoder
# recurses once per level and would exhaust the interpreter's stack.
# Whitespace between messages is discarded as it is scanned. A syntax error
# inside an object is reported when the object closes (or hits the size or
# depth bound), not at the offending byte.
#
# Fds: each queued fd remembers the stream offset at which the recvmsg chunk
# it came with ended. The spec sends a message's fds with its first byte and
# the rest in continuation calls before the next message's first byte, so an
# fd left over once a message has taken its count, whose chunk ended before
# the next message began, was announced by no message: a fatal mismatched
# count. The check works at chunk granularity: an unannounced fd that shares
# a chunk with the next message's first byte cannot be told from that
# message's own fds, and is caught only if the count then comes out wrong.
# At most MAX_QUEUED_FDS fds are queued at once; more is fatal, so a peer
# cannot make us hold an unbounded number of open files.
#
# This module never opens or closes an fd: fds are plain ints, handed back to
# the caller with their message or by `MessageFramer.close`.

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

JSONRPC_VERSION: Final = "2.0"

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# Start of the JSON-RPC range reserved for server-defined errors; methods
# report their own failures with this code unless they have a better one.
SERVER_ERROR: Final = -32000
# jsonrpc-fdpass: fatal framing or fd association error; the connection ends.
FD_ERROR: Final = -32050

DEFAULT_MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024
# The spec recommends 200 to 500 fds per sendmsg; Linux refuses more than 253
# (SCM_MAX_FD) with EINVAL, and the sender halves the batch when it sees that.
DEFAULT_FD_BATCH: Final = 250
#: Deepest nesting of objects and arrays accepted in one message (the
#: message object itself is level 1). The API's messages need a handful.
MAX_NESTING_DEPTH: Final = 128
#: Most fds the framer holds while they wait for their message.
MAX_QUEUED_FDS: Final = 4096

RequestId = int | str | None


class ErrorKind(enum.StrEnum):
    """Stable machine-readable reason carried as ``error.data["kind"]``.

    Clients branch on the kind, never on the human-readable message. The
    values match the ``kind`` of the exceptions in protocol.errors.
    """

    NOT_FOUND = "not-found"
    INVALID_ARGUMENT = "invalid-argument"
    RETRYABLE = "retryable"
    DIGEST_MISMATCH = "digest-mismatch"
    NOT_INITIALIZED = "not-initialized"
    INTERNAL = "internal"
    UNSUPPORTED = "unsupported"
    POLICY_DENIED = "policy-denied"
    SOURCE_ERROR = "source-error"
    INVALID_REQUEST = "invalid-request"
    FRAMING = "framing"


class ErrorObject(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The ``error`` member of a failed response."""

    code: int
    message: str
    data: Any = None


class Request(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A request, or a notification when ``id`` is absent (UNSET).

    ``params`` stays raw JSON so the server decodes it into the method's own
    params type; it is UNSET when absent. ``fds`` counts the fds that travel
    with the message.
    """

    jsonrpc: Literal["2.0"]
    method: str
    params: Raw | UnsetType = UNSET
    id: RequestId | UnsetType = UNSET
    fds: Annotated[int, msgspec.Meta(ge=0)] = 0

    @property
    def is_notification(self) -> bool:
        """True when the sender expects no response."""
        return self.id is UNSET


class Response(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A response: exactly one of ``result`` (raw JSON) and ``error`` is set."""

    jsonrpc: Literal["2.0"]
    result: Raw | UnsetType = UNSET
    error: ErrorObject | UnsetType = UNSET
    id: RequestId
    fds: Annotated[int, msgspec.Meta(ge=0)] = 0


class InvalidMessage(msgspec.Struct, frozen=True):
    """Well-formed JSON that is not a valid JSON-RPC message.

    Not fatal: the stream is still in sync, and a server answers it with
    Invalid Request. ``id`` is the message's id when it could be read.
    """

    id: RequestId
    reason: str


Message = Request | Response | InvalidMessage


class FramingError(Exception):
    """The peer broke the framing; the connection cannot continue.

    Always the peer's fault (or a truncated stream). ``code`` is FD_ERROR.
    """

    code: Final = FD_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RpcError(Exception):
    """An error a method reports to its caller as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    @classmethod
    def of_kind(
        cls, kind: ErrorKind, message: str, *, code: int = SERVER_ERROR, **context: Any
    ) -> RpcError:
        """Build an error whose data is ``{"kind": kind, **context}``."""
        return cls(code, message, error_data(kind, **context))

    def to_error_object(self) -> ErrorObject:
        """The wire form of this error."""
        return ErrorObject(code=self.code, message=self.message, data=self.data)


def error_data(kind: ErrorKind, **context: Any) -> dict[str, Any]:
    """The ``data`` member of an error: its kind plus context (digest, path...)."""
    return {"kind": kind.value, **context}


_ENCODER: Final = msgspec.json.Encoder()


def encode_message(message: Request | Response) -> bytes:
    """Serialize one message (``fds`` is omitted when 0)."""
    return _ENCODER.encode(message)


def new_request(
    method: str, params: Any, id: RequestId | UnsetType = UNSET, fds: int = 0
) -> Request:
    """A request (or notification without ``id``) with params encoded now."""
    raw = UNSET if params is None else Raw(_ENCODER.encode(params))
    return Request(jsonrpc=JSONRPC_VERSION, method=method, params=raw, id=id, fds=fds)


def success_response(id: RequestId, result: Any, fds: int = 0) -> Response:
    """A successful response; ``result`` is anything msgspec can encode.

    Raises msgspec.EncodeError or TypeError when it cannot.
    """
    raw = Raw(_ENCODER.encode(result))
    return Response(jsonrpc=JSONRPC_VERSION, result=raw, id=id, fds=fds)


def error_response(id: RequestId, error: ErrorObject) -> Response:
    """A failed response."""
    return Response(jsonrpc=JSONRPC_VERSION, error=error, id=id)


def plan_fd_batches(
    payload: bytes, fds: Sequence[int], batch: int = DEFAULT_FD_BATCH
) -> list[tuple[bytes, list[int]]]:
    """The sendmsg calls that carry one message and its fds, in order.

    The first call carries the payload with the first ``batch`` fds; each
    further call carries one space (inter-message whitespace, ignored by the
    receiver) with the next ``batch`` fds.
    """
    if batch < 1:
        raise ValueError(f"fd batch size must be at least 1, got {batch}")
    if fds and not payload:
        raise ValueError("fds need at least one payload byte to travel with")
    calls = [(payload, list(fds[:batch]))]
    for start in range(batch, len(fds), batch):
        calls.append((b" ", list(fds[start : start + batch])))
    return calls


class _Envelope(msgspec.Struct):
    """Just enough of any message to classify it, left as raw JSON."""

    method: Raw | UnsetType = UNSET
    id: Raw | UnsetType = UNSET
    result: Raw | UnsetType = UNSET
    error: Raw | UnsetType = UNSET
    fds: Raw | UnsetType = UNSET


_ENVELOPE_DECODER: Final = msgspec.json.Decoder(_Envelope)
_REQUEST_DECODER: Final = msgspec.json.Decoder(Request)
_RESPONSE_DECODER: Final = msgspec.json.Decoder(Response)
_ID_DECODER: Final = msgspec.json.Decoder(RequestId)
_FD_COUNT_DECODER: Final = msgspec.json.Decoder(Annotated[int, msgspec.Meta(ge=0)])

_WHITESPACE: Final = re.compile(rb"[ \t\n\r]*")
_OBJECT_SPECIAL: Final = re.compile(rb'[{}[\]"]')
_STRING_SPECIAL: Final = re.compile(rb'["\\]')
_OPEN_BRACE: Final = ord("{")
_OPEN_BRACKET: Final = ord("[")
_QUOTE: Final = ord('"')
# Compact the buffer once this much has been consumed even if it is less
# than half of it, so a long idle tail does not pin a large prefix.
_COMPACT_AT: Final = 1 << 16


class MessageFramer:
    """Turns received bytes and fds into complete messages with their fds.

    Feed everything one recvmsg returned with `feed`, then call
    `next_message` until it returns None. At EOF, call `at_eof`. After a
    FramingError, or when done, call `close` and close the fds it returns.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._max_message_size = max_message_size
        self._buffer = bytearray()
        # Each fd with the stream offset at which its recvmsg chunk ended.
        self._fds: deque[tuple[int, int]] = deque()
        self._pos = 0  # first byte not yet scanned
        self._start = 0  # first byte of the message being scanned
        self._consumed = 0  # bytes before this offset are no longer needed
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._pending: tuple[Message, int] | None = None
        self._error: FramingError | None = None
        self._scanned_bytes = 0
        self._received_bytes = 0

    @property
    def scanned_bytes(self) -> int:
        """Bytes the scanner has advanced over (each byte counts once)."""
        return self._scanned_bytes

    @property
    def queued_fds(self) -> int:
        """Received fds not yet handed out with a message."""
        return len(self._fds)

    def feed(self, data: bytes, fds: Sequence[int]) -> None:
        """Append what one recvmsg returned. The framer now holds ``fds``.

        Raises FramingError after an earlier fatal error, or when more than
        MAX_QUEUED_FDS fds would be waiting for their messages.
        """
        chunk_end = self._received_bytes + len(data)
        self._fds.extend((fd, chunk_end) for fd in fds)
        self._raise_if_failed()
        self._compact()
        self._buffer += data
        self._received_bytes = chunk_end
        if len(self._fds) > MAX_QUEUED_FDS:
            self._fail(
                f"the peer sent {len(self._fds)} fds that no message has taken "
                f"yet, more than the {MAX_QUEUED_FDS} we hold for a connection"
            )

    def next_message(self) -> tuple[Message, list[int]] | None:
        """The next complete message and its fds (the caller now owns them).

        Returns None until more data or fds arrive. Raises FramingError on a
        syntax error, a stray byte between messages, an oversized or too
        deeply nested message, bytes of a message arriving before the
        previous one's fds, or fds that no message announced.
        """
        self._raise_if_failed()
        try:
            return self._next_message()
        except FramingError as exc:
            self._error = exc
            raise

    def at_eof(self) -> None:
        """Check that the stream ended cleanly (call after draining).

        Raises FramingError when a message is cut short, a message is still
        waiting for its fds, or fds arrived that no message claimed.
        """
        self._raise_if_failed()
        if self._pending is not None:
            message_fds = self._pending[1]
            self._fail(
                f"mismatched fd count: the peer closed the connection after "
                f"{len(self._fds)} of the {message_fds} fds its last message "
                f"announced"
            )
        if self._depth > 0 or self._pos < len(self._buffer):
            size = len(self._buffer) - self._start
            self._fail(
                f"the peer closed the connection inside a message ({size} bytes)"
            )
        if self._fds:
            self._fail(f"the peer sent {len(self._fds)} fds that no message claimed")

    def close(self) -> list[int]:
        """Drop all state; return the fds still queued so the caller closes them."""
        fds = [fd for fd, _ in self._fds]
        self._fds.clear()
        self._buffer.clear()
        self._pending = None
        self._pos = self._start = self._consumed = self._depth = 0
        self._in_string = self._escape = False
        return fds

    def _next_message(self) -> tuple[Message, list[int]] | None:
        if self._pending is None:
            end = self._scan()
            if end is None:
                return None
            document = bytes(self._buffer[self._start : end])
            self._consumed = end
            self._pending = _decode(document)
            self._check_fd_count(self._pending[1])
        message, fd_count = self._pending
        if len(self._fds) < fd_count:
            if self._next_message_started():
                self._fail(
                    f"mismatched fd count: the peer began the next message "
                    f"after sending {len(self._fds)} of the {fd_count} fds "
                    f"the previous one announced"
                )
            return None
        # Before handing the message out: extra fds sent with it mean its
        # count is wrong, and then so may be the fds it would take.
        self._fail_on_unannounced_fds(fd_count)
        self._pending = None
        return message, [self._fds.popleft()[0] for _ in range(fd_count)]

    def _check_fd_count(self, fd_count: int) -> None:
        if fd_count > MAX_QUEUED_FDS:
            self._fail(
                f"the peer announced {fd_count} fds for one message, more than "
                f"the {MAX_QUEUED_FDS} we hold for a connection"
            )

    def _fail_on_unannounced_fds(self, claimed: int) -> None:
        """Fail if an fd after the first ``claimed`` was announced by no message.

        Called between messages. An fd whose chunk ended before the next
        message's first byte cannot have travelled with that message.
        """
        if len(self._fds) <= claimed:
            return
        self._skip_whitespace()
        next_start = self._stream_offset(self._pos)
        if self._fds[claimed][1] > next_start:
            return
        # Chunk ends only grow along the queue, so these are a prefix of it.
        unannounced = sum(1 for _, end in self._fds if end <= next_start) - claimed
        self._fail(
            f"mismatched fd count: the peer sent {unannounced} fds that no "
            f"message announced, with bytes before stream offset {next_start}"
        )

    def _scan(self) -> int | None:
        """Advance over unscanned bytes; the end offset of a complete message."""
        buffer, end = self._buffer, len(self._buffer)
        while self._pos < end:
            if self._depth == 0:
                self._fail_on_unannounced_fds(0)
                if not self._next_message_started():
                    break
                self._start = self._pos
                self._depth = 1
                self._advance(self._pos + 1)
            elif self._escape:
                self._escape = False
                self._advance(self._pos + 1)
            elif self._in_string:
                self._scan_string(buffer, end)
            elif self._scan_object(buffer, end):
                self._check_size(self._pos)
                return self._pos
        if self._depth > 0:
            self._check_size(end)
        return None

    def _scan_string(self, buffer: bytearray, end: int) -> None:
        found = _STRING_SPECIAL.search(buffer, self._pos)
        if found is None:
            self._advance(end)
        elif buffer[found.start()] == _QUOTE:
            self._in_string = False
            self._advance(found.end())
        else:
            self._escape = True
            self._advance(found.end())

    def _scan_object(self, buffer: bytearray, end: int) -> bool:
        """Scan up to the next structural byte; True when the message closed."""
        found = _OBJECT_SPECIAL.search(buffer, self._pos)
        if found is None:
            self._advance(end)
            return False
        self._advance(found.end())
        byte = buffer[found.start()]
        if byte == _QUOTE:
            self._in_string = True
        elif byte in (_OPEN_BRACE, _OPEN_BRACKET):
            self._depth += 1
            if self._depth > MAX_NESTING_DEPTH:
                offset = self._stream_offset(found.start())
                self._fail(
                    f"the peer sent a message nested more than "
                    f"{MAX_NESTING_DEPTH} levels deep (at stream offset {offset})"
                )
        else:
            # A '}' closing a '[' (or the reverse) is left to msgspec,
            # which rejects the message as malformed.
            self._depth -= 1
        return self._depth == 0

    def _next_message_started(self) -> bool:
        """Skip whitespace between messages; True if a '{' follows.

        Any other byte there is a framing error.
        """
        self._skip_whitespace()
        if self._pos == len(self._buffer):
            return False
        byte = self._buffer[self._pos]
        if byte != _OPEN_BRACE:
            batch = " (JSON-RPC batches are not supported)"
            self._fail(
                f"the peer sent byte {byte:#04x} at stream offset "
                f"{self._stream_offset(self._pos)} where a message must start "
                f"with '{{'{batch if byte == _OPEN_BRACKET else ''}"
            )
        return True

    def _skip_whitespace(self) -> None:
        skipped = _WHITESPACE.match(self._buffer, self._pos)
        assert skipped is not None  # the pattern matches the empty string
        self._advance(skipped.end())
        self._consumed = self._pos

    def _stream_offset(self, pos: int) -> int:
        """The offset in the whole stream of buffer position ``pos``."""
        return self._received_bytes - len(self._buffer) + pos

    def _advance(self, pos: int) -> None:
        self._scanned_bytes += pos - self._pos
        self._pos = pos

    def _check_size(self, end: int) -> None:
        if end - self._start > self._max_message_size:
            self._fail(
                f"the peer sent a message larger than the "
                f"{self._max_message_size}-byte limit"
            )

    def _compact(self) -> None:
        consumed = self._consumed
        if consumed == 0:
            return
        if consumed < _COMPACT_AT and consumed * 2 < len(self._buffer):
            return
        del self._buffer[:consumed]
        self._pos -= consumed
        self._start = max(0, self._start - consumed)
        self._consumed = 0

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, message: str) -> None:
        self._error = FramingError(message)
        raise self._error


def _decode(document: bytes) -> tuple[Message, int]:
    """Decode one complete JSON object; its message and announced fd count."""
    try:
        document.decode("utf-8")
        envelope = _ENVELOPE_DECODER.decode(document)
    except (UnicodeDecodeError, msgspec.DecodeError) as exc:
        raise FramingError(f"the peer sent malformed JSON: {exc}") from exc
    return _classify(document, envelope), _fd_count(envelope)


def _fd_count(envelope: _Envelope) -> int:
    if isinstance(envelope.fds, UnsetType):
        return 0
    try:
        count: int = _FD_COUNT_DECODER.decode(envelope.fds)
    except msgspec.ValidationError as exc:
        # Without a count the fd FIFO can no longer be matched to messages.
        raise FramingError(
            f"the peer sent an unusable 'fds' member ({exc}): "
            f"{bytes(envelope.fds)[:40]!r}"
        ) from exc
    return count


def _classify(document: bytes, envelope: _Envelope) -> Message:
    if not isinstance(envelope.method, UnsetType):
        decoder: msgspec.json.Decoder[Request] | msgspec.json.Decoder[Response]
        decoder = _REQUEST_DECODER
    elif not (
        isinstance(envelope.result, UnsetType) and isinstance(envelope.error, UnsetType)
    ):
        decoder = _RESPONSE_DECODER
    else:
        reason = "not a request or a response: no method, result or error member"
        return InvalidMessage(_read_id(envelope.id), reason)
    try:
        message = decoder.decode(document)
    except msgspec.ValidationError as exc:
        return InvalidMessage(_read_id(envelope.id), str(exc))
    if isinstance(message, Response) and not (
        isinstance(message.result, UnsetType) ^ isinstance(message.error, UnsetType)
    ):
        reason = "a response must have exactly one of result and error"
        return InvalidMessage(message.id, reason)
    return message


def _read_id(raw: Raw | UnsetType) -> RequestId:
    """The message's id if it is a valid one, else None (as the spec says)."""
    if isinstance(raw, UnsetType):
        return None
    try:
        value: RequestId = _ID_DECODER.decode(raw)
    except msgspec.ValidationError:
        return None
    return value
