"""The jsonrpc-fdpass image API, end to end against a spawned proxy.

Expected values come from the layout's own files (read with ``json``),
hashlib, and the splitfdstream format's definition decoded in
``tests/api_helpers.py``; never from the proxy's modules.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from protocol.jsonrpc import RpcError
from proxy.client import ProxyProcess
from proxy.fdsocket import close_fds
from proxy.oci_writer import OCILayoutWriter, TarEntry
from tests.api_helpers import (
    Layout,
    api_session,
    open_fd_count,
    raw_connection,
    read_fd,
    rebuild_layer,
    sha256_of,
    sha256_of_file,
)
from tests.images import DebianImage, ImageSet

pytestmark = pytest.mark.anyio

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
# The image spec's table of Docker to OCI layer media types.
DOCKER_TO_OCI_LAYER = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": (
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ),
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    ),
}

# Every synthetic image whose layers unpack (corrupt is checked on its own).
SOUND_IMAGES = [
    "basic",
    "whiteouts",
    "longnames",
    "empty-layer",
    "zstd",
    "uncompressed",
    "multiarch",
    "docker-v2s2",
    "hostile",
    "big-layerinfo",
]
SMALL_WINDOW = 7


async def expect_error(call: Any) -> RpcError:
    with pytest.raises(RpcError) as caught:
        await call
    return caught.value


# --- Initialize -----------------------------------------------------------------------


async def test_initialize_picks_the_version_both_sides_speak() -> None:
    async with raw_connection() as (_, rpc):
        result = await rpc.initialize(["0.9", "1.0", "2.0"])
    assert result.version == "1.0"


async def test_initialize_without_a_common_version_lists_the_supported_ones() -> None:
    async with raw_connection() as (_, rpc):
        error = await expect_error(rpc.initialize(["9.9"]))
        assert error.data["supported"] == ["1.0"]
        assert "9.9" in error.message
        # The failed attempt leaves the session uninitialized, not broken.
        assert (await rpc.initialize(["1.0"])).version == "1.0"


async def test_second_initialize_is_refused() -> None:
    async with raw_connection() as (_, rpc):
        await rpc.initialize(["1.0"])
        error = await expect_error(rpc.initialize(["1.0"]))
    assert error.data["kind"] == "invalid-argument"


@pytest.mark.parametrize(
    "method, params",
    [
        ("OpenImage", {"imageName": "oci:/nonexistent:latest"}),
        ("CloseImage", {"imageId": 1}),
        ("GetManifest", {"imageId": 1}),
        ("GetConfig", {"imageId": 1}),
        ("GetLayerInfo", {"imageId": 1}),
        ("GetBlob", {"imageId": 1, "digest": "sha256:" + "0" * 64}),
        ("GetSplitFDStream", {"imageId": 1, "digest": "sha256:" + "0" * 64}),
        ("GetSplitFDStreamFiles", {"streamId": 1, "start": 0, "count": 1}),
        ("CloseSplitFDStream", {"streamId": 1}),
    ],
)
async def test_methods_before_initialize_fail_as_not_initialized(
    method: str, params: dict[str, Any]
) -> None:
    async with raw_connection() as (_, rpc):
        error = await expect_error(rpc.call(method, params, dict))
    assert error.data["kind"] == "not-initialized"


# --- malformed calls ------------------------------------------------------------------


async def test_unknown_method_is_method_not_found_and_the_connection_survives(
    test_images: ImageSet,
) -> None:
    async with api_session() as (_, rpc):
        error = await expect_error(rpc.call("GetEverything", {}, dict))
        assert error.code == -32601
        assert await rpc.open_image(test_images["basic"].reference) is not None


@pytest.mark.parametrize(
    "method, params, field",
    [
        ("GetConfig", {"imageId": "1"}, "imageId"),
        ("GetConfig", {}, "imageId"),
        ("OpenImage", {"imageName": 42}, "imageName"),
        ("OpenImage", {"optional": True}, "imageName"),
        ("GetManifest", {"imageId": 1, "resolve": "yes"}, "resolve"),
        ("GetBlob", {"imageId": 1}, "digest"),
        ("GetSplitFDStreamFiles", {"streamId": 1, "start": 0}, "count"),
    ],
)
async def test_bad_params_are_invalid_params_naming_the_field(
    test_images: ImageSet, method: str, params: dict[str, Any], field: str
) -> None:
    async with api_session() as (_, rpc):
        image_id = await rpc.open_image(test_images["basic"].reference)
        assert image_id == 1
        error = await expect_error(rpc.call(method, params, dict))
        assert error.code == -32602
        assert f"`$.{field}`" in error.message or f"`{field}`" in error.message
        config = await rpc.get_config(image_id)
    layout = Layout(test_images["basic"].path)
    assert config.digest == layout.manifest()["config"]["digest"]


# --- OpenImage ------------------------------------------------------------------------


async def test_optional_open_of_a_missing_reference_gives_a_null_image_id(
    test_images: ImageSet,
) -> None:
    async with api_session() as (_, rpc):
        name = f"oci:{test_images['basic'].path}:no-such-tag"
        assert await rpc.open_image(name, optional=True) is None


async def test_plain_open_of_a_missing_reference_is_not_found(
    test_images: ImageSet,
) -> None:
    async with api_session() as (_, rpc):
        name = f"oci:{test_images['basic'].path}:no-such-tag"
        error = await expect_error(rpc.open_image(name))
    assert error.data["kind"] == "not-found"
    assert "no-such-tag" in error.message


async def test_a_missing_layout_directory_is_an_error_even_when_optional(
    tmp_path: Path,
) -> None:
    async with api_session() as (_, rpc):
        name = f"oci:{tmp_path / 'absent'}:latest"
        error = await expect_error(rpc.open_image(name, optional=True))
    assert str(tmp_path / "absent") in error.message


# --- manifests, configs, layer infos --------------------------------------------------


@pytest.mark.parametrize("name", SOUND_IMAGES)
async def test_resolved_manifest_is_the_stored_blob(
    test_images: ImageSet, name: str
) -> None:
    layout = Layout(test_images[name].path)
    instance = layout.instance(architecture="amd64")
    async with api_session("--override-arch", "amd64") as (_, rpc):
        image_id = await rpc.open_image(test_images[name].reference)
        assert image_id is not None
        result = await rpc.get_manifest(image_id, resolve=True)
    raw = result.manifest.encode("utf-8")
    assert raw == layout.blob(instance["digest"])
    assert sha256_of(raw) == result.digest == instance["digest"]
    assert result.media_type == instance["mediaType"]


@pytest.mark.parametrize(
    "architecture, variant, platform_file",
    [("amd64", "", "linux/amd64\n"), ("arm64", "v8", "linux/arm64v8\n")],
)
async def test_multiarch_resolves_to_the_instance_of_the_chosen_platform(
    test_images: ImageSet, architecture: str, variant: str, platform_file: str
) -> None:
    layout = Layout(test_images["multiarch"].path)
    instance = layout.instance(architecture=architecture, variant=variant)
    args = ["--override-arch", architecture]
    if variant:
        args += ["--override-variant", variant]
    async with api_session(*args) as (_, rpc):
        image_id = await rpc.open_image(test_images["multiarch"].reference)
        assert image_id is not None
        result = await rpc.get_manifest(image_id)
        size, data_fd, error_fd = await rpc.get_blob(
            image_id, json.loads(result.manifest)["layers"][0]["digest"]
        )
        read_fd(data_fd)
        assert read_fd(error_fd) == b""
    assert result.digest == instance["digest"]
    assert result.manifest.encode() == layout.blob(instance["digest"])
    layer_digest = layout.json_blob(instance["digest"])["layers"][0]["digest"]
    assert size == len(layout.blob(layer_digest))
    # The content tells the platforms apart: etc/platform names its own.
    assert platform_file.encode() in gzip.decompress(layout.blob(layer_digest))


async def test_unresolved_manifest_of_multiarch_is_the_stored_index(
    test_images: ImageSet,
) -> None:
    layout = Layout(test_images["multiarch"].path)
    tagged = layout.tagged()
    async with api_session() as (_, rpc):
        image_id = await rpc.open_image(test_images["multiarch"].reference)
        assert image_id is not None
        result = await rpc.get_manifest(image_id, resolve=False)
    assert result.manifest.encode() == layout.blob(tagged["digest"])
    assert result.digest == tagged["digest"]
    assert result.media_type == OCI_INDEX


async def test_docker_manifest_is_returned_untouched_with_its_media_type(
    test_images: ImageSet,
) -> None:
    layout = Layout(test_images["docker-v2s2"].path)
    stored = layout.blob(layout.tagged()["digest"])
    async with api_session() as (_, rpc):
        image_id = await rpc.open_image(test_images["docker-v2s2"].reference)
        assert image_id is not None
        plain = await rpc.get_manifest(image_id)
        converted = await rpc.get_manifest(image_id, convert_to_oci=True)
    assert plain.manifest.encode() == stored
    assert plain.media_type == DOCKER_MANIFEST
    assert plain.oci_manifest is None
    assert converted.manifest.encode() == stored
    assert converted.digest == sha256_of(stored)


async def test_docker_manifest_converts_to_oci_by_the_spec_media_type_table(
    test_images: ImageSet,
) -> None:
    layout = Layout(test_images["docker-v2s2"].path)
    docker = json.loads(layout.blob(layout.tagged()["digest"]))
    async with api_session() as (_, rpc):
        image_id = await rpc.open_image(test_images["docker-v2s2"].reference)
        assert image_id is not None
        result = await rpc.get_manifest(image_id, convert_to_oci=True)
    assert result.oci_manifest is not None
    oci = json.loads(result.oci_manifest)
    assert oci["schemaVersion"] == 2
    assert oci["mediaType"] == OCI_MANIFEST
    assert oci["config"]["mediaType"] == OCI_CONFIG
    assert oci["config"]["digest"] == docker["config"]["digest"]
    assert oci["config"]["size"] == docker["config"]["size"]
    assert [layer["mediaType"] for layer in oci["layers"]] == [
        DOCKER_TO_OCI_LAYER[layer["mediaType"]] for layer in docker["layers"]
    ]
    assert [(x["digest"], x["size"]) for x in oci["layers"]] == [
        (x["digest"], x["size"]) for x in docker["layers"]
    ]


async def test_oci_manifest_has_no_converted_copy(test_images: ImageSet) -> None:
    async with api_session() as (_, rpc):
        image_id = await rpc.open_image(test_images["basic"].reference)
        assert image_id is not None
        result = await rpc.get_manifest(image_id, convert_to_oci=True)
    assert result.oci_manifest is None


@pytest.mark.parametrize("name", SOUND_IMAGES)
async def test_config_is_the_stored_config_blob(
    test_images: ImageSet, name: str
) -> None:
    layout = Layout(test_images[name].path)
    descriptor = layout.manifest(architecture="amd64")["config"]
    async with api_session("--override-arch", "amd64") as (_, rpc):
        image_id = await rpc.open_image(test_images[name].reference)
        assert image_id is not None
        result = await rpc.get_config(image_id)
    assert result.config.encode() == layout.blob(descriptor["digest"])
    assert result.digest == descriptor["digest"]
    assert result.media_type == descriptor["mediaType"]


@pytest.mark.parametrize("name", SOUND_IMAGES)
async def test_layer_info_pairs_manifest_layers_with_config_diff_ids(
    test_images: ImageSet, name: str
) -> None:
    layout = Layout(test_images[name].path)
    manifest = layout.manifest(architecture="amd64")
    diff_ids = layout.config(architecture="amd64")["rootfs"]["diff_ids"]
    async with api_session("--override-arch", "amd64") as (_, rpc):
        image_id = await rpc.open_image(test_images[name].reference)
        assert image_id is not None
        layers = await rpc.get_layer_info(image_id)
    assert [(x.digest, x.size, x.media_type, x.diff_id) for x in layers] == [
        (x["digest"], x["size"], x["mediaType"], diff_id)
        for x, diff_id in zip(manifest["layers"], diff_ids, strict=True)
    ]


# --- GetBlob --------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [False, True])
async def test_get_blob_sends_bytes_hashing_to_the_digest(
    test_images: ImageSet, verify: bool
) -> None:
    layout = Layout(test_images["basic"].path)
    manifest = layout.manifest()
    digests = [manifest["config"]["digest"]] + [x["digest"] for x in manifest["layers"]]
    async with api_session() as (_, rpc):
        image_id = await rpc.open_image(test_images["basic"].reference)
        assert image_id is not None
        for digest in digests:
            size, data_fd, error_fd = await rpc.get_blob(
                image_id, digest, verify=verify
            )
            data = read_fd(data_fd)
            assert read_fd(error_fd) == b""
            assert sha256_of(data) == digest
            assert size == len(layout.blob(digest))


async def test_get_blob_with_verify_reports_a_corrupt_blob_on_the_error_fd(
    test_images: ImageSet,
) -> None:
    layout = Layout(test_images["corrupt"].path)
    (digest, _), *_ = layout.layers()
    async with api_session() as (_, rpc):
        image_id = await rpc.open_image(test_images["corrupt"].reference)
        assert image_id is not None
        _, data_fd, error_fd = await rpc.get_blob(image_id, digest, verify=True)
        data = read_fd(data_fd)
        error = json.loads(read_fd(error_fd))
    assert sha256_of(data) != digest
    assert error["kind"] == "digest-mismatch"
    assert digest in error["message"]


# --- GetSplitFDStream -----------------------------------------------------------------


@pytest.mark.parametrize("name", SOUND_IMAGES)
async def test_every_layer_rebuilds_to_its_diff_id_through_small_windows(
    test_images: ImageSet, name: str, tmp_path: Path
) -> None:
    layout = Layout(test_images[name].path)
    layers = layout.layers(architecture="amd64")
    args = ["--override-arch", "amd64", "--cache-dir", str(tmp_path / "cache")]
    async with api_session(*args) as (_, rpc):
        image_id = await rpc.open_image(test_images[name].reference)
        assert image_id is not None
        for digest, diff_id in layers:
            rebuilt = await rebuild_layer(rpc, image_id, digest, SMALL_WINDOW)
            assert rebuilt.sha256 == diff_id
            assert rebuilt.diff_id == diff_id
            assert rebuilt.size == rebuilt.tar_size
            assert rebuilt.peak_fds <= SMALL_WINDOW + 1


async def test_a_layer_can_be_named_by_its_diff_id(
    test_images: ImageSet, tmp_path: Path
) -> None:
    (_, diff_id), *_ = Layout(test_images["basic"].path).layers()
    async with api_session("--cache-dir", str(tmp_path)) as (_, rpc):
        image_id = await rpc.open_image(test_images["basic"].reference)
        assert image_id is not None
        rebuilt = await rebuild_layer(rpc, image_id, diff_id, SMALL_WINDOW)
    assert rebuilt.sha256 == diff_id


async def test_external_file_k_of_the_first_reply_is_fd_k_plus_1(
    test_images: ImageSet, tmp_path: Path
) -> None:
    (digest, _), *_ = Layout(test_images["basic"].path).layers()
    async with api_session("--cache-dir", str(tmp_path)) as (_, rpc):
        image_id = await rpc.open_image(test_images["basic"].reference)
        assert image_id is not None
        result, stream_fd, first = await rpc.get_splitfdstream(image_id, digest, 512)
        try:
            # A window of 512 holds every content file of this small layer.
            assert result.files_included == result.file_count == len(first) >= 1
            for k, fd in enumerate(first):
                (again,) = await rpc.get_splitfdstream_files(result.stream_id, k, 1)
                try:
                    assert _inode(again) == _inode(fd)
                finally:
                    os.close(again)
        finally:
            close_fds([stream_fd, *first])


def _inode(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


async def test_a_window_over_512_fds_is_an_invalid_argument(
    test_images: ImageSet, tmp_path: Path
) -> None:
    (digest, _), *_ = Layout(test_images["basic"].path).layers()
    async with api_session("--cache-dir", str(tmp_path)) as (_, rpc):
        image_id = await rpc.open_image(test_images["basic"].reference)
        assert image_id is not None
        error = await expect_error(rpc.get_splitfdstream(image_id, digest, 513))
        assert error.data["kind"] == "invalid-argument"
        result, stream_fd, first = await rpc.get_splitfdstream(image_id, digest, 0)
        close_fds([stream_fd, *first])
        error = await expect_error(
            rpc.get_splitfdstream_files(result.stream_id, 0, 513)
        )
        assert error.data["kind"] == "invalid-argument"


async def test_a_closed_stream_id_is_refused(
    test_images: ImageSet, tmp_path: Path
) -> None:
    (digest, _), *_ = Layout(test_images["basic"].path).layers()
    async with api_session("--cache-dir", str(tmp_path)) as (_, rpc):
        image_id = await rpc.open_image(test_images["basic"].reference)
        assert image_id is not None
        result, stream_fd, first = await rpc.get_splitfdstream(image_id, digest, 1)
        close_fds([stream_fd, *first])
        await rpc.close_splitfdstream(result.stream_id)
        error = await expect_error(rpc.get_splitfdstream_files(result.stream_id, 0, 1))
        assert error.data["kind"] == "invalid-argument"
        error = await expect_error(rpc.close_splitfdstream(result.stream_id))
        assert error.data["kind"] == "invalid-argument"


@pytest.mark.debian
async def test_debian_layer_rebuilds_to_rootfs_tar_within_a_bounded_window(
    debian_image: DebianImage, tmp_path: Path
) -> None:
    expected = sha256_of_file(debian_image.rootfs_tar)
    async with api_session("--cache-dir", str(tmp_path)) as (_, rpc):
        image_id = await rpc.open_image(debian_image.reference)
        assert image_id is not None
        rebuilt = await rebuild_layer(
            rpc, image_id, debian_image.layer_digest, SMALL_WINDOW
        )
    assert rebuilt.sha256 == expected == debian_image.diff_id
    assert rebuilt.size == debian_image.rootfs_tar.stat().st_size
    # A minbase system has thousands of files over a page; far more than
    # one window, so the windows really were walked.
    assert rebuilt.file_count > 1000
    assert rebuilt.peak_fds <= SMALL_WINDOW + 1
    assert rebuilt.peak_fd_rise <= SMALL_WINDOW + 1
    print(f"debian layer: {rebuilt.file_count} external files")


# --- the layer cache ------------------------------------------------------------------


def _entry_dir(cache: Path, diff_id: str) -> Path:
    return cache / "layers" / "sha256" / diff_id.partition(":")[2]


async def test_a_cached_layer_is_served_again_without_rebuilding(
    test_images: ImageSet, tmp_path: Path
) -> None:
    (digest, diff_id), *_ = Layout(test_images["basic"].path).layers()
    stream = _entry_dir(tmp_path, diff_id) / "stream"
    for attempt in range(2):
        async with api_session("--cache-dir", str(tmp_path)) as (_, rpc):
            image_id = await rpc.open_image(test_images["basic"].reference)
            assert image_id is not None
            rebuilt = await rebuild_layer(rpc, image_id, digest, SMALL_WINDOW)
        assert rebuilt.sha256 == diff_id
        info = stream.stat()
        if attempt == 0:
            first = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns)
    assert (info.st_ino, info.st_mtime_ns, info.st_ctime_ns) == first


def _published(cache: Path) -> list[str]:
    layers = cache / "layers" / "sha256"
    return sorted(os.listdir(layers)) if layers.is_dir() else []


async def test_a_corrupt_layer_blob_is_a_digest_mismatch_and_nothing_is_published(
    test_images: ImageSet, tmp_path: Path
) -> None:
    (digest, _), *_ = Layout(test_images["corrupt"].path).layers()
    async with api_session("--cache-dir", str(tmp_path)) as (_, rpc):
        image_id = await rpc.open_image(test_images["corrupt"].reference)
        assert image_id is not None
        error = await expect_error(rpc.get_splitfdstream(image_id, digest, 8))
    assert error.data["kind"] == "digest-mismatch"
    assert digest in error.message
    assert _published(tmp_path) == []


async def test_a_layer_not_matching_its_diff_id_is_a_digest_mismatch(
    tmp_path: Path,
) -> None:
    # The blob is intact; only the config's diffID is wrong, so the mismatch
    # can show only once the whole tar has been unpacked and hashed.
    writer = OCILayoutWriter(tmp_path / "layout")
    layer = writer.add_layer(
        [TarEntry("payload", "file", os.urandom(20_000))], compression="gzip"
    )
    wrong = sha256_of(b"not the layer")
    writer.add_image([replace(layer, diff_id=wrong)], ref_name="latest")
    cache = tmp_path / "cache"
    async with api_session("--cache-dir", str(cache)) as (_, rpc):
        image_id = await rpc.open_image(f"oci:{tmp_path / 'layout'}:latest")
        assert image_id is not None
        error = await expect_error(rpc.get_splitfdstream(image_id, layer.digest, 8))
    assert error.data["kind"] == "digest-mismatch"
    assert wrong in error.message
    assert _published(cache) == []


@pytest.mark.debian
async def test_a_build_killed_midway_leaves_a_cache_that_serves_correctly(
    debian_image: DebianImage, tmp_path: Path
) -> None:
    builds = tmp_path / "tmp"

    async def kill_once_building(proxy: ProxyProcess) -> None:
        # A build directory holding content files: the build is under way.
        while not any(
            (build / "files").is_dir() and any((build / "files").iterdir())
            for build in (builds.iterdir() if builds.is_dir() else [])
        ):
            await anyio.sleep(0.01)
        os.kill(proxy.process.pid, signal.SIGKILL)

    async with ProxyProcess.spawn(["--cache-dir", str(tmp_path)]) as proxy:
        await proxy.legacy.initialize()
        rpc = await proxy.legacy.open_rpc()
        await rpc.initialize()
        opened = await rpc.open_image(debian_image.reference)
        assert opened is not None
        image_id: int = opened
        lost: list[BaseException] = []

        async def call() -> None:
            try:
                await rpc.get_splitfdstream(image_id, debian_image.layer_digest, 8)
            except (EOFError, OSError, anyio.BrokenResourceError) as exc:
                lost.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_once_building, proxy)
            tg.start_soon(call)
        await rpc.aclose()
    assert lost, "the call was answered although the proxy was killed"
    assert _published(tmp_path) == []

    async with api_session("--cache-dir", str(tmp_path)) as (_, rpc):
        reopened = await rpc.open_image(debian_image.reference)
        assert reopened is not None
        rebuilt = await rebuild_layer(rpc, reopened, debian_image.layer_digest, 256)
    assert rebuilt.sha256 == debian_image.diff_id


# --- concurrency and fds --------------------------------------------------------------


async def test_sixteen_concurrent_calls_on_one_connection_all_answer(
    test_images: ImageSet,
) -> None:
    names = ["basic", "whiteouts", "longnames", "zstd"]
    layouts = {name: Layout(test_images[name].path) for name in names}
    answers: dict[tuple[str, str], str] = {}
    async with api_session() as (_, rpc):
        ids = {
            name: await rpc.open_image(test_images[name].reference) for name in names
        }

        async def config(name: str) -> None:
            image_id = ids[name]
            assert image_id is not None
            answers[(name, "config")] = (await rpc.get_config(image_id)).config

        async def manifest(name: str) -> None:
            image_id = ids[name]
            assert image_id is not None
            answers[(name, "manifest")] = (await rpc.get_manifest(image_id)).manifest

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                for name in names:
                    tg.start_soon(config, name)
                    tg.start_soon(manifest, name)
    assert len(answers) == 8
    for name, layout in layouts.items():
        manifest_digest = layout.tagged()["digest"]
        assert answers[(name, "manifest")].encode() == layout.blob(manifest_digest)
        config_digest = layout.manifest()["config"]["digest"]
        assert answers[(name, "config")].encode() == layout.blob(config_digest)


@pytest.mark.debian
async def test_a_slow_layer_build_does_not_hold_up_a_later_get_config(
    debian_image: DebianImage, tmp_path: Path
) -> None:
    done: list[str] = []
    builds = tmp_path / "tmp"
    async with api_session("--cache-dir", str(tmp_path)) as (_, rpc):
        image_id = await rpc.open_image(debian_image.reference)
        assert image_id is not None

        async def slow() -> None:
            result, stream_fd, first = await rpc.get_splitfdstream(
                image_id, debian_image.layer_digest, 8
            )
            close_fds([stream_fd, *first])
            done.append("GetSplitFDStream")

        async def fast() -> None:
            # Wait for evidence that the build has started on the proxy.
            while not (builds.is_dir() and any(builds.iterdir())):
                await anyio.sleep(0.01)
            await rpc.get_config(image_id)
            done.append("GetConfig")

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            tg.start_soon(fast)
    assert done == ["GetConfig", "GetSplitFDStream"]


async def test_no_fd_is_leaked_by_a_session_of_many_calls(
    test_images: ImageSet, tmp_path: Path
) -> None:
    ours_before = open_fd_count()
    async with api_session("--cache-dir", str(tmp_path)) as (proxy, rpc):
        pid = proxy.process.pid
        baseline = open_fd_count(pid)
        ours_baseline = open_fd_count()
        for name in ["basic", "whiteouts", "longnames", "zstd", "multiarch"]:
            image_id = await rpc.open_image(test_images[name].reference)
            assert image_id is not None
            await rpc.get_manifest(image_id, convert_to_oci=True)
            await rpc.get_config(image_id)
            for layer in await rpc.get_layer_info(image_id):
                _, data_fd, error_fd = await rpc.get_blob(
                    image_id, layer.digest, verify=True
                )
                read_fd(data_fd)
                assert read_fd(error_fd) == b""
                rebuilt = await rebuild_layer(rpc, image_id, layer.digest, 1)
                assert rebuilt.sha256 == layer.diff_id
            await expect_error(rpc.get_blob(image_id, sha256_of(b"absent")))
            result, stream_fd, first = await rpc.get_splitfdstream(
                image_id, layer.digest, 4
            )
            close_fds([stream_fd, *first])
            await rpc.close_splitfdstream(result.stream_id)
            await rpc.close_image(image_id)
        # One more round trip: every earlier reply has been sent and its fds
        # closed by the time this answer arrives.
        last = await rpc.open_image(test_images["basic"].reference)
        assert last is not None
        await rpc.get_layer_info(last)
        await rpc.close_image(last)
        assert open_fd_count(pid) == baseline
        assert open_fd_count() == ours_baseline
    assert open_fd_count() == ours_before


# --- GetBlob transfers nobody reads ---------------------------------------------------

# Bounds for waits that only end if the proxy works; never asserted on.
GENEROUS = 60
# A blob several times the proxy's 1 MiB pipes: a transfer nobody reads stalls.
BIG_BLOB_SIZE = 4 << 20
# The per-connection bound the API documents for unfinished GetBlob transfers.
UNFINISHED_BLOB_LIMIT = 64


def _layout_with_a_big_blob(root: Path) -> tuple[str, str, bytes]:
    """An image whose layout also holds a big blob: (reference, digest, bytes)."""
    writer = OCILayoutWriter(root)
    layer = writer.add_layer([TarEntry("hello", "file", b"hello\n")])
    writer.add_image([layer], ref_name="latest")
    data = os.urandom(BIG_BLOB_SIZE)
    descriptor = writer.add_blob(data)
    return f"oci:{root}:latest", descriptor.digest, data


async def _wait_for_fd_count(pid: int, expected: int) -> None:
    while open_fd_count(pid) != expected:
        await anyio.sleep(0.05)


async def test_get_blob_refuses_transfers_past_the_per_connection_limit(
    tmp_path: Path,
) -> None:
    reference, digest, _ = _layout_with_a_big_blob(tmp_path / "layout")
    held: list[int] = []
    refused: list[RpcError] = []
    async with api_session() as (proxy, rpc):
        pid = proxy.process.pid
        baseline = open_fd_count(pid)
        image_id = await rpc.open_image(reference)
        assert image_id is not None

        async def get_blob() -> None:
            try:
                _, data_fd, error_fd = await rpc.get_blob(image_id, digest)
            except RpcError as exc:
                refused.append(exc)
            else:
                held.extend([data_fd, error_fd])

        try:
            with anyio.fail_after(GENEROUS):
                async with anyio.create_task_group() as tg:
                    for _ in range(UNFINISHED_BLOB_LIMIT + 6):
                        tg.start_soon(get_blob)
        finally:
            # Closing the read ends ends every transfer with EPIPE.
            close_fds(held)
        assert len(held) == 2 * UNFINISHED_BLOB_LIMIT
        assert len(refused) == 6
        for error in refused:
            assert error.data["kind"] == "invalid-argument"
            assert str(UNFINISHED_BLOB_LIMIT) in error.message
        await rpc.close_image(image_id)
        with anyio.fail_after(GENEROUS):
            await _wait_for_fd_count(pid, baseline)


async def test_a_connection_that_never_reads_its_blobs_does_not_stall_another(
    tmp_path: Path,
) -> None:
    reference, digest, data = _layout_with_a_big_blob(tmp_path / "layout")
    args = ["--insecure-policy", "--stall-timeout", "2"]
    async with ProxyProcess.spawn(args) as proxy:
        await proxy.legacy.initialize()
        flooder = await proxy.legacy.open_rpc()
        reader = await proxy.legacy.open_rpc()
        held: list[tuple[int, int]] = []
        try:
            await flooder.initialize()
            await reader.initialize()
            pid = proxy.process.pid
            baseline = open_fd_count(pid)
            flood_id = await flooder.open_image(reference)
            reader_id = await reader.open_image(reference)
            assert flood_id is not None and reader_id is not None

            async def flood() -> None:
                _, data_fd, error_fd = await flooder.get_blob(flood_id, digest)
                held.append((data_fd, error_fd))

            with anyio.fail_after(GENEROUS):
                async with anyio.create_task_group() as tg:
                    for _ in range(UNFINISHED_BLOB_LIMIT):
                        tg.start_soon(flood)
                # Every transfer of the flooder now waits for a reader that
                # never comes; the other connection is served all the same.
                _, data_fd, error_fd = await reader.get_blob(
                    reader_id, digest, verify=True
                )
                received = await anyio.to_thread.run_sync(read_fd, data_fd)
                assert read_fd(error_fd) == b""
            assert sha256_of(received) == digest
            assert received == data

            # The flooder's transfers are given up once idle for 2 seconds.
            with anyio.fail_after(GENEROUS):
                for _, error_fd in held:
                    report = await anyio.to_thread.run_sync(read_fd, error_fd)
                    error = json.loads(report)
                    assert error["kind"] == "retryable"
                    assert "no progress for 2 seconds" in error["message"]
            for data_fd, _ in held:
                os.close(data_fd)
            held.clear()
            await flooder.close_image(flood_id)
            await reader.close_image(reader_id)
            with anyio.fail_after(GENEROUS):
                await _wait_for_fd_count(pid, baseline)
        finally:
            for data_fd, error_fd in held:
                close_fds([data_fd, error_fd])
            await flooder.aclose()
            await reader.aclose()


async def test_a_window_larger_than_the_proxys_fd_limit_allows_is_shrunk(
    tmp_path: Path,
) -> None:
    # Every file is over the 4 KiB inline threshold: each one is a content fd.
    writer = OCILayoutWriter(tmp_path / "layout")
    entries = [TarEntry(f"f{n:04d}", "file", os.urandom(5000)) for n in range(300)]
    layer = writer.add_layer(entries)
    writer.add_image([layer], ref_name="latest")
    limit = 128
    command = ["bash", "-c", f'ulimit -n {limit} && exec "$@"', "-"]
    command += [sys.executable, "-m", "proxy"]
    args = ["--insecure-policy", "--cache-dir", str(tmp_path / "cache")]
    async with ProxyProcess.spawn(args, command=command) as proxy:
        await proxy.legacy.initialize()
        rpc = await proxy.legacy.open_rpc()
        try:
            await rpc.initialize()
            image_id = await rpc.open_image(f"oci:{tmp_path / 'layout'}:latest")
            assert image_id is not None
            result, stream_fd, first = await rpc.get_splitfdstream(
                image_id, layer.digest, 256
            )
            close_fds([stream_fd, *first])
            await rpc.close_splitfdstream(result.stream_id)
            # The proxy keeps half its descriptors for everything else.
            assert result.file_count == 300
            assert 0 < result.files_included == len(first) < limit // 2
            rebuilt = await rebuild_layer(rpc, image_id, layer.digest, 256)
        finally:
            await rpc.aclose()
    assert rebuilt.sha256 == layer.diff_id
