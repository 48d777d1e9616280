"""A streaming tar splitter that keeps every byte of the archive, sans-I/O.

``TarSplitter.feed`` turns arbitrary pieces of an uncompressed tar into events:
``Header`` (all header blocks of one entry, raw, with the parsed ``TarEntry``),
``Content`` (the entry's data), ``Padding`` (the bytes up to the next 512
boundary) and ``Trailer`` (the end-of-archive blocks and anything after them).
Concatenating the raw bytes of all events gives back the input byte for byte,
which is what lets a layer be rebuilt with the same sha256 (its diffID).

Formats: ustar (with the prefix field), GNU (long names ``L``, long links
``K``, base-256 numbers) and POSIX pax (local ``x`` and global ``g`` records,
with ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*`` extended attributes). GNU
sparse files, in either the old ``S`` type or the pax ``GNU.sparse.*`` form,
are refused: their data is not the file's content.

Strategy and bounds: content is handed on as slices of the fed chunk, never
buffered. Only the header blocks of the entry being parsed are kept (capped by
``max_header_size``), plus less than one 512-byte block and the padding, so
memory is one entry's headers plus one feed chunk, and work is O(n).
Bytes after the first zero block are the trailer: archives concatenated
without ``--ignore-zeros`` semantics are not parsed past it, like GNU tar.
An archive that ends right after an entry, without end-of-archive blocks, is
accepted (Python's tarfile does the same); the diffID check catches a layer
cut there.
"""

from __future__ import annotations

import base64
import enum
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from protocol.errors import SourceError

__all__ = [
    "BLOCK_SIZE",
    "OPAQUE_WHITEOUT",
    "WHITEOUT_PREFIX",
    "Content",
    "EntryType",
    "Header",
    "Padding",
    "TarEntry",
    "TarEvent",
    "TarFormatError",
    "TarSplitter",
    "Trailer",
    "is_opaque_whiteout",
    "whiteout_target",
]

BLOCK_SIZE = 512
WHITEOUT_PREFIX = ".wh."
#: Marks its directory opaque: entries of lower layers below it are hidden.
OPAQUE_WHITEOUT = ".wh..wh..opq"
_WHITEOUT_META_PREFIX = ".wh..wh."

_ZERO_BLOCK = bytes(BLOCK_SIZE)
_PAX_DECIMAL = re.compile(r"[+-]?[0-9]+(\.[0-9]*)?|[+-]?\.[0-9]+")
_POSIX_MAGIC = b"ustar\x00"


class TarFormatError(SourceError):
    """The layer's tar stream is malformed or uses a feature we refuse."""


class EntryType(enum.Enum):
    """What kind of file a tar entry describes."""

    REGULAR = "regular"
    HARDLINK = "hardlink"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    DIRECTORY = "directory"
    FIFO = "fifo"
    OTHER = "other"


_TYPES = {
    b"0": EntryType.REGULAR,
    b"\x00": EntryType.REGULAR,
    # Contiguous files are regular files to every modern reader.
    b"7": EntryType.REGULAR,
    b"1": EntryType.HARDLINK,
    b"2": EntryType.SYMLINK,
    b"3": EntryType.CHAR,
    b"4": EntryType.BLOCK,
    b"5": EntryType.DIRECTORY,
    b"6": EntryType.FIFO,
}

# POSIX says no data blocks follow these, whatever the size field says.
_HEADER_ONLY = frozenset(
    {
        EntryType.HARDLINK,
        EntryType.SYMLINK,
        EntryType.CHAR,
        EntryType.BLOCK,
        EntryType.DIRECTORY,
        EntryType.FIFO,
    }
)


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One file of the archive, with pax and GNU extensions applied.

    ``size`` is the number of content bytes that follow the header (0 for
    links, directories and devices). Names are decoded as UTF-8 with
    surrogate escapes, so ``name.encode("utf-8", "surrogateescape")`` gives the
    archive's bytes back.
    """

    name: str
    type: EntryType
    typeflag: bytes
    size: int
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    mtime: float
    #: The same instant in integer nanoseconds, exact even for pax fractions.
    mtime_ns: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Header:
    """All header blocks of one entry, exactly as in the archive."""

    raw: bytes
    entry: TarEntry


@dataclass(frozen=True, slots=True)
class Content:
    """A piece of the current entry's data."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Padding:
    """The bytes after an entry's data up to the next 512-byte boundary."""

    raw: bytes


@dataclass(frozen=True, slots=True)
class Trailer:
    """End-of-archive blocks and anything after them, verbatim."""

    raw: bytes


TarEvent = Header | Content | Padding | Trailer


def whiteout_target(name: str) -> str | None:
    """Return the path a ``.wh.NAME`` whiteout entry deletes, else None.

    Opaque markers and other ``.wh..wh.`` metadata names are not whiteouts of
    a file and give None; see ``is_opaque_whiteout``.
    """
    parent, base = posixpath.split(name.rstrip("/"))
    if not base.startswith(WHITEOUT_PREFIX) or base.startswith(_WHITEOUT_META_PREFIX):
        return None
    target = base[len(WHITEOUT_PREFIX) :]
    if not target:
        return None
    if target in (".", ".."):
        # ".wh.." and ".wh..." would whiteout the directory itself or its
        # parent: no tool writes them, and honouring them deletes outside the
        # entry's directory.
        raise TarFormatError(f"whiteout entry {name!r} names {target!r}, not a file")
    return posixpath.join(parent, target)


def is_opaque_whiteout(name: str) -> bool:
    """Whether the entry marks its directory opaque (``.wh..wh..opq``)."""
    return posixpath.basename(name.rstrip("/")) == OPAQUE_WHITEOUT


class _State(enum.Enum):
    HEADER = enum.auto()
    EXTENSION_DATA = enum.auto()
    CONTENT = enum.auto()
    PADDING = enum.auto()
    TRAILER = enum.auto()


class TarSplitter:
    """Splits a tar stream into raw header, content, padding and trailer events.

    :param max_header_size: the most bytes of extension headers (pax records,
        GNU long names) one entry may carry before it is refused.
    """

    def __init__(self, *, max_header_size: int = 16 << 20) -> None:
        self._max_header_size = max_header_size
        self._state = _State.HEADER
        # Header blocks of the current entry, raw; only ever one entry's worth.
        self._headers = bytearray()
        self._block = bytearray()
        self._left = 0
        self._padding_left = 0
        self._padding = bytearray()
        self._offset = 0
        self._entry_offset = 0
        # Extension header being read: its typeflag and where its data starts.
        self._ext_type = b""
        self._ext_start = 0
        self._ext_size = 0
        self._global_pax: dict[str, bytes] = {}
        self._local_pax: dict[str, bytes] = {}
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None

    @property
    def offset(self) -> int:
        """Bytes of archive consumed so far."""
        return self._offset

    @property
    def content_left(self) -> int:
        """Content bytes of the current entry not yet consumed (0 between entries)."""
        return self._left if self._state is _State.CONTENT else 0

    def skip_content(self, n: int) -> None:
        """Account for ``n`` content bytes the caller received out of band.

        A splitfdstream carries a large file's content as an external file
        rather than inline bytes; the splitter still needs to know it went by.
        """
        if n > self.content_left or n < 0:
            raise TarFormatError(
                f"{n} bytes of out-of-band content at offset {self._offset} do not"
                f" fit the current entry, which has {self.content_left} left"
            )
        self._left -= n
        self._offset += n
        if self._left == 0:
            self._end_content()

    def feed(self, data: bytes) -> list[TarEvent]:
        """Consume the next piece of the archive and return the events it ends."""
        events: list[TarEvent] = []
        view = memoryview(data)
        pos = 0
        end = len(view)
        while pos < end:
            state = self._state
            if state is _State.CONTENT:
                take = min(self._left, end - pos)
                events.append(Content(bytes(view[pos : pos + take])))
                pos += take
                self._left -= take
                if self._left == 0:
                    self._end_content()
            elif state is _State.PADDING:
                take = min(self._padding_left, end - pos)
                self._padding += view[pos : pos + take]
                pos += take
                self._padding_left -= take
                if self._padding_left == 0:
                    events.append(Padding(bytes(self._padding)))
                    self._padding.clear()
                    self._state = _State.HEADER
            elif state is _State.TRAILER:
                events.append(Trailer(bytes(view[pos:])))
                pos = end
            else:
                take = min(BLOCK_SIZE - len(self._block), end - pos)
                self._block += view[pos : pos + take]
                pos += take
                if len(self._block) == BLOCK_SIZE:
                    block_offset = self._offset + pos - BLOCK_SIZE
                    self._on_block(block_offset, events)
        self._offset += end
        return events

    def finish(self) -> None:
        """Declare end of input; raise ``TarFormatError`` if it cut an entry."""
        if self._state is _State.TRAILER:
            return
        if self._state is _State.HEADER and not self._headers and not self._block:
            return
        raise TarFormatError(
            f"tar archive truncated at offset {self._offset}, inside the entry"
            f" whose headers start at offset {self._entry_offset}"
        )

    def _end_content(self) -> None:
        if self._padding_left:
            self._state = _State.PADDING
        else:
            self._state = _State.HEADER

    def _on_block(self, offset: int, events: list[TarEvent]) -> None:
        block = bytes(self._block)
        self._block.clear()
        if self._state is _State.EXTENSION_DATA:
            self._headers += block
            self._left -= BLOCK_SIZE
            if self._left == 0:
                self._end_extension()
            return

        if not self._headers:
            self._entry_offset = offset
            if block == _ZERO_BLOCK:
                self._state = _State.TRAILER
                events.append(Trailer(block))
                return
        elif block == _ZERO_BLOCK:
            raise TarFormatError(
                f"tar archive ends at offset {offset} after extension headers"
                f" (from offset {self._entry_offset}) with no entry for them"
            )

        _verify_checksum(block, offset)
        typeflag = block[156:157]
        self._headers += block
        if typeflag in (b"x", b"g", b"L", b"K"):
            self._start_extension(block, typeflag, offset)
            return
        if typeflag == b"S":
            raise TarFormatError(
                f"tar entry at offset {self._entry_offset} is a GNU sparse file,"
                " which we do not support"
            )
        entry = self._make_entry(block, typeflag, offset)
        events.append(Header(bytes(self._headers), entry))
        self._headers.clear()
        self._local_pax = {}
        self._long_name = None
        self._long_link = None
        self._left = entry.size
        self._padding_left = -entry.size % BLOCK_SIZE
        self._state = _State.CONTENT if entry.size else _State.HEADER

    def _start_extension(self, block: bytes, typeflag: bytes, offset: int) -> None:
        size = _number(block[124:136], "size", offset)
        if size < 0 or len(self._headers) + size > self._max_header_size:
            raise TarFormatError(
                f"tar entry at offset {self._entry_offset} has {size} bytes of"
                f" extension headers, more than the limit of {self._max_header_size}"
            )
        self._ext_type = typeflag
        self._ext_start = len(self._headers)
        self._ext_size = size
        self._left = size + -size % BLOCK_SIZE
        if size:
            self._state = _State.EXTENSION_DATA
        else:
            self._end_extension()

    def _end_extension(self) -> None:
        start = self._ext_start
        data = bytes(self._headers[start : start + self._ext_size])
        self._state = _State.HEADER
        offset = self._entry_offset + self._ext_start - BLOCK_SIZE
        if self._ext_type == b"x":
            self._local_pax.update(_pax_records(data, offset))
        elif self._ext_type == b"g":
            for key, value in _pax_records(data, offset).items():
                if value:
                    self._global_pax[key] = value
                else:
                    self._global_pax.pop(key, None)
        elif self._ext_type == b"L":
            self._long_name = data.split(b"\x00", 1)[0]
        else:
            self._long_link = data.split(b"\x00", 1)[0]

    def _make_entry(self, block: bytes, typeflag: bytes, offset: int) -> TarEntry:
        pax = dict(self._global_pax)
        pax.update(self._local_pax)
        if any(key.startswith("GNU.sparse.") for key in pax):
            raise TarFormatError(
                f"tar entry at offset {self._entry_offset} is a pax GNU sparse"
                " file, which we do not support"
            )

        name_bytes = _cstring(block[0:100])
        if block[257:263] == _POSIX_MAGIC:
            prefix = _cstring(block[345:500])
            if prefix:
                name_bytes = prefix + b"/" + name_bytes
        if self._long_name is not None:
            name_bytes = self._long_name
        link_bytes = self._long_link
        if link_bytes is None:
            link_bytes = _cstring(block[157:257])

        entry_type = _TYPES.get(typeflag, EntryType.OTHER)
        if typeflag == b"\x00" and name_bytes.endswith(b"/"):
            # Pre-POSIX archives mark directories only by a trailing slash.
            entry_type = EntryType.DIRECTORY

        size = _pax_int(pax, "size", offset)
        if size is None:
            size = _number(block[124:136], "size", offset)
        if entry_type in _HEADER_ONLY:
            size = 0
        elif size < 0:
            raise TarFormatError(f"tar header at offset {offset} has a negative size")

        uid = _pax_int(pax, "uid", offset)
        gid = _pax_int(pax, "gid", offset)
        return TarEntry(
            name=_text(pax.get("path") or name_bytes),
            type=entry_type,
            typeflag=typeflag,
            size=size,
            mode=_number(block[100:108], "mode", offset) & 0o7777,
            uid=uid if uid is not None else _number(block[108:116], "uid", offset),
            gid=gid if gid is not None else _number(block[116:124], "gid", offset),
            uname=_text(pax.get("uname") or _cstring(block[265:297])),
            gname=_text(pax.get("gname") or _cstring(block[297:329])),
            mtime=_mtime(pax, block, offset),
            mtime_ns=_mtime_ns(pax, block, offset),
            linkname=_text(pax.get("linkpath") or link_bytes),
            devmajor=_number(block[329:337], "devmajor", offset),
            devminor=_number(block[337:345], "devminor", offset),
            xattrs=_xattrs(pax, offset),
        )


def _verify_checksum(block: bytes, offset: int) -> None:
    stored_field = block[148:156]
    try:
        stored = _number(stored_field, "checksum", offset)
    except TarFormatError:
        raise TarFormatError(
            f"tar header at offset {offset} is not a tar header"
            f" (checksum field {stored_field!r})"
        ) from None
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored == unsigned:
        return
    # Some old tars summed signed chars; GNU tar and tarfile accept both.
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b >= 0x80)
    if stored != signed:
        raise TarFormatError(
            f"tar header at offset {offset} has a bad checksum"
            f" (stored {stored}, computed {unsigned})"
        )


def _number(raw: bytes, what: str, offset: int) -> int:
    if raw and raw[0] & 0x80:
        # GNU base-256: 0x80 marks a positive number, 0xff a negative one.
        value = int.from_bytes(raw[1:], "big")
        if raw[0] == 0xFF:
            value -= 1 << (8 * (len(raw) - 1))
        return value
    text = raw.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(
            f"tar header at offset {offset} has a malformed {what} field {raw!r}"
        ) from None


def _cstring(raw: bytes) -> bytes:
    return raw.split(b"\x00", 1)[0]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, offset: int) -> dict[str, bytes]:
    """Parse ``"%d %s=%s\\n"`` records, where the length counts the whole record."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            # Padding after the last record.
            break
        space = data.find(b" ", pos)
        length_text = data[pos:space] if space > pos else b""
        if not length_text.isdigit():
            raise TarFormatError(f"pax header at offset {offset} has a bad record")
        end = pos + int(length_text)
        if end > len(data) or end <= space or data[end - 1] != 0x0A:
            raise TarFormatError(
                f"pax header at offset {offset} has a record of bad length"
            )
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise TarFormatError(
                f"pax header at offset {offset} has a record with no ="
            )
        records[_text(key)] = value
        pos = end
    return records


def _pax_int(pax: dict[str, bytes], key: str, offset: int) -> int | None:
    value = pax.get(key)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise TarFormatError(
            f"pax header before offset {offset} has a malformed {key} {value!r}"
        ) from None


def _mtime(pax: dict[str, bytes], block: bytes, offset: int) -> float:
    value = pax.get("mtime")
    if value:
        try:
            return float(value)
        except ValueError:
            raise TarFormatError(
                f"pax header before offset {offset} has a malformed mtime {value!r}"
            ) from None
    return float(_number(block[136:148], "mtime", offset))


def _mtime_ns(pax: dict[str, bytes], block: bytes, offset: int) -> int:
    value = pax.get("mtime")
    if not value:
        return _number(block[136:148], "mtime", offset) * 1_000_000_000
    # Split the decimal by hand so no float rounding creeps in.
    text = value.decode("ascii", "replace").strip()
    if _PAX_DECIMAL.fullmatch(text) is None:
        raise TarFormatError(
            f"pax header before offset {offset} has a malformed mtime {value!r}"
        )
    negative = text.startswith("-")
    whole, _, fraction = text.lstrip("+-").partition(".")
    ns = int(whole or "0") * 1_000_000_000 + int((fraction[:9] or "0").ljust(9, "0"))
    return -ns if negative else ns


def _xattrs(pax: dict[str, bytes], offset: int) -> dict[str, bytes]:
    xattrs: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            xattrs[key[len("SCHILY.xattr.") :]] = value
        elif key.startswith("LIBARCHIVE.xattr."):
            # libarchive percent-encodes the name and base64-encodes the value.
            name = unquote(key[len("LIBARCHIVE.xattr.") :], errors="surrogateescape")
            try:
                xattrs[name] = base64.b64decode(value + b"=" * (-len(value) % 4))
            except ValueError:
                raise TarFormatError(
                    f"pax header before offset {offset} has a bad base64 value"
                    f" for {key}"
                ) from None
    return xattrs
