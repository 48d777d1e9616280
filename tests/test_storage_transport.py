"""``containers-storage:``: stores written by Debian's skopeo, read by the proxy.

Expected values come from outside the code under test: ``layers.json`` and
``images.json`` as skopeo wrote them (``diff-digest`` is the sha256 of the
tar skopeo unpacked), hashlib over what the proxy sends, the OCI layouts the
stores were filled from, and Debian's skopeo reading the same store through
the same client. The proxy runs as a child process.
"""

from __future__ import annotations

import base64
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from protocol.jsonrpc import RpcError
from protocol.tarsplit import (
    FileEntry,
    Segment,
    TarSplitDecoder,
    TarSplitError,
    content_path,
)
from proxy.client import LegacyClient, LegacyError, ProxyProcess
from proxy.pull import pull
from proxy.transports.storage_store import LOCK_TIMEOUT_ENV, big_data_file_name
from tests.api_helpers import api_session, describe_tree, rebuild_layer
from tests.images import DebianImage, ImageSet
from tests.legacy_helpers import Call, read_and_finish, record
from tests.storage import (
    DRIVERS,
    SYNTHETIC_IMAGES,
    ContainerStore,
    make_store,
)

pytestmark = pytest.mark.anyio

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def sha256_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


async def legacy_blob(
    client: LegacyClient, image_id: int, layer: dict[str, Any]
) -> bytes:
    """GetBlob of a layer by its uncompressed digest, read while FinishPipe runs."""
    size, fds, pipeid = await client.call(
        "GetBlob", image_id, layer["diff-digest"], layer["diff-size"]
    )
    assert size == layer["diff-size"]
    payload, finish = await read_and_finish(client, fds[0], pipeid)
    assert finish.success, finish.error
    return payload


@contextmanager
def small_store(tmp_path: Path, test_images: ImageSet) -> Iterator[ContainerStore]:
    """A fresh overlay store with only ``basic``, for tests that damage it."""
    yield make_store(
        "overlay", tmp_path / "store", {"basic": (test_images.path("basic"), "latest")}
    )


def content_file(store: ContainerStore, name: str, relative: str) -> Path:
    (layer,) = store.layer_chain(name)
    return store.content_dir(layer["id"]) / relative


# --- the tar-split format --------------------------------------------------------


def test_content_path_drops_dot_components_and_leading_slashes() -> None:
    assert content_path(b"./usr//bin/tool") == (b"usr", b"bin", b"tool")
    assert content_path(b"/etc/hostname") == (b"etc", b"hostname")


@pytest.mark.parametrize("name", [b"../etc/passwd", b"usr/../../x", b"a/..", b"./"])
def test_content_path_refuses_names_that_climb_or_name_nothing(name: bytes) -> None:
    with pytest.raises(TarSplitError):
        content_path(name)


def test_tar_split_decoder_yields_segments_and_files_fed_in_small_pieces() -> None:
    # Lines as tar-split's storage package writes them (encoding/json: []byte
    # fields as standard base64, a non-UTF-8 name in name_raw).
    lines = [
        {"type": 2, "payload": base64.b64encode(b"header").decode(), "position": 0},
        {
            "type": 1,
            "name": "etc/x",
            "size": 5,
            "payload": "AAAAAAAAAAE=",
            "position": 1,
        },
        {"type": 1, "name_raw": base64.b64encode(b"caf\xe9").decode(), "payload": None},
    ]
    packed = gzip.compress(
        b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    )
    decoder = TarSplitDecoder()
    entries: list[Segment | FileEntry] = []
    for start in range(0, len(packed), 7):
        entries += decoder.feed(packed[start : start + 7])
    entries += decoder.finish()
    assert entries == [
        Segment(b"header"),
        FileEntry(b"etc/x", 5, b"\0\0\0\0\0\0\0\1"),
        FileEntry(b"caf\xe9", 0, None),
    ]


def test_tar_split_decoder_refuses_a_truncated_gzip_stream() -> None:
    packed = gzip.compress(b'{"type":2,"payload":"","position":0}\n')
    decoder = TarSplitDecoder()
    decoder.feed(packed[:-6])
    with pytest.raises(TarSplitError, match="ends early"):
        decoder.finish()


@pytest.mark.parametrize("driver", DRIVERS)
def test_big_data_file_names_are_the_files_skopeo_wrote(
    synthetic_stores: dict[str, ContainerStore], driver: str
) -> None:
    store = synthetic_stores[driver]
    for image in store.images_json():
        directory = store.root / f"{driver}-images" / image["id"]
        assert {big_data_file_name(key) for key in image["big-data-names"]} == {
            path.name for path in directory.iterdir()
        }


# --- exact tars ------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("name", SYNTHETIC_IMAGES)
async def test_every_layer_rebuilds_to_its_diff_digest_by_get_blob_and_splitfdstream(
    synthetic_stores: dict[str, ContainerStore], driver: str, name: str
) -> None:
    store = synthetic_stores[driver]
    async with api_session() as (proxy, rpc):
        legacy_id = await proxy.legacy.open_image(store.reference(name))
        api_id = await rpc.open_image(store.reference(name))
        assert api_id is not None
        for layer in store.layer_chain(name):
            tar = await legacy_blob(proxy.legacy, legacy_id, layer)
            assert (sha256_of(tar), len(tar)) == (
                layer["diff-digest"],
                layer["diff-size"],
            )
            # A window of 2 makes several-file layers go through windows.
            rebuilt = await rebuild_layer(rpc, api_id, layer["diff-digest"], 2)
            assert (rebuilt.sha256, rebuilt.size, rebuilt.tar_size) == (
                layer["diff-digest"],
                layer["diff-size"],
                layer["diff-size"],
            )


@pytest.mark.parametrize("driver", DRIVERS)
async def test_debian_layer_rebuilds_to_its_diff_digest_by_get_blob_and_splitfdstream(
    debian_stores: dict[str, ContainerStore], debian_image: DebianImage, driver: str
) -> None:
    store = debian_stores[driver]
    (layer,) = store.layer_chain("debian")
    assert layer["diff-digest"] == debian_image.diff_id
    async with api_session() as (proxy, rpc):
        legacy_id = await proxy.legacy.open_image(store.reference("debian"))
        tar = await legacy_blob(proxy.legacy, legacy_id, layer)
        assert sha256_of(tar) == debian_image.diff_id
        api_id = await rpc.open_image(store.reference("debian"))
        assert api_id is not None
        rebuilt = await rebuild_layer(rpc, api_id, debian_image.layer_digest, 256)
        assert (rebuilt.sha256, rebuilt.size) == (
            debian_image.diff_id,
            layer["diff-size"],
        )
        # One fd window at a time, whatever the number of files.
        assert rebuilt.peak_fds <= 257 < rebuilt.file_count


@pytest.mark.parametrize("driver", DRIVERS)
async def test_get_layer_info_reports_uncompressed_layers_as_layers_json_has_them(
    synthetic_stores: dict[str, ContainerStore], driver: str
) -> None:
    store = synthetic_stores[driver]
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await proxy.legacy.initialize()
        for name in SYNTHETIC_IMAGES:
            image_id = await proxy.legacy.open_image(store.reference(name))
            infos, _, _ = await proxy.legacy.call("GetLayerInfo", image_id)
            assert infos == [
                {
                    "digest": layer["diff-digest"],
                    "size": layer["diff-size"],
                    "media_type": OCI_LAYER,
                }
                for layer in store.layer_chain(name)
            ]


# --- side by side with skopeo ----------------------------------------------------


async def store_transcript(
    command: list[str] | None, store: ContainerStore, name: str
) -> list[Call]:
    async with ProxyProcess.spawn(["--insecure-policy"], command=command) as proxy:
        client = proxy.legacy
        await client.initialize()
        missing = await record(
            client, "OpenImage", store.reference_to("localhost/absent:latest")
        )
        image_id = await client.open_image(store.reference(name))
        calls = [missing]
        for method in ("GetManifest", "GetConfig", "GetFullConfig"):
            calls.append(await record(client, method, image_id))
        manifest = json.loads(calls[1].payload or b"")
        for layer in store.layer_chain(name):
            calls.append(
                await record(
                    client,
                    "GetBlob",
                    image_id,
                    layer["diff-digest"],
                    layer["diff-size"],
                )
            )
        # The store no longer has the compressed blobs the manifest names.
        compressed = manifest["layers"][0]
        calls.append(
            await record(
                client, "GetBlob", image_id, compressed["digest"], compressed["size"]
            )
        )
        return [call.normalised() for call in calls]


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo to compare")
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("name", SYNTHETIC_IMAGES)
async def test_legacy_transcript_matches_skopeo_reading_the_same_store(
    synthetic_stores: dict[str, ContainerStore], driver: str, name: str
) -> None:
    store = synthetic_stores[driver]
    theirs = await store_transcript(["skopeo"], store, name)
    ours = await store_transcript(None, store, name)
    assert ours == theirs
    assert all(call.success for call in ours[1:-1])


# --- references and the default store ----------------------------------------


async def manifest_digest_of(proxy: ProxyProcess, reference: str) -> str:
    image_id = await proxy.legacy.open_image(reference)
    digest, fds, pipeid = await proxy.legacy.call("GetManifest", image_id)
    await read_and_finish(proxy.legacy, fds[0], pipeid)
    assert isinstance(digest, str)
    return digest


async def test_names_short_names_ids_prefixes_and_digests_open_the_same_image(
    synthetic_stores: dict[str, ContainerStore],
) -> None:
    store = synthetic_stores["overlay"]
    image = store.image("basic")
    image_id, digest = image["id"], image["digest"]
    refs = [
        "localhost/basic:latest",
        "basic",  # podman's short name: localhost/basic:latest
        "basic:latest",
        image_id,
        f"@{image_id}",
        image_id[:12],
        f"localhost/basic@{digest}",
        f"localhost/basic:latest@{image_id}",
    ]
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await proxy.legacy.initialize()
        for ref in refs:
            assert await manifest_digest_of(proxy, store.reference_to(ref)) == digest


async def test_a_missing_image_is_not_found_and_a_name_of_another_image_is_refused(
    synthetic_stores: dict[str, ContainerStore],
) -> None:
    store = synthetic_stores["overlay"]
    other_id = store.image("whiteouts")["id"]
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await proxy.legacy.initialize()
        value, _, _ = await proxy.legacy.call(
            "OpenImageOptional", store.reference_to("localhost/absent:1")
        )
        assert value == 0
        with pytest.raises(LegacyError, match="no image matching reference"):
            await proxy.legacy.open_image(
                store.reference_to(f"localhost/basic:latest@{other_id}")
            )


async def test_a_reference_without_a_store_uses_containers_storage_conf(
    synthetic_stores: dict[str, ContainerStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = synthetic_stores["vfs"]
    conf = tmp_path / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{store.root}"\n'
        f'runroot = "{store.run_root}"\n'
    )
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(conf))
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await proxy.legacy.initialize()
        digest = await manifest_digest_of(proxy, "containers-storage:localhost/basic")
    assert digest == store.image("basic")["digest"]


# --- files opened beneath the layer ------------------------------------------------


async def expect_refusal(reference: str, layer: dict[str, Any], match: str) -> None:
    """Both GetBlob and GetSplitFDStream refuse the layer with ``match``."""
    async with api_session() as (proxy, rpc):
        image_id = await proxy.legacy.open_image(reference)
        size, fds, pipeid = await proxy.legacy.call(
            "GetBlob", image_id, layer["diff-digest"], layer["diff-size"]
        )
        _, finish = await read_and_finish(proxy.legacy, fds[0], pipeid)
        assert not finish.success
        assert match in finish.error
        api_id = await rpc.open_image(reference)
        assert api_id is not None
        with pytest.raises(Exception, match=match):
            await rebuild_layer(rpc, api_id, layer["diff-digest"], 8)


async def test_a_symlink_in_place_of_a_content_file_is_refused_not_followed(
    tmp_path: Path, test_images: ImageSet
) -> None:
    with small_store(tmp_path, test_images) as store:
        target = content_file(store, "basic", "etc/hostname")
        outside = tmp_path / "outside"
        shutil.copy(target, outside)  # same bytes: following it would "work"
        target.unlink()
        target.symlink_to(outside)
        (layer,) = store.layer_chain("basic")
        await expect_refusal(store.reference("basic"), layer, "symlink: refused")


async def test_a_symlinked_directory_on_the_way_is_refused_not_followed(
    tmp_path: Path, test_images: ImageSet
) -> None:
    with small_store(tmp_path, test_images) as store:
        directory = content_file(store, "basic", "data")
        moved = tmp_path / "data-elsewhere"
        shutil.move(directory, moved)
        directory.symlink_to(moved)
        (layer,) = store.layer_chain("basic")
        await expect_refusal(store.reference("basic"), layer, "symlink: refused")


async def test_a_tar_split_name_climbing_out_of_the_layer_is_refused(
    tmp_path: Path, test_images: ImageSet
) -> None:
    with small_store(tmp_path, test_images) as store:
        (layer,) = store.layer_chain("basic")
        path = store.tar_split(layer["id"])
        lines = [
            json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()
        ]
        for line in lines:
            if line.get("name") == "etc/hostname":
                line["name"] = "etc/../../hostname"
        # Same bytes where the climbing name leads, so following it would "work".
        shutil.copy(
            content_file(store, "basic", "etc/hostname"),
            store.content_dir(layer["id"]).parent / "hostname",
        )
        path.write_bytes(
            gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        )
        await expect_refusal(store.reference("basic"), layer, "climbs out of the layer")


def world_readable_files_with_content(tar: bytes) -> int:
    """Regular members with content bytes and mode o+r, as tarfile reads them."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return sum(
            1
            for member in archive
            if member.isreg() and member.size > 0 and member.mode & stat.S_IROTH
        )


async def test_a_file_others_may_not_read_is_sent_inline_and_the_tar_is_unchanged(
    tmp_path: Path, test_images: ImageSet
) -> None:
    with small_store(tmp_path, test_images) as store:
        (layer,) = store.layer_chain("basic")
        async with api_session() as (proxy, rpc):
            legacy_id = await proxy.legacy.open_image(store.reference("basic"))
            tar = await legacy_blob(proxy.legacy, legacy_id, layer)
        shared = world_readable_files_with_content(tar)
        private = content_file(store, "basic", "data/1-MiB")
        private.chmod(0o600)
        async with api_session() as (proxy, rpc):
            image_id = await rpc.open_image(store.reference("basic"))
            assert image_id is not None
            rebuilt = await rebuild_layer(rpc, image_id, layer["diff-digest"], 8)
        assert rebuilt.sha256 == layer["diff-digest"]
        assert rebuilt.file_count == shared - 1


# --- locks ---------------------------------------------------------------------------


def layer_lock_is_free_for_a_writer(store: ContainerStore) -> bool:
    """Whether an fcntl write lock on layers.lock could be taken right now."""
    with store.layers_lock.open("r+b") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.lockf(lock, fcntl.LOCK_UN)
        return True


async def test_a_splitfdstream_holds_the_layer_store_read_lock_until_closed(
    synthetic_stores: dict[str, ContainerStore],
) -> None:
    store = synthetic_stores["overlay"]
    (layer,) = store.layer_chain("basic")
    async with api_session() as (_, rpc):
        image_id = await rpc.open_image(store.reference("basic"))
        assert image_id is not None
        result, stream_fd, files = await rpc.get_splitfdstream(
            image_id, layer["diff-digest"], 0
        )
        os.close(stream_fd)
        assert not layer_lock_is_free_for_a_writer(store)
        await rpc.close_splitfdstream(result.stream_id)
        assert layer_lock_is_free_for_a_writer(store)


async def test_get_blob_fails_naming_the_lock_when_a_writer_holds_it_too_long(
    synthetic_stores: dict[str, ContainerStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = synthetic_stores["vfs"]
    (layer,) = store.layer_chain("basic")
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0.2")
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await proxy.legacy.initialize()
        image_id = await proxy.legacy.open_image(store.reference("basic"))
        with store.writer_lock():
            call = await record(
                proxy.legacy,
                "GetBlob",
                image_id,
                layer["diff-digest"],
                layer["diff-size"],
            )
        failure = call.error or (call.finish.error if call.finish else "")
        assert "timed out" in failure and str(store.layers_lock) in failure


async def test_get_blob_waits_for_a_writer_and_never_reads_what_it_was_changing(
    tmp_path: Path, test_images: ImageSet
) -> None:
    with small_store(tmp_path, test_images) as store:
        (layer,) = store.layer_chain("basic")
        diff = store.content_dir(layer["id"])
        away = diff.with_name("diff-away")
        async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
            await proxy.legacy.initialize()
            image_id = await proxy.legacy.open_image(store.reference("basic"))
            fetched: list[bytes] = []
            with store.layers_lock.open("r+b") as lock:
                fcntl.lockf(lock, fcntl.LOCK_EX)
                # A writer mid-change: the layer's files are away while it
                # holds the lock, and back by the time it lets go.
                diff.rename(away)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(fetch_into, proxy.legacy, image_id, layer, fetched)
                    await anyio.sleep(0.5)
                    assert fetched == [], "the proxy read the layer under a write lock"
                    away.rename(diff)
                    fcntl.lockf(lock, fcntl.LOCK_UN)
        assert sha256_of(fetched[0]) == layer["diff-digest"]


async def fetch_into(
    client: LegacyClient, image_id: int, layer: dict[str, Any], out: list[bytes]
) -> None:
    out.append(await legacy_blob(client, image_id, layer))


# --- the upstream pull request's methods -----------------------------------------


def decode_splitfdstream(stream_fd: int, files: list[int]) -> str:
    """sha256 of a splitfdstream with every file at hand, per the format."""
    hasher = hashlib.sha256()
    with os.fdopen(stream_fd, "rb") as stream:
        while prefix := stream.read(8):
            (value,) = struct.unpack("<q", prefix)
            if value < 0:
                hasher.update(stream.read(-value))
            else:
                hasher.update(os.pread(files[value], 1 << 30, 0))
    return f"sha256:{hasher.hexdigest()}"


async def test_upstream_get_image_and_layer_id_streams_without_initialize(
    synthetic_stores: dict[str, ContainerStore],
) -> None:
    store = synthetic_stores["overlay"]
    image = store.image("whiteouts")
    chain = store.layer_chain("whiteouts")
    config_key = next(k for k in image["big-data-names"] if k.startswith("sha256:"))
    image_dir = store.root / "overlay-images" / image["id"]
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await proxy.legacy.initialize()
        rpc = await proxy.legacy.open_rpc()
        try:
            got, _ = await rpc.call(
                "GetImage", {"imageId": f"{store.spec}{image['id']}"}, dict
            )
            assert got == {
                "manifest": (image_dir / "manifest").read_text(),
                "config": (image_dir / big_data_file_name(config_key)).read_text(),
                "layerDigests": [layer["id"] for layer in reversed(chain)],
            }
            for layer in chain:
                params = {"layerId": layer["id"], "parentId": layer.get("parent", "")}
                result, fds = await rpc.call("GetSplitFDStream", params, dict)
                try:
                    assert result["totalFDs"] == 1 + result["fileCount"] == len(fds)
                    assert result["tarSize"] == layer["diff-size"]
                    sha = decode_splitfdstream(fds[0], fds[1:])
                finally:
                    for fd in fds[1:]:
                        os.close(fd)
                assert sha == layer["diff-digest"]
                # Every file came at once: there is no stream left to close.
                assert result["streamId"] == 0
        finally:
            await rpc.aclose()


async def test_upstream_layer_id_with_another_parent_is_refused(
    synthetic_stores: dict[str, ContainerStore],
) -> None:
    store = synthetic_stores["overlay"]
    base, middle, _ = store.layer_chain("whiteouts")
    async with api_session() as (_, rpc):
        with pytest.raises(RpcError, match="diffs against another layer"):
            await rpc.call(
                "GetSplitFDStream",
                {"layerId": f"{store.spec}{middle['id']}", "parentId": middle["id"]},
                dict,
            )
        with pytest.raises(RpcError, match="missing required field `digest`"):
            await rpc.call("GetSplitFDStream", {"imageId": 1}, dict)


# --- pull, reflinks and what the proxy reads -----------------------------------------


@pytest.mark.parametrize("name", SYNTHETIC_IMAGES)
async def test_pull_from_the_store_gives_the_tree_pull_from_the_layout_gives(
    synthetic_stores: dict[str, ContainerStore],
    test_images: ImageSet,
    tmp_path: Path,
    name: str,
) -> None:
    from_layout, from_store = tmp_path / "from-layout", tmp_path / "from-store"
    await pull(test_images[name].reference, from_layout, cache_dir=tmp_path / "c1")
    await pull(
        synthetic_stores["overlay"].reference(name),
        from_store,
        cache_dir=tmp_path / "c2",
    )
    assert describe_tree(from_store) == describe_tree(from_layout)


def proxy_io(pid: int) -> dict[str, int]:
    """The kernel's I/O counters of a process (``/proc/PID/io``)."""
    counters = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, value = line.split(":")
        counters[key] = int(value)
    return counters


async def test_proxy_reads_no_layer_content_for_a_splitfdstream_but_all_for_get_blob(
    debian_stores: dict[str, ContainerStore], debian_image: DebianImage
) -> None:
    store = debian_stores["overlay"]
    (layer,) = store.layer_chain("debian")
    async with api_session() as (proxy, rpc):
        pid = proxy.process.pid
        image_id = await rpc.open_image(store.reference("debian"))
        assert image_id is not None
        before = proxy_io(pid)
        rebuilt = await rebuild_layer(rpc, image_id, layer["diff-digest"], 256)
        stream_read = proxy_io(pid)["rchar"] - before["rchar"]
        assert rebuilt.sha256 == layer["diff-digest"]

        legacy_id = await proxy.legacy.open_image(store.reference("debian"))
        before = proxy_io(pid)
        await legacy_blob(proxy.legacy, legacy_id, layer)
        blob_read = proxy_io(pid)["rchar"] - before["rchar"]
    with tarfile.open(debian_image.rootfs_tar) as archive:
        content = sum(member.size for member in archive if member.isreg())
    # The tar-split and the few files others may not read, against read()
    # of every content byte.
    assert stream_read < content // 20
    assert blob_read >= content


@contextmanager
def loop_mounted_xfs(image: Path, mount_point: Path) -> Iterator[Path]:
    """A fresh XFS with reflinks, loop-mounted at ``mount_point`` (as root)."""
    for tool in ("mkfs.xfs", "filefrag", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: cannot test reflinks on XFS")
    if os.geteuid() != 0:
        pytest.skip("mounting an XFS image needs root")
    with image.open("wb") as sparse:
        sparse.truncate(1 << 30)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mount_point.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def shares_extents(path: Path) -> bool:
    """Whether filefrag reports the file's extents as shared (reflinked)."""
    report = subprocess.run(
        ["filefrag", "-v", str(path)], check=True, capture_output=True, text=True
    ).stdout
    extents = [line for line in report.splitlines() if line.strip()[:1].isdigit()]
    return bool(extents) and all("shared" in line for line in extents)


async def test_debian_pull_from_a_store_on_xfs_reflinks_the_store_files(
    debian_image: DebianImage, tmp_path: Path
) -> None:
    with loop_mounted_xfs(tmp_path / "xfs.img", tmp_path / "xfs") as xfs:
        store = make_store(
            "overlay", xfs / "store", {"debian": (debian_image.path, debian_image.ref)}
        )
        dest = xfs / "dest"
        await pull(store.reference("debian"), dest, cache_dir=xfs / "cache")
        await pull(debian_image.reference, tmp_path / "from-layout", cache_dir=tmp_path)
        assert describe_tree(dest) == describe_tree(tmp_path / "from-layout")

        (layer,) = store.layer_chain("debian")
        content = store.content_dir(layer["id"])
        largest = sorted(
            (
                path
                for path in dest.rglob("*")
                if path.is_file()
                and not path.is_symlink()
                and path.stat().st_mode & stat.S_IROTH
            ),
            key=lambda path: path.stat().st_size,
            reverse=True,
        )[:20]
        assert largest and all(shares_extents(path) for path in largest)
        # The store's copies are the other owners of those extents.
        assert all(shares_extents(content / p.relative_to(dest)) for p in largest)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_api_layer_info_lists_digests_get_blob_can_serve(
    synthetic_stores: dict[str, ContainerStore], driver: str
) -> None:
    store = synthetic_stores[driver]
    chain = store.layer_chain("whiteouts")
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await proxy.legacy.initialize()
        rpc = await proxy.legacy.open_rpc()
        try:
            await rpc.initialize()
            image_id = await rpc.open_image(store.reference("whiteouts"))
            assert image_id is not None
            layers = await rpc.get_layer_info(image_id)
            assert [
                (layer.digest, layer.size, layer.media_type) for layer in layers
            ] == [
                (entry["diff-digest"], entry["diff-size"], OCI_LAYER) for entry in chain
            ]
            for layer in layers:
                _, data_fd, error_fd = await rpc.get_blob(image_id, layer.digest)
                with (
                    os.fdopen(data_fd, "rb") as data,
                    os.fdopen(error_fd, "rb") as error,
                ):
                    content = await anyio.to_thread.run_sync(data.read)
                    assert await anyio.to_thread.run_sync(error.read) == b""
                assert "sha256:" + hashlib.sha256(content).hexdigest() == layer.digest
        finally:
            await rpc.aclose()
