"""tar-split metadata, sans-I/O: the raw tar bytes containers-storage keeps.

When containers-storage applies a layer it records, beside the unpacked
files, a gzip'd stream of JSON lines (one object per line) from which the
original uncompressed tar can be rebuilt byte for byte:

- ``{"type": 2, "payload": BASE64, "position": N}``: a *segment*, raw tar
  bytes (headers, PAX and GNU long-name records, padding, the end blocks);
- ``{"type": 1, "name": NAME, "size": N, "payload": CRC64, "position": N}``:
  a *file*, standing for ``size`` content bytes of the entry named ``NAME``
  (``name_raw``, base64, replaces ``name`` when the name is not UTF-8). A
  size of 0 (directories, links, empty files) needs no content at all.

Segments and file contents concatenated in order are the tar.

Strategy and bounds: :class:`TarSplitDecoder` inflates what it is fed and
splits complete lines, so memory holds one partial line plus one inflated
chunk; a line longer than ``max_line`` is refused rather than buffered. Work
is O(n) in the inflated bytes. :func:`content_path` turns an entry name into
path components beneath the layer's directory and refuses names that could
leave it; it never touches a file system.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import msgspec

__all__ = [
    "FileEntry",
    "Segment",
    "TarSplitDecoder",
    "TarSplitError",
    "content_path",
]

SEGMENT_TYPE = 2
FILE_TYPE = 1

#: The longest JSON line accepted by default. Segments hold one entry's
#: headers and padding; even a PAX record with large xattrs stays far below.
DEFAULT_MAX_LINE = 64 << 20


class TarSplitError(ValueError):
    """The tar-split metadata is malformed: the store is damaged."""


@dataclass(frozen=True)
class Segment:
    """Raw tar bytes to copy to the output as they are."""

    payload: bytes


@dataclass(frozen=True)
class FileEntry:
    """Content bytes of one tar entry, to be read from the unpacked layer."""

    #: The entry's name as the tar header spells it (bytes: may not be UTF-8).
    name: bytes
    size: int
    #: tar-split's CRC-64 (ISO) of the content; None when the entry has none.
    crc64: bytes | None


class _Line(msgspec.Struct):
    type: int
    payload: bytes | None = None
    name: str = ""
    name_raw: bytes | None = None
    size: int = 0


_decode_line = msgspec.json.Decoder(_Line).decode


class TarSplitDecoder:
    """Feed gzip'd tar-split bytes, get :class:`Segment` and :class:`FileEntry`.

    Call :meth:`finish` after the last byte: it raises when the gzip stream
    or the last line is incomplete.
    """

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        # wbits 16+15: a gzip wrapper around a deflate stream.
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = bytearray()
        self._max_line = max_line
        self._lines = 0

    def feed(self, data: bytes) -> list[Segment | FileEntry]:
        try:
            inflated = self._inflater.decompress(data)
        except zlib.error as exc:
            raise TarSplitError(f"tar-split gzip stream is corrupt: {exc}") from None
        if self._inflater.unused_data:
            raise TarSplitError("tar-split has bytes after its gzip stream")
        return self._split_lines(inflated)

    def finish(self) -> list[Segment | FileEntry]:
        if not self._inflater.eof:
            raise TarSplitError("tar-split gzip stream ends early")
        entries: list[Segment | FileEntry] = []
        if self._pending.strip():
            entries.append(self._decode(bytes(self._pending)))
        self._pending.clear()
        return entries

    def _split_lines(self, inflated: bytes) -> list[Segment | FileEntry]:
        entries: list[Segment | FileEntry] = []
        start = 0
        while (end := inflated.find(b"\n", start)) != -1:
            if self._pending:
                self._pending += inflated[start:end]
                line = bytes(self._pending)
                self._pending.clear()
            else:
                line = inflated[start:end]
            start = end + 1
            if line.strip():
                entries.append(self._decode(line))
        self._pending += inflated[start:]
        if len(self._pending) > self._max_line:
            raise TarSplitError(
                f"tar-split line {self._lines + 1} is longer than "
                f"{self._max_line} bytes"
            )
        return entries

    def _decode(self, line: bytes) -> Segment | FileEntry:
        self._lines += 1
        if len(line) > self._max_line:
            raise TarSplitError(
                f"tar-split line {self._lines} is longer than {self._max_line} bytes"
            )
        try:
            decoded = _decode_line(line)
        except msgspec.DecodeError as exc:
            raise TarSplitError(f"tar-split line {self._lines}: {exc}") from None
        if decoded.type == SEGMENT_TYPE:
            return Segment(decoded.payload or b"")
        if decoded.type == FILE_TYPE:
            if decoded.size < 0:
                raise TarSplitError(
                    f"tar-split line {self._lines}: negative size {decoded.size}"
                )
            name = decoded.name_raw or decoded.name.encode("utf-8")
            return FileEntry(name=name, size=decoded.size, crc64=decoded.payload)
        raise TarSplitError(
            f"tar-split line {self._lines}: unknown entry type {decoded.type}"
        )


def content_path(name: bytes) -> tuple[bytes, ...]:
    """The components of a tar entry's content file beneath the layer root.

    Leading ``/`` and ``.`` components are dropped, as joining the name to the
    root does in containers-storage; ``..`` anywhere is refused, since
    joining would then climb out of the layer. Raises TarSplitError for a
    name that is empty once cleaned or that climbs.
    """
    components: list[bytes] = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            raise TarSplitError(
                f"tar-split names {name!r}, which climbs out of the layer: refused"
            )
        if b"\0" in part:
            raise TarSplitError(f"tar-split names {name!r}, with a NUL byte: refused")
        components.append(part)
    if not components:
        raise TarSplitError(f"tar-split gives content to {name!r}, not a file")
    return tuple(components)
