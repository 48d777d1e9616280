"""The splitfdstream codec against the format in REFERENCE.md section 3."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.splitfdstream import (
    External,
    Inline,
    SplitFDStreamError,
    SplitFDStreamReader,
    SplitFDStreamWriter,
    external_prefix,
    inline_prefix,
)


def test_inline_prefix_is_negated_size_as_signed_64_bit_little_endian() -> None:
    assert inline_prefix(5) == b"\xfb\xff\xff\xff\xff\xff\xff\xff"
    assert inline_prefix(512) == b"\x00\xfe\xff\xff\xff\xff\xff\xff"


def test_external_prefix_is_index_as_64_bit_little_endian() -> None:
    assert external_prefix(0) == b"\x00" * 8
    assert external_prefix(258) == b"\x02\x01\x00\x00\x00\x00\x00\x00"


def test_prefixes_refuse_values_outside_the_format() -> None:
    with pytest.raises(ValueError):
        inline_prefix(0)
    with pytest.raises(ValueError):
        inline_prefix(2**63)
    with pytest.raises(ValueError):
        external_prefix(-1)


def test_reader_decodes_a_hand_written_stream() -> None:
    stream = (
        b"\xfd\xff\xff\xff\xff\xff\xff\xff"
        + b"abc"
        + b"\x07"
        + b"\x00" * 7
        # a second inline chunk right after an external one
        + b"\xff\xff\xff\xff\xff\xff\xff\xff"
        + b"z"
    )
    reader = SplitFDStreamReader()
    assert reader.feed(stream) == [Inline(b"abc"), External(7), Inline(b"z")]
    reader.finish()


def test_reader_accepts_an_empty_stream() -> None:
    reader = SplitFDStreamReader()
    assert reader.feed(b"") == []
    reader.finish()


def test_reader_reports_inline_data_truncated_at_finish() -> None:
    reader = SplitFDStreamReader()
    reader.feed(b"\xf6\xff\xff\xff\xff\xff\xff\xff" + b"12345")
    with pytest.raises(SplitFDStreamError, match="5 inline bytes missing"):
        reader.finish()


def test_reader_reports_a_truncated_prefix_at_finish() -> None:
    reader = SplitFDStreamReader()
    reader.feed(b"\x01\x00\x00")
    with pytest.raises(SplitFDStreamError, match="prefix"):
        reader.finish()


def test_reader_refuses_the_most_negative_prefix() -> None:
    reader = SplitFDStreamReader()
    with pytest.raises(SplitFDStreamError, match="9223372036854775808 inline"):
        reader.feed(b"\x00\x00\x00\x00\x00\x00\x00\x80")


def test_reader_refuses_inline_chunks_above_its_limit() -> None:
    reader = SplitFDStreamReader(max_inline=100)
    with pytest.raises(SplitFDStreamError, match="offset 0 declares 101"):
        reader.feed((-101).to_bytes(8, "little", signed=True))


def test_writer_merges_adjacent_inline_pieces_into_one_chunk() -> None:
    writer = SplitFDStreamWriter()
    out = writer.inline(b"head") + writer.inline(b"er") + writer.external(3)
    out += writer.inline(b"pad") + writer.finish()
    assert out == (
        (-6).to_bytes(8, "little", signed=True)
        + b"header"
        + (3).to_bytes(8, "little")
        + (-3).to_bytes(8, "little", signed=True)
        + b"pad"
    )


def test_writer_emits_pending_inline_data_once_it_reaches_max_chunk() -> None:
    writer = SplitFDStreamWriter(max_chunk=4)
    assert writer.inline(b"ab") == b""
    assert writer.inline(b"cde") == (-5).to_bytes(8, "little", signed=True) + b"abcde"
    assert writer.finish() == b""


def _pieces() -> st.SearchStrategy[list[bytes | int]]:
    piece: st.SearchStrategy[bytes | int] = st.one_of(
        st.binary(min_size=1, max_size=300), st.integers(0, 2**63 - 1)
    )
    return st.lists(piece, max_size=30)


def _chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks = []
    pos = 0
    for size in sizes:
        chunks.append(data[pos : pos + size])
        pos += size
    chunks.append(data[pos:])
    return chunks


@given(
    pieces=_pieces(),
    max_chunk=st.integers(1, 500),
    sizes=st.lists(st.integers(0, 64), max_size=40),
)
def test_round_trip_through_writer_and_reader(
    pieces: list[bytes | int], max_chunk: int, sizes: list[int]
) -> None:
    writer = SplitFDStreamWriter(max_chunk=max_chunk)
    stream = b"".join(
        writer.inline(p) if isinstance(p, bytes) else writer.external(p) for p in pieces
    )
    stream += writer.finish()

    reader = SplitFDStreamReader()
    events: list[Inline | External] = []
    for chunk in _chunked(stream, sizes):
        events += reader.feed(chunk)
    reader.finish()

    # Inline pieces may be regrouped; externals and the byte order may not.
    decoded: list[bytes | int] = []
    for event in events:
        if isinstance(event, External):
            decoded.append(event.index)
        elif decoded and isinstance(decoded[-1], bytes):
            decoded[-1] += event.data
        else:
            decoded.append(event.data)
    expected: list[bytes | int] = []
    for p in pieces:
        if isinstance(p, bytes) and expected and isinstance(expected[-1], bytes):
            expected[-1] += p
        else:
            expected.append(p)
    assert decoded == expected
