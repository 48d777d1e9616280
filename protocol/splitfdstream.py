"""The splitfdstream chunk codec, sans-I/O.

A splitfdstream is a sequence of chunks with no header or footer. Each chunk
starts with a signed 64-bit little-endian prefix: a negative prefix ``-n`` is
followed by ``n`` bytes of inline data; a prefix ``k >= 0`` stands for the whole
content of external file number ``k``, which travels beside the stream (as an
fd). Inline bytes and external files, concatenated in order, rebuild the
original byte stream (for a layer: the uncompressed tar).

Strategy and bounds: the reader keeps at most one 8-byte prefix buffered and
hands inline data on as it arrives, so one huge inline chunk never sits in
memory; an inline chunk may therefore be reported as several ``Inline``
events. Work is O(n) in the bytes fed. The writer coalesces adjacent inline
pieces into one chunk and emits it once ``max_chunk`` bytes are pending.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_INLINE",
    "External",
    "Inline",
    "SplitFDStreamError",
    "SplitFDStreamReader",
    "SplitFDStreamWriter",
    "external_prefix",
    "inline_prefix",
]

_PREFIX = struct.Struct("<q")
_PREFIX_SIZE = _PREFIX.size
_INT64_MAX = 2**63 - 1

#: Largest inline chunk a reader accepts by default (64 GiB). Real writers
#: emit tar headers, padding and small files inline; a declared size beyond
#: this means a corrupt or hostile stream rather than data worth waiting for.
DEFAULT_MAX_INLINE = 64 << 30


class SplitFDStreamError(ValueError):
    """The splitfdstream is malformed: the fault of whoever produced it."""


@dataclass(frozen=True, slots=True)
class Inline:
    """Inline bytes of the original stream (possibly part of a larger chunk)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class External:
    """The whole content of external file number ``index``."""

    index: int


def inline_prefix(n: int) -> bytes:
    """Return the prefix announcing ``n`` (1 .. 2**63-1) bytes of inline data."""
    if not 0 < n <= _INT64_MAX:
        raise ValueError(f"inline chunk size must be in 1..2**63-1, got {n}")
    return _PREFIX.pack(-n)


def external_prefix(index: int) -> bytes:
    """Return the chunk standing for external file number ``index``."""
    if not 0 <= index <= _INT64_MAX:
        raise ValueError(f"external file index must be in 0..2**63-1, got {index}")
    return _PREFIX.pack(index)


class SplitFDStreamReader:
    """Turns splitfdstream bytes into ``Inline`` and ``External`` events.

    Feed bytes as they arrive; call ``finish`` at end of input, which raises
    ``SplitFDStreamError`` when the stream stops inside a chunk.
    """

    def __init__(self, *, max_inline: int = DEFAULT_MAX_INLINE) -> None:
        self._max_inline = max_inline
        self._prefix = bytearray()
        self._inline_left = 0
        self._offset = 0

    @property
    def offset(self) -> int:
        """Bytes of stream consumed so far."""
        return self._offset

    def feed(self, data: bytes) -> list[Inline | External]:
        """Consume ``data`` and return the events it completes."""
        events: list[Inline | External] = []
        view = memoryview(data)
        pos = 0
        end = len(view)
        while pos < end:
            if self._inline_left:
                take = min(self._inline_left, end - pos)
                events.append(Inline(bytes(view[pos : pos + take])))
                self._inline_left -= take
                pos += take
                continue
            take = min(_PREFIX_SIZE - len(self._prefix), end - pos)
            self._prefix += view[pos : pos + take]
            pos += take
            if len(self._prefix) == _PREFIX_SIZE:
                event = self._decode_prefix(self._offset + pos - _PREFIX_SIZE)
                if event is not None:
                    events.append(event)
        self._offset += end
        return events

    def _decode_prefix(self, at: int) -> External | None:
        (prefix,) = _PREFIX.unpack(self._prefix)
        self._prefix.clear()
        if prefix >= 0:
            return External(prefix)
        size = -prefix
        if size > self._max_inline:
            raise SplitFDStreamError(
                f"splitfdstream chunk at offset {at} declares {size} inline bytes,"
                f" more than the limit of {self._max_inline}"
            )
        self._inline_left = size
        return None

    def finish(self) -> None:
        """Declare end of input; raise if the stream ends inside a chunk."""
        if self._prefix:
            raise SplitFDStreamError(
                f"splitfdstream truncated: {len(self._prefix)} bytes of a chunk"
                f" prefix at offset {self._offset - len(self._prefix)}"
            )
        if self._inline_left:
            raise SplitFDStreamError(
                f"splitfdstream truncated: {self._inline_left} inline bytes"
                f" missing at offset {self._offset}"
            )


class SplitFDStreamWriter:
    """Produces splitfdstream bytes; the caller writes what each call returns.

    Adjacent inline pieces are merged into one chunk, so a tar header, a small
    file and its padding cost one prefix; pending inline data is emitted as soon
    as it reaches ``max_chunk`` bytes.
    """

    def __init__(self, *, max_chunk: int = 1 << 20) -> None:
        if max_chunk <= 0:
            raise ValueError(f"max_chunk must be positive, got {max_chunk}")
        self._max_chunk = max_chunk
        self._pending = bytearray()

    def inline(self, data: bytes) -> bytes:
        """Queue inline bytes; return any full chunks ready to be written."""
        self._pending += data
        if len(self._pending) < self._max_chunk:
            return b""
        return self._flush()

    def external(self, index: int) -> bytes:
        """Return pending inline data followed by the chunk for file ``index``."""
        return self._flush() + external_prefix(index)

    def finish(self) -> bytes:
        """Return whatever inline data is still pending."""
        return self._flush()

    def _flush(self) -> bytes:
        if not self._pending:
            return b""
        out = inline_prefix(len(self._pending)) + self._pending
        self._pending = bytearray()
        return bytes(out)
