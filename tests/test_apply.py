"""Applying layers: the result must equal what GNU tar extracts.

Each layer is made by GNU tar (or tarfile, for entries GNU tar will not write,
such as hostile names); the expected tree is ``tar -x`` of the same bytes into
another directory, and whiteout results are literal sets from the OCI spec.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.errors import SourceError
from proxy.apply import LayerApplier, UnsafeEntryError
from proxy.layercache import CachedLayer, LayerCache

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
is_root = os.geteuid() == 0


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs the {tool} command")


def gnu_tar(tree: Path, fmt: str = "posix", *extra: str) -> bytes:
    require("tar")
    return subprocess.run(
        ["tar", f"--format={fmt}", *extra, "-cf", "-", "-C", tree, "."],
        capture_output=True,
        check=True,
    ).stdout


def gnu_extract(data: bytes, dest: Path, *extra: str) -> None:
    dest.mkdir(exist_ok=True)
    subprocess.run(["tar", *extra, "-xf", "-", "-C", dest], input=data, check=True)


def set_times(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def xattrs_supported(path: Path) -> bool:
    probe = path / "xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


def make_tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "lib" / ("deep" * 30)).mkdir(parents=True)
    (tree / "tmp").mkdir(mode=0o1777)
    os.chmod(tree / "tmp", 0o1777)
    (tree / "root").mkdir(mode=0o700)
    (tree / "usr" / "bin" / "big").write_bytes(os.urandom(100_000))
    (tree / "usr" / "bin" / "suid").write_bytes(os.urandom(5000))
    os.chmod(tree / "usr" / "bin" / "suid", 0o4755)
    (tree / "usr" / "lib" / ("deep" * 30) / ("name" * 40)).write_bytes(b"long\n")
    (tree / "exactly512").write_bytes(b"5" * 512)
    (tree / "empty").write_bytes(b"")
    (tree / "readonly").write_bytes(b"r" * 10_000)
    os.chmod(tree / "readonly", 0o444)
    os.symlink("usr/bin/big", tree / "relative-link")
    os.symlink("/etc/passwd", tree / "absolute-link")
    os.symlink("t" * 300, tree / "long-link")
    os.link(tree / "usr" / "bin" / "big", tree / "big-hardlink")
    os.link(tree / "exactly512", tree / "usr" / "small-hardlink")
    os.mkfifo(tree / "fifo")
    if is_root:
        os.chown(tree / "usr" / "bin" / "suid", 1234, 5678)
        os.chmod(tree / "usr" / "bin" / "suid", 0o4755)
        os.lchown(tree / "absolute-link", 42, 43)
    if xattrs_supported(root):
        os.setxattr(tree / "usr" / "bin" / "big", "user.origin", b"\x00binary\xff")
        os.setxattr(tree / "usr", "user.dir", b"d")
    for number, path in enumerate(sorted(tree.rglob("*"), reverse=True)):
        set_times(path, 1_600_000_000_123_456_789 + number * 1_000_000_007)
    set_times(tree, 1_500_000_000_000_000_001)
    return tree


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything tar -x restores, by path, plus which paths share an inode."""
    found: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        rel = path.relative_to(root).as_posix()
        info = path.lstat()
        mode = info.st_mode
        detail: object = None
        if stat.S_ISREG(mode):
            detail = hashlib.sha256(path.read_bytes()).hexdigest()
            inodes.setdefault(info.st_ino, []).append(rel)
        elif stat.S_ISLNK(mode):
            detail = os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            detail = (os.major(info.st_rdev), os.minor(info.st_rdev))
        xattrs = {}
        if not stat.S_ISLNK(mode):
            for name in os.listxattr(path):
                if name.startswith("user."):
                    xattrs[name] = os.getxattr(path, name)
        found[rel] = (
            stat.S_IFMT(mode),
            stat.S_IMODE(mode),
            info.st_size if not stat.S_ISDIR(mode) else None,
            detail,
            info.st_mtime_ns,
            info.st_uid,
            info.st_gid,
            sorted(xattrs.items()),
        )
    links = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    found["<hardlink groups>"] = tuple(tuple(group) for group in links)
    return found


def cached(tmp_path: Path, data: bytes) -> CachedLayer:
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    return LayerCache(tmp_path / "cache").build(diff_id, io.BytesIO(data), OCI_TAR)


class ExternalFiles:
    """Opens a cached layer's files on demand and records the order asked."""

    def __init__(self, layer: CachedLayer) -> None:
        self.layer = layer
        self.asked: list[int] = []
        self.fds: list[int] = []

    def __call__(self, index: int) -> int:
        self.asked.append(index)
        fd = os.open(self.layer.files[index], os.O_RDONLY | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def apply_cached(applier: LayerApplier, layer: CachedLayer) -> ExternalFiles:
    external = ExternalFiles(layer)
    try:
        with layer.stream_path.open("rb") as stream:
            applier.apply(stream, external)
    finally:
        external.close()
    return external


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path)


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_apply_tar_gives_what_gnu_tar_extracts(
    tmp_path: Path, tree: Path, fmt: str
) -> None:
    extra = ("--xattrs",) if fmt == "posix" else ()
    data = gnu_tar(tree, fmt, *extra)
    gnu_extract(data, tmp_path / "expected", *extra)
    (tmp_path / "ours").mkdir()
    LayerApplier(tmp_path / "ours").apply_tar(io.BytesIO(data))
    assert snapshot(tmp_path / "ours") == snapshot(tmp_path / "expected")


def test_apply_splitfdstream_gives_what_gnu_tar_extracts(
    tmp_path: Path, tree: Path
) -> None:
    data = gnu_tar(tree, "posix", "--xattrs")
    gnu_extract(data, tmp_path / "expected", "--xattrs")
    layer = cached(tmp_path, data)
    (tmp_path / "ours").mkdir()
    applier = LayerApplier(tmp_path / "ours")
    external = apply_cached(applier, layer)
    assert snapshot(tmp_path / "ours") == snapshot(tmp_path / "expected")
    assert external.asked == sorted(external.asked) == list(range(layer.file_count))
    # big, suid and readonly are over the 4096-byte inline threshold.
    assert applier.stats.bytes_reflinked + applier.stats.bytes_copied == (
        100_000 + 5000 + 10_000
    )


def test_stats_count_what_was_applied(tmp_path: Path, tree: Path) -> None:
    data = gnu_tar(tree)
    (tmp_path / "ours").mkdir()
    applier = LayerApplier(tmp_path / "ours")
    applier.apply_tar(io.BytesIO(data))
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = archive.getmembers()
    stats = applier.stats
    assert stats.files == sum(m.isreg() for m in members)
    assert stats.directories == sum(m.isdir() for m in members)
    assert stats.symlinks == sum(m.issym() for m in members)
    assert stats.hardlinks == sum(m.islnk() for m in members)
    assert stats.fifos == 1


@pytest.mark.skipif(not is_root, reason="creating device nodes needs root")
def test_devices_are_created_as_gnu_tar_does(tmp_path: Path) -> None:
    data = tar_of(
        entry("dev", tarfile.DIRTYPE),
        entry("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        entry("dev/loop9", tarfile.BLKTYPE, devmajor=7, devminor=9, mode=0o660),
    )
    gnu_extract(data, tmp_path / "expected")
    (tmp_path / "ours").mkdir()
    applier = LayerApplier(tmp_path / "ours")
    applier.apply_tar(io.BytesIO(data))
    ours, expected = snapshot(tmp_path / "ours"), snapshot(tmp_path / "expected")
    # The layer has no "." entry, so the destination's own times are not set.
    del ours["."], expected["."]
    assert ours == expected
    assert applier.stats.devices == 2


def test_devices_are_skipped_and_counted_without_the_right_to_create_them(
    tmp_path: Path,
) -> None:
    if not is_root:
        pytest.skip("as root the device is created; the skip path needs non-root")
    data = tar_of(entry("null", tarfile.CHRTYPE, devmajor=1, devminor=3))
    (tmp_path / "ours").mkdir()
    # A child without CAP_MKNOD: the same code path as an unprivileged user.
    script = (
        "import io, sys; from pathlib import Path; from proxy.apply import"
        " LayerApplier; a = LayerApplier(Path(sys.argv[1]), preserve_owner=False);"
        " a.apply_tar(io.BytesIO(sys.stdin.buffer.read()));"
        " print(a.stats.devices_skipped, a.stats.devices)"
    )
    if shutil.which("setpriv") is None:
        pytest.skip("needs the setpriv command to drop CAP_MKNOD")
    result = subprocess.run(
        ["setpriv", "--inh-caps=-mknod", "--bounding-set=-mknod", "--"]
        + [sys.executable, "-c", script, str(tmp_path / "ours")],
        input=data,
        capture_output=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert result.stdout.split() == [b"1", b"0"]
    assert list((tmp_path / "ours").iterdir()) == []


# Layers made with tarfile, for entries GNU tar does not write.


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    linkname: str = "",
    mode: int = 0o644,
    devmajor: int = 0,
    devminor: int = 0,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data)
    info.linkname = linkname
    info.mode = mode if kind != tarfile.DIRTYPE or mode != 0o644 else 0o755
    info.devmajor, info.devminor = devmajor, devminor
    info.mtime = 1_700_000_000
    return info, data


def tar_of(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def paths(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    dest = tmp_path / "rootfs"
    dest.mkdir()
    LayerApplier(dest).apply_tar(
        io.BytesIO(
            tar_of(
                entry("a", tarfile.DIRTYPE),
                entry("a/keep", data=b"keep"),
                entry("a/gone", data=b"gone"),
                entry("a/dir", tarfile.DIRTYPE),
                entry("a/dir/inner", data=b"inner"),
                entry("b", tarfile.DIRTYPE),
                entry("b/old", data=b"old"),
                entry("b/sub", tarfile.DIRTYPE),
                entry("b/sub/old2", data=b"old2"),
                entry("c", data=b"c"),
            )
        )
    )
    return dest


def test_whiteouts_remove_lower_files_and_trees(lower: Path) -> None:
    applier = LayerApplier(lower)
    applier.apply_tar(
        io.BytesIO(
            tar_of(
                entry("a/.wh.gone"),
                entry("a/.wh.dir"),
                entry(".wh.c"),
                entry("a/.wh.never-existed"),
            )
        )
    )
    assert paths(lower) == {"a", "a/keep", "b", "b/old", "b/sub", "b/sub/old2"}
    assert applier.stats.whiteouts == 4


def test_opaque_directory_keeps_only_this_layers_entries_wherever_the_marker_is(
    lower: Path,
) -> None:
    LayerApplier(lower).apply_tar(
        io.BytesIO(
            tar_of(
                entry("b", tarfile.DIRTYPE),
                entry("b/new", data=b"new"),
                entry("b/sub", tarfile.DIRTYPE),
                entry("b/sub/new2", data=b"new2"),
                # The marker comes after its siblings.
                entry("b/.wh..wh..opq"),
            )
        )
    )
    assert paths(lower) == {
        "a",
        "a/keep",
        "a/gone",
        "a/dir",
        "a/dir/inner",
        "b",
        "b/new",
        "b/sub",
        "b/sub/new2",
        "c",
    }
    assert (lower / "b" / "new").read_bytes() == b"new"


def test_opaque_marker_first_then_new_entries(lower: Path) -> None:
    LayerApplier(lower).apply_tar(
        io.BytesIO(tar_of(entry("b/.wh..wh..opq"), entry("b/fresh", data=b"f")))
    )
    assert {p for p in paths(lower) if p.startswith("b")} == {"b", "b/fresh"}


def test_whiteout_in_the_same_layer_does_not_hide_that_layers_file(
    lower: Path,
) -> None:
    LayerApplier(lower).apply_tar(
        io.BytesIO(tar_of(entry("a/added", data=b"x"), entry("a/.wh.added")))
    )
    assert (lower / "a" / "added").read_bytes() == b"x"


def test_upper_layer_replaces_files_and_keeps_directory_contents(
    lower: Path,
) -> None:
    LayerApplier(lower).apply_tar(
        io.BytesIO(
            tar_of(
                entry("a", tarfile.DIRTYPE, mode=0o700),
                entry("c", tarfile.SYMTYPE, linkname="a/keep"),
                entry("a/dir", data=b"now a file"),
            )
        )
    )
    assert (lower / "a" / "keep").read_bytes() == b"keep"
    assert stat.S_IMODE((lower / "a").stat().st_mode) == 0o700
    assert os.readlink(lower / "c") == "a/keep"
    assert (lower / "a" / "dir").read_bytes() == b"now a file"


# Hostile layers: refused with the entry's name, nothing written outside DEST.


@pytest.fixture
def jail(tmp_path: Path) -> tuple[Path, Path]:
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    return dest, outside


def assert_outside_untouched(outside: Path) -> None:
    assert paths(outside) == {"victim"}
    assert (outside / "victim").read_bytes() == b"precious"


@pytest.mark.parametrize(
    "hostile",
    [
        [entry("../outside/x", data=b"evil")],
        [entry("a/../../outside/x", data=b"evil")],
        [entry("a", tarfile.LNKTYPE, linkname="../outside/victim")],
        [entry("a", tarfile.LNKTYPE, linkname="../../etc/passwd")],
        [entry("a", tarfile.LNKTYPE, linkname="/etc/passwd")],
    ],
    ids=["dotdot", "nested-dotdot", "hardlink-out", "hardlink-etc", "hardlink-abs"],
)
def test_escaping_names_are_refused_with_the_entry_name(
    jail: tuple[Path, Path], hostile: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    dest, outside = jail
    name = hostile[-1][0].name
    with pytest.raises(UnsafeEntryError, match=repr(name).replace(".", r"\.")):
        LayerApplier(dest).apply_tar(io.BytesIO(tar_of(*hostile)))
    assert_outside_untouched(outside)
    assert not (dest / "a").exists()


def test_absolute_names_are_refused(jail: tuple[Path, Path]) -> None:
    dest, outside = jail
    target = outside / "absolute"
    with pytest.raises(UnsafeEntryError, match="absolute"):
        LayerApplier(dest).apply_tar(io.BytesIO(tar_of(entry(str(target), data=b"x"))))
    assert not target.exists()
    assert_outside_untouched(outside)


@pytest.mark.parametrize(
    "second",
    [
        entry("a/victim", data=b"overwritten"),
        entry("a/new", data=b"planted"),
        entry("a/sub", tarfile.DIRTYPE),
        entry("a/.wh.victim"),
        entry("a/.wh..wh..opq"),
        entry("a/link", tarfile.SYMTYPE, linkname="x"),
        entry("b", tarfile.LNKTYPE, linkname="a/victim"),
    ],
    ids=["overwrite", "create", "mkdir", "whiteout", "opaque", "symlink", "hardlink"],
)
@pytest.mark.parametrize("link_target", ["absolute", "../outside"])
def test_writes_through_a_planted_symlink_are_refused(
    jail: tuple[Path, Path], second: tuple[tarfile.TarInfo, bytes], link_target: str
) -> None:
    dest, outside = jail
    target = str(outside) if link_target == "absolute" else link_target
    layer = tar_of(entry("a", tarfile.SYMTYPE, linkname=target), second)
    with pytest.raises(UnsafeEntryError, match="'" + second[0].name):
        LayerApplier(dest).apply_tar(io.BytesIO(layer))
    assert_outside_untouched(outside)


def test_symlink_from_a_lower_layer_is_not_followed_either(
    jail: tuple[Path, Path],
) -> None:
    dest, outside = jail
    os.symlink(outside, dest / "lower-link")
    with pytest.raises(UnsafeEntryError, match="lower-link/victim"):
        LayerApplier(dest).apply_tar(
            io.BytesIO(tar_of(entry("lower-link/victim", data=b"overwritten")))
        )
    assert_outside_untouched(outside)


def test_hardlink_to_a_missing_file_names_the_entry(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="'ghost-link'.*'ghost'"):
        LayerApplier(tmp_path).apply_tar(
            io.BytesIO(tar_of(entry("ghost-link", tarfile.LNKTYPE, linkname="ghost")))
        )


# Reflinks on a loop-mounted XFS.


FIEMAP_EXTENT_SHARED = 0x2000


@pytest.fixture
def xfs_mount(tmp_path: Path) -> Iterator[Path]:
    if not is_root:
        pytest.skip("mounting a loop XFS needs root")
    for tool in ("mkfs.xfs", "losetup", "mount", "umount", "filefrag"):
        require(tool)
    image = tmp_path / "xfs.img"
    with image.open("wb") as f:
        f.truncate(300 << 20)
    subprocess.run(
        ["mkfs.xfs", "-q", "-m", "reflink=1", str(image)],
        check=True,
        capture_output=True,
    )
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)],
        capture_output=True,
        text=True,
    )
    if device.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device: {device.stderr.strip()}")
    loop = device.stdout.strip()
    mountpoint = tmp_path / "xfs"
    mountpoint.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", loop, str(mountpoint)], capture_output=True, text=True
        )
        if mounted.returncode != 0:
            pytest.skip(f"mount of a loop XFS failed: {mounted.stderr.strip()}")
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)


def shared_extents(path: Path) -> bool:
    report = subprocess.run(
        ["filefrag", "-v", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return "shared" in report


def test_external_files_are_reflinked_on_xfs(xfs_mount: Path, tree: Path) -> None:
    data = gnu_tar(tree)
    layer = cached(xfs_mount, data)
    dest = xfs_mount / "rootfs"
    dest.mkdir()
    applier = LayerApplier(dest)
    apply_cached(applier, layer)
    assert applier.stats.bytes_reflinked == 100_000 + 5000 + 10_000
    assert applier.stats.bytes_copied == 0
    os.sync()
    assert shared_extents(dest / "usr" / "bin" / "big")
    assert (dest / "usr" / "bin" / "big").read_bytes() == (
        tree / "usr" / "bin" / "big"
    ).read_bytes()


def test_without_reflinks_files_are_copied_and_counted(
    tmp_path: Path, tree: Path
) -> None:
    data = gnu_tar(tree)
    layer = cached(tmp_path, data)
    (tmp_path / "ours").mkdir()
    applier = LayerApplier(tmp_path / "ours")
    apply_cached(applier, layer)
    stats = applier.stats
    assert stats.bytes_reflinked + stats.bytes_copied == 100_000 + 5000 + 10_000
    assert (tmp_path / "ours" / "readonly").read_bytes() == b"r" * 10_000


def test_external_file_not_matching_one_entry_is_read_as_tar_bytes(
    tmp_path: Path, tree: Path
) -> None:
    data = gnu_tar(tree)
    gnu_extract(data, tmp_path / "expected")
    whole = tmp_path / "whole.tar"
    whole.write_bytes(data)
    # A splitfdstream whose only chunk is external file 0: the entire tar.
    stream = io.BytesIO((0).to_bytes(8, "little"))
    (tmp_path / "ours").mkdir()
    fd = os.open(whole, os.O_RDONLY | os.O_CLOEXEC)
    try:
        LayerApplier(tmp_path / "ours").apply(stream, lambda index: fd)
    finally:
        os.close(fd)
    assert snapshot(tmp_path / "ours") == snapshot(tmp_path / "expected")


def test_truncated_splitfdstream_is_a_source_error(tmp_path: Path) -> None:
    stream = io.BytesIO((-100).to_bytes(8, "little", signed=True) + b"short")
    with pytest.raises(SourceError, match="truncated"):
        LayerApplier(tmp_path).apply(stream, lambda index: -1)


@pytest.mark.parametrize("name", ["./.wh...", "./.wh..", "a/.wh...", "a/.wh.."])
def test_whiteouts_of_dot_and_dot_dot_are_refused_and_delete_nothing(
    lower: Path, name: str
) -> None:
    # A sibling of DEST stands for everything outside it.
    outside = lower.parent / "precious"
    outside.write_text("keep me")
    before = paths(lower)
    with pytest.raises(SourceError) as caught:
        LayerApplier(lower).apply_tar(io.BytesIO(tar_of(entry(name))))
    assert name.lstrip("./") in str(caught.value) or name in str(caught.value)
    assert outside.read_text() == "keep me"
    assert paths(lower) == before
