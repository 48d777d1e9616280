"""The tar splitter against archives written by GNU tar and Python's tarfile.

Expected values come from those implementations (``tar -tf``, ``tarfile``)
and from the bytes of the archive itself, never from the splitter.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.tar import (
    Content,
    EntryType,
    Header,
    Padding,
    TarEntry,
    TarEvent,
    TarFormatError,
    TarSplitter,
    Trailer,
    is_opaque_whiteout,
    whiteout_target,
)

LONG_DIR = "d" * 120
LONG_FILE = "f" * 150  # LONG_DIR/LONG_FILE is over 255 characters
LONG_TARGET = "t" * 200

needs_gnu_tar = pytest.mark.skipif(
    shutil.which("tar") is None, reason="needs GNU tar (the tar command)"
)


def split(data: bytes, sizes: Iterator[int] | None = None) -> list[TarEvent]:
    splitter = TarSplitter()
    events: list[TarEvent] = []
    pos = 0
    while pos < len(data):
        size = next(sizes) if sizes is not None else len(data)
        events += splitter.feed(data[pos : pos + size])
        pos += size
    splitter.finish()
    return events


def raw_of(events: list[TarEvent]) -> bytes:
    return b"".join(e.data if isinstance(e, Content) else e.raw for e in events)


def entries_of(events: list[TarEvent]) -> list[TarEntry]:
    return [e.entry for e in events if isinstance(e, Header)]


def make_tree(root: Path) -> Path:
    tree = root / "tree"
    deep = tree / LONG_DIR
    deep.mkdir(parents=True)
    (deep / LONG_FILE).write_bytes(b"deep content\n")
    (tree / "exactly512").write_bytes(bytes(range(256)) * 2)
    (tree / "empty").write_bytes(b"")
    (tree / "big").write_bytes(os.urandom(70_000))
    os.symlink("exactly512", tree / "short-link")
    os.symlink(LONG_TARGET, tree / "long-link")
    os.link(tree / "exactly512", tree / "hardlink")
    os.link(deep / LONG_FILE, tree / "hardlink-to-long")
    os.mkfifo(tree / "fifo")
    os.chmod(tree / "big", 0o4755)
    os.utime(tree / "empty", (1_000_000_000.25, 1_000_000_000.25))
    return tree


def xattrs_supported(path: Path) -> bool:
    try:
        os.setxattr(path, "user.test", b"value")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def gnu_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar (the tar command)")
    root = tmp_path_factory.mktemp("gnu")
    tree = make_tree(root)
    archives = {}
    for fmt in ("posix", "gnu"):
        out = root / f"{fmt}.tar"
        subprocess.run(
            ["tar", f"--format={fmt}", "-cf", out, "-C", tree, "."], check=True
        )
        archives[fmt] = out.read_bytes()
    # ustar cannot hold the long names; give it names that need the prefix field.
    ustar_tree = root / "ustar-tree"
    (ustar_tree / ("p" * 90) / ("q" * 40)).mkdir(parents=True)
    (ustar_tree / ("p" * 90) / ("q" * 40) / "file").write_bytes(b"x" * 1000)
    out = root / "ustar.tar"
    subprocess.run(
        ["tar", "--format=ustar", "-cf", out, "-C", ustar_tree, "."], check=True
    )
    archives["ustar"] = out.read_bytes()
    if xattrs_supported(tree / "exactly512"):
        os.setxattr(tree / "big", "user.checksum", b"\x00\xffbinary")
        out = root / "xattrs.tar"
        subprocess.run(
            ["tar", "--format=posix", "--xattrs", "-cf", out, "-C", tree, "."],
            check=True,
        )
        archives["xattrs"] = out.read_bytes()
    return archives


def tarfile_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.getmembers()


_TARFILE_TYPES = {
    tarfile.REGTYPE: EntryType.REGULAR,
    tarfile.AREGTYPE: EntryType.REGULAR,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.DIRTYPE: EntryType.DIRECTORY,
    tarfile.FIFOTYPE: EntryType.FIFO,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
}


def assert_matches_tarfile(data: bytes) -> None:
    entries = entries_of(split(data))
    members = tarfile_members(data)
    assert len(entries) == len(members)
    for entry, member in zip(entries, members, strict=True):
        # tarfile drops a directory's trailing slash.
        assert entry.name.rstrip("/") == member.name
        assert entry.type == _TARFILE_TYPES[member.type]
        assert entry.size == (member.size if member.isreg() else 0)
        assert entry.mode == member.mode
        assert (entry.uid, entry.gid) == (member.uid, member.gid)
        assert (entry.uname, entry.gname) == (member.uname, member.gname)
        assert entry.mtime == member.mtime
        assert entry.linkname == member.linkname
        assert (entry.devmajor, entry.devminor) == (member.devmajor, member.devminor)
        schily = {
            k.removeprefix("SCHILY.xattr."): v
            for k, v in member.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        assert {
            k: v.decode("utf-8", "surrogateescape") for k, v in entry.xattrs.items()
        } == schily


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["posix", "gnu", "ustar", "xattrs"])
def test_gnu_tar_archive_is_rebuilt_byte_for_byte(
    gnu_archives: dict[str, bytes], fmt: str
) -> None:
    if fmt not in gnu_archives:
        pytest.skip("the filesystem of the temporary directory refuses user xattrs")
    data = gnu_archives[fmt]
    assert raw_of(split(data)) == data


@needs_gnu_tar
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(sizes=st.lists(st.integers(1, 1500), min_size=1, max_size=50))
def test_any_split_into_chunks_concatenates_back_to_the_input(
    gnu_archives: dict[str, bytes], sizes: list[int]
) -> None:
    for data in gnu_archives.values():
        events = split(data, iter(sizes * (len(data) // sum(sizes) + 1)))
        assert raw_of(events) == data


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["posix", "gnu", "ustar"])
def test_names_are_those_gnu_tar_lists(
    gnu_archives: dict[str, bytes], fmt: str
) -> None:
    listing = subprocess.run(
        ["tar", "-tf", "-"],
        input=gnu_archives[fmt],
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert [e.name for e in entries_of(split(gnu_archives[fmt]))] == listing.split(
        "\n"
    )[:-1]


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["posix", "gnu", "ustar", "xattrs"])
def test_fields_equal_what_tarfile_reports(
    gnu_archives: dict[str, bytes], fmt: str
) -> None:
    if fmt not in gnu_archives:
        pytest.skip("the filesystem of the temporary directory refuses user xattrs")
    assert_matches_tarfile(gnu_archives[fmt])


@needs_gnu_tar
def test_long_names_links_and_special_files_from_gnu_tar(
    gnu_archives: dict[str, bytes],
) -> None:
    for fmt in ("posix", "gnu"):
        by_name = {e.name: e for e in entries_of(split(gnu_archives[fmt]))}
        assert by_name[f"./{LONG_DIR}/{LONG_FILE}"].size == len(b"deep content\n")
        assert by_name["./long-link"].type is EntryType.SYMLINK
        assert by_name["./long-link"].linkname == LONG_TARGET
        assert by_name["./hardlink-to-long"].linkname == f"./{LONG_DIR}/{LONG_FILE}"
        assert by_name["./fifo"].type is EntryType.FIFO
        assert by_name["./empty"].size == 0
        assert by_name["./big"].mode == 0o4755


@needs_gnu_tar
def test_pax_mtime_keeps_its_fraction(gnu_archives: dict[str, bytes]) -> None:
    by_name = {e.name: e for e in entries_of(split(gnu_archives["posix"]))}
    assert by_name["./empty"].mtime == 1_000_000_000.25


@needs_gnu_tar
def test_xattrs_come_from_schily_records(gnu_archives: dict[str, bytes]) -> None:
    if "xattrs" not in gnu_archives:
        pytest.skip("the filesystem of the temporary directory refuses user xattrs")
    by_name = {e.name: e for e in entries_of(split(gnu_archives["xattrs"]))}
    assert by_name["./big"].xattrs["user.checksum"] == b"\x00\xffbinary"


def test_content_of_an_exactly_512_byte_file_has_no_padding() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("five-twelve")
        info.size = 512
        archive.addfile(info, io.BytesIO(b"a" * 512))
    events = split(buf.getvalue())
    assert [type(e) for e in events[:2]] == [Header, Content]
    assert events[1] == Content(b"a" * 512)
    assert isinstance(events[2], Trailer)


def test_padding_is_reported_verbatim() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("three")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    events = split(buf.getvalue())
    assert events[1:3] == [Content(b"abc"), Padding(bytes(509))]


def test_content_is_passed_through_not_buffered() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("large")
        info.size = 3 << 20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    data = buf.getvalue()
    splitter = TarSplitter()
    for pos in range(0, len(data), 65536):
        events = splitter.feed(data[pos : pos + 65536])
        # Every piece of content leaves with the feed that brought it.
        assert sum(len(e.data) for e in events if isinstance(e, Content)) <= 65536
    splitter.finish()


def test_base256_numbers_and_negative_mtime_from_tarfile() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("huge-ids")
        info.uid = 3_000_000_000
        info.gid = 2**40
        info.mtime = -86400
        archive.addfile(info)
    (entry,) = entries_of(split(buf.getvalue()))
    assert (entry.uid, entry.gid, entry.mtime) == (3_000_000_000, 2**40, -86400.0)
    assert_matches_tarfile(buf.getvalue())


def test_devices_and_global_pax_headers_from_tarfile() -> None:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=tarfile.PAX_FORMAT,
        pax_headers={"uname": "globaluser"},
    ) as archive:
        for name, kind, major, minor in (
            ("dev/null", tarfile.CHRTYPE, 1, 3),
            ("dev/loop0", tarfile.BLKTYPE, 7, 0),
        ):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.devmajor, info.devminor = major, minor
            info.mode = 0o666
            archive.addfile(info)
    data = buf.getvalue()
    entries = entries_of(split(data))
    assert [(e.type, e.devmajor, e.devminor) for e in entries] == [
        (EntryType.CHAR, 1, 3),
        (EntryType.BLOCK, 7, 0),
    ]
    assert [e.uname for e in entries] == ["globaluser", "globaluser"]
    assert raw_of(split(data)) == data


def test_pax_path_size_and_ids_override_the_ustar_fields() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("x" * 300)
        info.size = 5
        info.pax_headers = {"uid": "123456789", "gid": "987654321"}
        archive.addfile(info, io.BytesIO(b"hello"))
    (entry,) = entries_of(split(buf.getvalue()))
    assert entry.name == "x" * 300
    assert (entry.uid, entry.gid, entry.size) == (123456789, 987654321, 5)


def test_libarchive_xattrs_are_decoded() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("file")
        info.pax_headers = {
            "LIBARCHIVE.xattr.user.with%20space": base64.b64encode(b"v\x00l").decode(),
            "LIBARCHIVE.xattr.security.capability": "AQAAAg",  # unpadded base64
        }
        archive.addfile(info)
    (entry,) = entries_of(split(buf.getvalue()))
    assert entry.xattrs == {
        "user.with space": b"v\x00l",
        "security.capability": b"\x01\x00\x00\x02",
    }


def test_bad_checksum_names_the_header_offset() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name in ("one", "two"):
            info = tarfile.TarInfo(name)
            info.size = 10
            archive.addfile(info, io.BytesIO(b"0123456789"))
    data = bytearray(buf.getvalue())
    data[1024 + 2] ^= 0x01  # the name of the second header, at offset 1024
    with pytest.raises(TarFormatError, match="offset 1024 has a bad checksum"):
        split(bytes(data))


def test_truncated_archive_is_an_error_at_finish() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        info = tarfile.TarInfo("cut")
        info.size = 2000
        archive.addfile(info, io.BytesIO(bytes(2000)))
    splitter = TarSplitter()
    splitter.feed(buf.getvalue()[:1500])
    with pytest.raises(TarFormatError, match="truncated at offset 1500"):
        splitter.finish()


def test_truncated_header_block_is_an_error_at_finish() -> None:
    splitter = TarSplitter()
    splitter.feed(tarfile.TarInfo("name").tobuf()[:100])
    with pytest.raises(TarFormatError, match="truncated"):
        splitter.finish()


def test_empty_input_is_an_empty_archive() -> None:
    assert split(b"") == []


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_files_are_refused(tmp_path: Path, fmt: str) -> None:
    sparse = tmp_path / "sparse"
    with sparse.open("wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    out = tmp_path / "sparse.tar"
    subprocess.run(
        ["tar", f"--format={fmt}", "--sparse", "-cf", out, "-C", tmp_path, "sparse"],
        check=True,
    )
    with pytest.raises(TarFormatError, match="sparse"):
        split(out.read_bytes())


def test_whiteout_names() -> None:
    assert whiteout_target("etc/.wh.passwd") == "etc/passwd"
    assert whiteout_target("./.wh.tmp") == "./tmp"
    assert whiteout_target(".wh.top") == "top"
    assert whiteout_target("etc/passwd") is None
    assert whiteout_target("etc/.wh..wh..opq") is None
    assert whiteout_target("etc/.wh..wh.plnk") is None
    assert is_opaque_whiteout("var/cache/.wh..wh..opq")
    assert is_opaque_whiteout(".wh..wh..opq")
    assert not is_opaque_whiteout("var/cache/.wh.opq")


@needs_gnu_tar
def test_pax_mtime_in_nanoseconds_matches_what_gnu_tar_extracts(
    gnu_archives: dict[str, bytes], tmp_path: Path
) -> None:
    subprocess.run(
        ["tar", "-xf", "-", "-C", tmp_path], input=gnu_archives["posix"], check=True
    )
    for entry in entries_of(split(gnu_archives["posix"])):
        if entry.type is EntryType.REGULAR:
            assert entry.mtime_ns == (tmp_path / entry.name).stat().st_mtime_ns


def test_skip_content_stands_for_bytes_received_out_of_band() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("outside")
        info.size = 1000
        archive.addfile(info, io.BytesIO(bytes(1000)))
    data = buf.getvalue()
    splitter = TarSplitter()
    events = splitter.feed(data[:512])
    assert splitter.content_left == 1000
    splitter.skip_content(1000)
    events += splitter.feed(data[1512:])
    splitter.finish()
    assert [type(e) for e in events[:2]] == [Header, Padding]
    assert all(isinstance(e, Trailer) for e in events[2:])
    with pytest.raises(TarFormatError, match="do not fit"):
        splitter.skip_content(1)
