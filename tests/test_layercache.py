"""The layer cache: verified builds, byte-exact reconstruction, atomic publish.

Layers are made by GNU tar and compressed by the gzip and zstd commands; the
expected digest is hashlib's sha256 of the tar GNU tar wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from protocol.errors import (
    DigestMismatchError,
    RetryableError,
    SourceError,
    UnsupportedError,
)
from protocol.splitfdstream import External, Inline, SplitFDStreamReader
from proxy.api import CachedLayerStream
from proxy.layercache import CachedLayer, LayerCache, LayerCacheError

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs the {tool} command")


@pytest.fixture(scope="module")
def layer_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    require("tar")
    tree = tmp_path_factory.mktemp("layer") / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "tool").write_bytes(os.urandom(200_000))
    (tree / "usr" / "bin" / "threshold").write_bytes(b"t" * 4096)
    (tree / "usr" / "bin" / "just-over").write_bytes(b"o" * 4097)
    (tree / "etc").mkdir()
    (tree / "etc" / "hostname").write_bytes(b"box\n")
    (tree / "etc" / "empty").write_bytes(b"")
    (tree / "etc" / ("long" * 40)).write_bytes(os.urandom(9000))
    os.symlink("../usr/bin/tool", tree / "etc" / "tool-link")
    os.link(tree / "usr" / "bin" / "tool", tree / "usr" / "bin" / "tool-hardlink")
    return subprocess.run(
        ["tar", "--format=posix", "-cf", "-", "-C", tree, "."],
        capture_output=True,
        check=True,
    ).stdout


def compress(data: bytes, tool: str) -> bytes:
    require(tool)
    return subprocess.run(
        [tool, "-c"], input=data, capture_output=True, check=True
    ).stdout


def diff_id_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def reconstruct(layer: CachedLayer) -> bytes:
    reader = SplitFDStreamReader()
    out = bytearray()
    for event in reader.feed(layer.stream_path.read_bytes()):
        if isinstance(event, Inline):
            out += event.data
        else:
            assert isinstance(event, External)
            out += layer.files[event.index].read_bytes()
    reader.finish()
    return bytes(out)


def regular_files_over(data: bytes, threshold: int) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return sum(1 for m in archive if m.isreg() and m.size > threshold)


@pytest.mark.parametrize(
    ("media_type", "tool"),
    [(OCI_GZIP, "gzip"), (DOCKER_GZIP, "gzip"), (OCI_ZSTD, "zstd"), (OCI_TAR, None)],
)
def test_build_reconstructs_the_original_tar(
    tmp_path: Path, layer_tar: bytes, media_type: str, tool: str | None
) -> None:
    blob = compress(layer_tar, tool) if tool else layer_tar
    cache = LayerCache(tmp_path)
    layer = cache.build(diff_id_of(layer_tar), io.BytesIO(blob), media_type)
    assert (
        hashlib.sha256(reconstruct(layer)).hexdigest()
        == hashlib.sha256(layer_tar).hexdigest()
    )
    assert layer.size == len(layer_tar)


def test_only_files_over_the_inline_threshold_are_external(
    tmp_path: Path, layer_tar: bytes
) -> None:
    cache = LayerCache(tmp_path, inline_threshold=4096)
    layer = cache.build(diff_id_of(layer_tar), io.BytesIO(layer_tar), OCI_TAR)
    assert layer.file_count == len(layer.files) == regular_files_over(layer_tar, 4096)
    assert layer.file_count == 3  # tool, just-over and the long-named file


def test_cached_files_are_read_only(tmp_path: Path, layer_tar: bytes) -> None:
    layer = LayerCache(tmp_path).build(
        diff_id_of(layer_tar), io.BytesIO(layer_tar), OCI_TAR
    )
    for path in [layer.stream_path, *layer.files]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o444


def test_lookup_finds_a_published_layer_from_a_new_cache_object(
    tmp_path: Path, layer_tar: bytes
) -> None:
    diff_id = diff_id_of(layer_tar)
    assert LayerCache(tmp_path).lookup(diff_id) is None
    built = LayerCache(tmp_path).build(diff_id, io.BytesIO(layer_tar), OCI_TAR)
    assert LayerCache(tmp_path).lookup(diff_id) == built


def published_entries(root: Path) -> list[Path]:
    return list((root / "layers" / "sha256").iterdir())


def build_leftovers(root: Path) -> list[Path]:
    return list((root / "tmp").iterdir())


def test_diff_id_mismatch_names_both_digests_and_publishes_nothing(
    tmp_path: Path, layer_tar: bytes
) -> None:
    wrong = "sha256:" + "0" * 64
    cache = LayerCache(tmp_path)
    with pytest.raises(DigestMismatchError) as raised:
        cache.build(wrong, io.BytesIO(compress(layer_tar, "gzip")), OCI_GZIP)
    assert raised.value.expected == wrong
    assert raised.value.actual == diff_id_of(layer_tar)
    assert wrong in str(raised.value) and diff_id_of(layer_tar) in str(raised.value)
    assert cache.lookup(wrong) is None
    assert published_entries(tmp_path) == []
    assert build_leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("media_type", "tool"), [(OCI_GZIP, "gzip"), (OCI_ZSTD, "zstd")]
)
def test_truncated_blob_fails_and_leaves_nothing_lookup_returns(
    tmp_path: Path, layer_tar: bytes, media_type: str, tool: str
) -> None:
    blob = compress(layer_tar, tool)
    diff_id = diff_id_of(layer_tar)
    cache = LayerCache(tmp_path)
    with pytest.raises(SourceError):
        cache.build(diff_id, io.BytesIO(blob[: len(blob) // 2]), media_type)
    assert cache.lookup(diff_id) is None
    assert published_entries(tmp_path) == []
    assert build_leftovers(tmp_path) == []


def test_garbage_instead_of_gzip_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="sha256:" + "1" * 64):
        LayerCache(tmp_path).build(
            "sha256:" + "1" * 64, io.BytesIO(b"not gzip at all" * 100), OCI_GZIP
        )


class BarrierReader(io.BytesIO):
    """A blob that makes two builds both start before either can finish."""

    def __init__(self, data: bytes, barrier: threading.Barrier) -> None:
        super().__init__(data)
        self._barrier: threading.Barrier | None = barrier

    def read(self, size: int | None = -1) -> bytes:
        if self._barrier is not None:
            self._barrier.wait(timeout=60)
            self._barrier = None
        return super().read(size)


def test_concurrent_builds_of_one_diff_id_give_one_good_entry(
    tmp_path: Path, layer_tar: bytes
) -> None:
    diff_id = diff_id_of(layer_tar)
    cache = LayerCache(tmp_path)
    barrier = threading.Barrier(2)
    results: list[CachedLayer] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            blob = BarrierReader(layer_tar, barrier)
            results.append(cache.build(diff_id, blob, OCI_TAR))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert results[0] == results[1]
    assert len(published_entries(tmp_path)) == 1
    assert build_leftovers(tmp_path) == []
    assert reconstruct(results[0]) == layer_tar


REPO = Path(__file__).resolve().parents[1]
# Builds from its stdin into the cache at argv[1], as the proxy would.
CHILD_BUILD = (
    "import sys; from pathlib import Path;"
    " from proxy.layercache import LayerCache;"
    " LayerCache(Path(sys.argv[1])).build("
    "sys.argv[2], sys.stdin.buffer, 'application/vnd.oci.image.layer.v1.tar')"
)
# Bounds for waits that only end if the code works; never asserted on.
GENEROUS = 60


def big_layer_tar(tmp_path: Path) -> bytes:
    """A tar (GNU tar) holding one 3 MiB file: more than one read of a build."""
    require("tar")
    tree = tmp_path / "big-tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(3 << 20))
    return subprocess.run(
        ["tar", "--format=posix", "-cf", "-", "-C", tree, "."],
        capture_output=True,
        check=True,
    ).stdout


@contextmanager
def build_in_a_child(root: Path, tar: bytes) -> Iterator[subprocess.Popen[bytes]]:
    """A child process building ``tar`` into ``root``, stopped mid-build.

    It has been fed the first 2 MiB of the tar and waits for the rest, with
    a content file of its build already created.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_BUILD, str(root), diff_id_of(tar)],
        stdin=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert child.stdin is not None
        child.stdin.write(tar[: 2 << 20])
        child.stdin.flush()
        deadline = time.monotonic() + GENEROUS
        while not list((root / "tmp").glob("*/files/0")):
            assert child.poll() is None, "the building child exited early"
            assert time.monotonic() < deadline, "the child never started its build"
            time.sleep(0.01)
        yield child
    finally:
        child.kill()
        child.wait()
        if child.stdin is not None:
            child.stdin.close()


def test_a_build_whose_process_was_killed_is_removed_at_start(
    tmp_path: Path,
) -> None:
    root = tmp_path / "cache"
    with build_in_a_child(root, big_layer_tar(tmp_path)) as child:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert build_leftovers(root) != []
        LayerCache(root)
        assert build_leftovers(root) == []


def test_a_build_under_way_in_another_process_is_left_alone_at_start(
    tmp_path: Path,
) -> None:
    root = tmp_path / "cache"
    with build_in_a_child(root, big_layer_tar(tmp_path)):
        leftovers = build_leftovers(root)
        LayerCache(root)
        assert build_leftovers(root) == leftovers


def test_leftovers_without_a_builder_are_removed_whatever_their_age(
    tmp_path: Path,
) -> None:
    # What a crash leaves, just now: no process holds these.
    crashed = tmp_path / "tmp" / "crashed"
    (crashed / "files").mkdir(parents=True)
    (crashed / "files" / "0").write_bytes(b"partial")
    (tmp_path / "tmp" / "stray-file").write_bytes(b"")
    LayerCache(tmp_path)
    assert build_leftovers(tmp_path) == []


# --- the cache's own filesystem failing -----------------------------------------------


@contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` for the test; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    require("mount")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_cache_filesystem_is_reported_naming_the_cache_and_the_layer(
    tmp_path: Path,
) -> None:
    tar = big_layer_tar(tmp_path)
    diff_id = diff_id_of(tar)
    with tmpfs(tmp_path / "small", "size=1m") as root:
        cache = LayerCache(root)
        with pytest.raises(LayerCacheError) as raised:
            cache.build(diff_id, io.BytesIO(tar), OCI_TAR)
        message = str(raised.value)
        assert message.startswith(f"layer cache {root}: no space left on device")
        assert diff_id in message
        assert published_entries(root) == []
        assert build_leftovers(root) == []


def test_a_read_only_cache_filesystem_is_reported_naming_the_cache(
    tmp_path: Path, layer_tar: bytes
) -> None:
    diff_id = diff_id_of(layer_tar)
    with tmpfs(tmp_path / "ro", "size=1m") as root:
        cache = LayerCache(root)
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        with pytest.raises(LayerCacheError) as raised:
            cache.build(diff_id, io.BytesIO(layer_tar), OCI_TAR)
        message = str(raised.value)
        assert message.startswith(f"layer cache {root}: read-only file system")
        assert diff_id in message
        # What it holds can still be looked up.
        assert LayerCache(root).lookup(diff_id) is None


def test_a_cache_that_cannot_be_created_is_reported_naming_it(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "size=1m,ro") as mountpoint:
        root = mountpoint / "cache"
        with pytest.raises(LayerCacheError) as raised:
            LayerCache(root)
        assert str(raised.value).startswith(
            f"layer cache {root}: read-only file system"
        )


def test_unknown_media_type_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="application/vnd.oci.image.config"):
        LayerCache(tmp_path).build(
            "sha256:" + "2" * 64,
            io.BytesIO(b""),
            "application/vnd.oci.image.config.v1+json",
        )


def test_malformed_diff_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a valid sha256"):
        LayerCache(tmp_path).lookup("sha256:../../etc")
    with pytest.raises(UnsupportedError, match="sha512"):
        LayerCache(tmp_path).lookup("sha512:" + "3" * 128)


def test_running_out_of_fds_is_retryable_not_a_damaged_entry(
    tmp_path: Path, layer_tar: bytes
) -> None:
    layer = LayerCache(tmp_path).build(
        diff_id_of(layer_tar), io.BytesIO(layer_tar), OCI_TAR
    )
    stream = CachedLayerStream(layer)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The listing counts its own fd too: this leaves room for one more
    # descriptor, so opening the second of the three files hits EMFILE.
    limit = len(os.listdir("/proc/self/fd"))
    assert layer.file_count == 3
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with pytest.raises(RetryableError) as raised:
            stream.open_files(0, layer.file_count)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    message = str(raised.value)
    assert "out of file descriptors" in message
    assert f"RLIMIT_NOFILE soft limit {limit}" in message
    assert "damaged" not in message


def _pretend_written_in_an_earlier_boot(layer: CachedLayer) -> Path:
    meta_path = layer.stream_path.parent / "layer.json"
    meta = json.loads(meta_path.read_bytes())
    meta["bootID"] = "00000000-0000-0000-0000-000000000000"
    meta_path.chmod(0o644)
    meta_path.write_text(json.dumps(meta))
    return meta_path


def test_an_entry_from_an_earlier_boot_is_checked_and_restamped(
    tmp_path: Path, layer_tar: bytes
) -> None:
    diff_id = diff_id_of(layer_tar)
    layer = LayerCache(tmp_path).build(diff_id, io.BytesIO(layer_tar), OCI_TAR)
    meta_path = _pretend_written_in_an_earlier_boot(layer)
    assert LayerCache(tmp_path).lookup(diff_id) == layer
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert json.loads(meta_path.read_bytes())["bootID"] == boot_id


def test_an_entry_damaged_before_a_reboot_is_discarded_not_served(
    tmp_path: Path, layer_tar: bytes
) -> None:
    # What a power loss can leave: a file renamed into place whose data
    # never reached the disk.
    diff_id = diff_id_of(layer_tar)
    layer = LayerCache(tmp_path).build(diff_id, io.BytesIO(layer_tar), OCI_TAR)
    _pretend_written_in_an_earlier_boot(layer)
    damaged = layer.files[0]
    damaged.chmod(0o644)
    damaged.write_bytes(b"\0" * damaged.stat().st_size)
    assert LayerCache(tmp_path).lookup(diff_id) is None
    assert published_entries(tmp_path) == []
    rebuilt = LayerCache(tmp_path).build(diff_id, io.BytesIO(layer_tar), OCI_TAR)
    assert hashlib.sha256(reconstruct(rebuilt)).hexdigest() == diff_id.split(":")[1]
