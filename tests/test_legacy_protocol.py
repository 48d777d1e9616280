"""Our legacy proxy on its own: the methods after skopeo 0.2.3 and our rules.

Methods skopeo 1.9 also has are compared with it in test_legacy_vs_skopeo.py.
Here each expected value comes from an independent source: hashlib, the OCI
layout files read with ``json``, the protocol description (REFERENCE.md
section 1), or skopeo itself where it checks the same policy.

Waits on the proxy are bounded with ``anyio.fail_after`` so that a hang fails
the test instead of stalling the suite; no assertion is about timing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from proxy.client import LegacyClient, LegacyError, ProxyProcess, RpcClient
from proxy.fdsocket import FdSocket
from proxy.seqpacket import receive_packet
from tests.images import BIG_LAYERINFO_LAYERS, DebianImage, ImageSet
from tests.legacy_helpers import (
    blob_path,
    exchange_raw,
    image_manifest_descriptor,
    layers_of,
    open_fd_count,
    read_and_finish,
    read_in_thread,
    record,
    sha256_digest,
)

pytestmark = pytest.mark.anyio

PACKET_LIMIT = 32 * 1024
# Bounds for waits that only end if the proxy works; never asserted on.
GENEROUS = 60


@asynccontextmanager
async def initialized_proxy(*args: str) -> AsyncIterator[ProxyProcess]:
    """Our proxy, spawned with ``args`` and already initialized."""
    async with ProxyProcess.spawn(args) as proxy:
        version, _, _ = await proxy.legacy.call("Initialize")
        assert version == "0.2.9"
        yield proxy


async def open_image(client: LegacyClient, reference: str) -> int:
    image_id, _, _ = await client.call("OpenImage", reference)
    assert isinstance(image_id, int)
    return image_id


async def assert_still_serving(client: LegacyClient, reference: str) -> None:
    """A full round trip: open an image and read its manifest."""
    image_id = await open_image(client, reference)
    call = await record(client, "GetManifest", image_id)
    assert call.finish is not None and call.finish.success
    await client.call("CloseImage", image_id)


def _layer_infos(layout: Path) -> list[dict[str, Any]]:
    return [
        {
            "digest": layer["digest"],
            "size": layer["size"],
            "media_type": layer["mediaType"],
        }
        for layer in layers_of(layout)
    ]


# --- OpenImageOptional ----------------------------------------------------------


async def test_open_image_optional_returns_zero_for_a_missing_reference(
    test_images: ImageSet,
) -> None:
    async with initialized_proxy() as proxy:
        missing = f"oci:{test_images['basic'].path}:no-such-tag"
        image_id, fds, _ = await proxy.legacy.call("OpenImageOptional", missing)
        assert image_id == 0 and fds == []
        present = test_images["basic"].reference
        image_id, _, _ = await proxy.legacy.call("OpenImageOptional", present)
        assert image_id == 1


async def test_open_image_optional_fails_for_a_missing_layout_directory(
    test_images: ImageSet, tmp_path: Path
) -> None:
    async with initialized_proxy() as proxy:
        with pytest.raises(LegacyError) as raised:
            await proxy.legacy.call("OpenImageOptional", f"oci:{tmp_path}/nope:x")
        # As skopeo: a missing directory is a broken reference, not a
        # missing image.
        assert raised.value.message == (
            f"open {tmp_path}/nope/index.json: no such file or directory"
        )


# --- GetLayerInfo, GetLayerInfoPiped ---------------------------------------------


@pytest.mark.parametrize("name", ["basic", "whiteouts", "zstd", "multiarch"])
async def test_get_layer_info_lists_the_manifests_layers(
    test_images: ImageSet, name: str
) -> None:
    async with initialized_proxy() as proxy:
        image_id = await open_image(proxy.legacy, test_images[name].reference)
        infos, fds, pipeid = await proxy.legacy.call("GetLayerInfo", image_id)
        assert fds == [] and pipeid == 0
        assert infos == _layer_infos(test_images[name].path)


async def test_get_layer_info_past_32_kib_is_an_error_reply_not_a_crash(
    test_images: ImageSet,
) -> None:
    async with initialized_proxy() as proxy:
        image = test_images["big-layerinfo"]
        image_id = await open_image(proxy.legacy, image.reference)
        with pytest.raises(LegacyError) as raised:
            await proxy.legacy.call("GetLayerInfo", image_id)
        assert str(PACKET_LIMIT) in raised.value.message
        assert "piped" in raised.value.message
        await assert_still_serving(proxy.legacy, test_images["basic"].reference)


async def test_get_layer_info_piped_returns_all_400_layers(
    test_images: ImageSet,
) -> None:
    async with initialized_proxy() as proxy:
        image = test_images["big-layerinfo"]
        image_id = await open_image(proxy.legacy, image.reference)
        call = await record(proxy.legacy, "GetLayerInfoPiped", image_id)
        assert call.value is None and call.finish and call.finish.success
        assert call.payload is not None
        infos = json.loads(call.payload)
        assert len(infos) == BIG_LAYERINFO_LAYERS
        assert infos == _layer_infos(image.path)


# --- GetRawBlob ---------------------------------------------------------------


async def _raw_blob(client: LegacyClient, image_id: int, digest: str) -> Any:
    size, fds, pipeid = await client.call("GetRawBlob", image_id, digest)
    assert pipeid == 0
    data_fd, error_fd = fds
    with anyio.fail_after(GENEROUS):
        data = await read_in_thread(data_fd)
        error = await read_in_thread(error_fd)
    return size, data, error


async def test_get_raw_blob_streams_the_blob_and_an_empty_error(
    test_images: ImageSet,
) -> None:
    (layer,) = layers_of(test_images["basic"].path)
    async with initialized_proxy() as proxy:
        image_id = await open_image(proxy.legacy, test_images["basic"].reference)
        size, data, error = await _raw_blob(proxy.legacy, image_id, layer["digest"])
    assert size == layer["size"]
    assert sha256_digest(data) == layer["digest"]
    assert error == b""


async def test_get_raw_blob_returns_a_corrupt_blob_unverified(
    test_images: ImageSet,
) -> None:
    layout = test_images["corrupt"].path
    (layer,) = layers_of(layout)
    async with initialized_proxy() as proxy:
        image_id = await open_image(proxy.legacy, test_images["corrupt"].reference)
        size, data, error = await _raw_blob(proxy.legacy, image_id, layer["digest"])
    assert data == blob_path(layout, layer["digest"]).read_bytes()
    assert sha256_digest(data) != layer["digest"]
    assert size == layer["size"] and error == b""


# --- GetBlob sizes ------------------------------------------------------------


async def test_get_blob_accepts_minus_one_as_an_unknown_size(
    test_images: ImageSet,
) -> None:
    (layer,) = layers_of(test_images["basic"].path)
    async with initialized_proxy() as proxy:
        image_id = await open_image(proxy.legacy, test_images["basic"].reference)
        call = await record(proxy.legacy, "GetBlob", image_id, layer["digest"], -1)
    assert call.value == layer["size"]
    assert call.payload is not None and call.finish is not None
    assert sha256_digest(call.payload) == layer["digest"]
    assert call.finish.success


async def test_get_blob_with_a_wrong_size_fails_at_finish_pipe(
    test_images: ImageSet,
) -> None:
    (layer,) = layers_of(test_images["basic"].path)
    wrong = layer["size"] + 1
    async with initialized_proxy() as proxy:
        image_id = await open_image(proxy.legacy, test_images["basic"].reference)
        call = await record(proxy.legacy, "GetBlob", image_id, layer["digest"], wrong)
    assert call.success and call.finish is not None
    assert not call.finish.success
    assert call.finish.error == f"expected {wrong} bytes in blob, got {layer['size']}"
    assert call.finish.error_code == "other"


# --- numbers and ids -------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "error"),
    [
        pytest.param(
            2**53, "out of range integer for numeric 9007199254740992.000000", id="2^53"
        ),
        pytest.param(-1, "expecting a non-negative integer, not -1", id="negative"),
        pytest.param(1.5, "expecting a non-negative integer, not 1.5", id="fraction"),
        pytest.param(True, "expecting numeric, not bool", id="bool"),
    ],
)
async def test_image_ids_that_are_not_safe_non_negative_integers_are_refused(
    test_images: ImageSet, number: Any, error: str
) -> None:
    async with initialized_proxy() as proxy:
        await open_image(proxy.legacy, test_images["basic"].reference)
        for method in ("CloseImage", "GetManifest", "GetLayerInfo"):
            with pytest.raises(LegacyError) as raised:
                await proxy.legacy.call(method, number)
            assert raised.value.message == error
            assert raised.value.error_code == "other"
        # Image 1 is still open: nothing was truncated to it.
        await proxy.legacy.call("CloseImage", 1)


async def test_largest_safe_integer_is_accepted_as_a_number(
    test_images: ImageSet,
) -> None:
    async with initialized_proxy() as proxy:
        with pytest.raises(LegacyError) as raised:
            await proxy.legacy.call("CloseImage", 2**53 - 1)
        assert raised.value.message == "no image 9007199254740991"


@pytest.mark.parametrize("size", [2**53, 1.5, True])
async def test_get_blob_refuses_a_size_that_is_not_a_safe_integer(
    test_images: ImageSet, size: Any
) -> None:
    (layer,) = layers_of(test_images["basic"].path)
    async with initialized_proxy() as proxy:
        image_id = await open_image(proxy.legacy, test_images["basic"].reference)
        call = await record(proxy.legacy, "GetBlob", image_id, layer["digest"], size)
        assert not call.success and call.error
        await assert_still_serving(proxy.legacy, test_images["basic"].reference)


async def test_image_ids_are_never_zero_and_keep_increasing(
    test_images: ImageSet,
) -> None:
    async with initialized_proxy() as proxy:
        ids = []
        for _ in range(3):
            ids.append(await open_image(proxy.legacy, test_images["basic"].reference))
        await proxy.legacy.call("CloseImage", ids[-1])
        ids.append(await open_image(proxy.legacy, test_images["zstd"].reference))
    assert 0 not in ids
    assert ids == sorted(set(ids))


async def test_finish_pipe_without_arguments_is_an_error_not_a_crash() -> None:
    async with initialized_proxy() as proxy:
        with pytest.raises(LegacyError) as raised:
            await proxy.legacy.call("FinishPipe")
        assert raised.value.message == "invalid request, expecting one argument"
        # skopeo panics here and the session dies; ours answers the next call.
        with pytest.raises(LegacyError) as raised:
            await proxy.legacy.call("Initialize")
        assert raised.value.message == "already initialized"


async def test_errors_carry_error_code_other(test_images: ImageSet) -> None:
    async with initialized_proxy() as proxy:
        requests: list[tuple[Any, ...]] = [
            ("NoSuchMethod",),
            ("OpenImage", "no-colon"),
            ("CloseImage", 7),
            ("FinishPipe", 7),
        ]
        for request in requests:
            call = await record(proxy.legacy, *request)
            assert not call.success and call.error_code == "other", request


# --- pipes that are not read ------------------------------------------------------


@pytest.mark.debian
async def test_finish_pipe_gives_up_on_a_stalled_transfer_with_a_retryable_error(
    debian_image: DebianImage, test_images: ImageSet
) -> None:
    async with initialized_proxy("--stall-timeout", "1") as proxy:
        image_id = await open_image(proxy.legacy, debian_image.reference)
        size = (await proxy.legacy.call("GetLayerInfo", image_id))[0][0]["size"]
        _, fds, pipeid = await proxy.legacy.call(
            "GetBlob", image_id, debian_image.layer_digest, size
        )
        try:
            # Nobody reads: the worker fills the pipe and stalls.
            with anyio.fail_after(GENEROUS):
                call = await record(proxy.legacy, "FinishPipe", pipeid)
        finally:
            os.close(fds[0])
        assert not call.success
        assert call.error_code == "retryable"
        assert "no progress" in call.error
        await assert_still_serving(proxy.legacy, test_images["basic"].reference)


@pytest.mark.debian
async def test_a_client_closing_its_pipe_early_gets_epipe_at_finish_pipe(
    debian_image: DebianImage, test_images: ImageSet
) -> None:
    async with initialized_proxy() as proxy:
        image_id = await open_image(proxy.legacy, debian_image.reference)
        _, fds, pipeid = await proxy.legacy.call(
            "GetBlob", image_id, debian_image.layer_digest, -1
        )
        os.close(fds[0])
        with anyio.fail_after(GENEROUS):
            call = await record(proxy.legacy, "FinishPipe", pipeid)
        assert not call.success
        assert call.error_code == "EPIPE"
        assert "client closed" in call.error
        await assert_still_serving(proxy.legacy, test_images["basic"].reference)


async def test_too_many_unfinished_pipes_are_refused_until_finished(
    test_images: ImageSet,
) -> None:
    layout = test_images["basic"].path
    manifest = blob_path(layout, image_manifest_descriptor(layout)["digest"])
    unfinished: list[tuple[int, int]] = []
    try:
        async with initialized_proxy() as proxy:
            image_id = await open_image(proxy.legacy, test_images["basic"].reference)
            refusal = None
            for _ in range(300):
                try:
                    _, fds, pipeid = await proxy.legacy.call("GetManifest", image_id)
                except LegacyError as exc:
                    refusal = exc
                    break
                unfinished.append((fds[0], pipeid))
            assert refusal is not None, "300 unfinished pipes were all accepted"
            assert "FinishPipe" in refusal.message
            assert proxy.process.poll() is None

            while unfinished:
                fd, pipeid = unfinished.pop()
                payload, finish = await read_and_finish(proxy.legacy, fd, pipeid)
                assert finish.success
                assert payload == manifest.read_bytes()
            await assert_still_serving(proxy.legacy, test_images["basic"].reference)
    finally:
        for fd, _ in unfinished:
            os.close(fd)


# --- files that are not regular files -------------------------------------------------


def _copy_layout(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def _dir_image(layout: Path, dest: Path) -> Path:
    """skopeo's ``dir:`` format, written by hand from an OCI layout: the
    manifest as ``manifest.json``, each blob as its hex digest."""
    dest.mkdir()
    manifest = image_manifest_descriptor(layout)["digest"]
    shutil.copyfile(blob_path(layout, manifest), dest / "manifest.json")
    for blob in (layout / "blobs" / "sha256").iterdir():
        shutil.copyfile(blob, dest / blob.name)
    (dest / "version").write_text("Directory Transport Version: 1.1\n")
    return dest


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("transport", ["oci", "dir"])
async def test_a_fifo_in_place_of_a_blob_is_refused_naming_its_path(
    test_images: ImageSet, tmp_path: Path, transport: str
) -> None:
    layout = test_images["basic"].path
    (layer,) = layers_of(layout)
    if transport == "oci":
        root = _copy_layout(layout, tmp_path / "layout")
        fifo = blob_path(root, layer["digest"])
        reference = f"oci:{root}:latest"
    else:
        root = _dir_image(layout, tmp_path / "dir")
        fifo = root / layer["digest"].partition(":")[2]
        reference = f"dir:{root}"
    _replace_with_fifo(fifo)
    async with initialized_proxy() as proxy:
        image_id = await open_image(proxy.legacy, reference)
        for method, args in (
            ("GetRawBlob", (layer["digest"],)),
            ("GetBlob", (layer["digest"], layer["size"])),
        ):
            call = await record(proxy.legacy, method, image_id, *args)
            assert not call.success, method
            assert str(fifo) in call.error
            assert "not a regular file" in call.error
        await assert_still_serving(proxy.legacy, test_images["basic"].reference)


@pytest.mark.parametrize("transport", ["oci", "dir"])
async def test_a_fifo_in_place_of_the_index_or_manifest_fails_open_image(
    test_images: ImageSet, tmp_path: Path, transport: str
) -> None:
    layout = test_images["basic"].path
    if transport == "oci":
        root = _copy_layout(layout, tmp_path / "layout")
        fifo = root / "index.json"
        reference = f"oci:{root}:latest"
    else:
        root = _dir_image(layout, tmp_path / "dir")
        fifo = root / "manifest.json"
        reference = f"dir:{root}"
    _replace_with_fifo(fifo)
    async with initialized_proxy() as proxy:
        for method in ("OpenImage", "OpenImageOptional"):
            call = await record(proxy.legacy, method, reference)
            assert not call.success, method
            assert str(fifo) in call.error
            assert "not a regular file" in call.error
        await assert_still_serving(proxy.legacy, test_images["basic"].reference)


async def test_a_fifo_as_the_archive_of_either_archive_transport_fails_open_image(
    test_images: ImageSet, tmp_path: Path
) -> None:
    fifo = tmp_path / "image.tar"
    os.mkfifo(fifo)
    async with initialized_proxy() as proxy:
        for transport in ("oci-archive", "docker-archive"):
            call = await record(proxy.legacy, "OpenImage", f"{transport}:{fifo}")
            assert not call.success, transport
            assert str(fifo) in call.error
            assert "not a regular file" in call.error
        await assert_still_serving(proxy.legacy, test_images["basic"].reference)


# --- framing ---------------------------------------------------------------------


async def test_a_packet_over_32_kib_gets_an_error_reply_and_the_proxy_goes_on(
    test_images: ImageSet,
) -> None:
    packet = json.dumps({"method": "OpenImage", "args": ["x" * PACKET_LIMIT]})
    async with initialized_proxy() as proxy:
        reply = await exchange_raw(proxy.legacy, packet.encode())
        assert reply["success"] is False and reply["pipeid"] == 0
        assert str(PACKET_LIMIT) in reply["error"]
        await assert_still_serving(proxy.legacy, test_images["basic"].reference)


# --- policy --------------------------------------------------------------------


def _write_policy(tmp_path: Path, document: dict[str, Any]) -> str:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    return str(path)


REJECT = {"default": [{"type": "reject"}]}
SIGNED_BY = {
    "default": [
        {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/nonexistent.gpg"}
    ]
}


async def _open_error(args: list[str], reference: str) -> LegacyError | None:
    async with initialized_proxy(*args) as proxy:
        try:
            await open_image(proxy.legacy, reference)
        except LegacyError as exc:
            return exc
    return None


async def test_a_reject_policy_refuses_open_image(
    test_images: ImageSet, tmp_path: Path
) -> None:
    policy = _write_policy(tmp_path, REJECT)
    error = await _open_error(["--policy", policy], test_images["basic"].reference)
    assert error is not None
    assert "rejected by policy" in error.message


async def test_a_signed_by_policy_refuses_open_image_saying_we_cannot_verify(
    test_images: ImageSet, tmp_path: Path
) -> None:
    policy = _write_policy(tmp_path, SIGNED_BY)
    error = await _open_error(["--policy", policy], test_images["basic"].reference)
    assert error is not None
    assert "signedBy" in error.message and "cannot" in error.message


async def test_insecure_policy_overrides_a_reject_policy(
    test_images: ImageSet, tmp_path: Path
) -> None:
    policy = _write_policy(tmp_path, REJECT)
    args = ["--policy", policy, "--insecure-policy"]
    assert await _open_error(args, test_images["basic"].reference) is None


def _skopeo_copy_allowed(policy: str, reference: str, tmp_path: Path) -> bool:
    destination = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
    result = subprocess.run(
        ["skopeo", "--policy", policy, "copy", reference, f"dir:{destination}"],
        capture_output=True,
        text=True,
    )
    return result.returncode == 0


async def test_a_policy_scoped_to_the_layout_path_accepts_only_that_layout(
    test_images: ImageSet, tmp_path: Path
) -> None:
    accepted = test_images["basic"]
    rejected = test_images["zstd"]
    scope = os.path.realpath(accepted.path)
    policy = _write_policy(
        tmp_path,
        {
            "default": [{"type": "reject"}],
            "transports": {"oci": {scope: [{"type": "insecureAcceptAnything"}]}},
        },
    )
    assert await _open_error(["--policy", policy], accepted.reference) is None
    error = await _open_error(["--policy", policy], rejected.reference)
    assert error is not None and "rejected by policy" in error.message

    # skopeo reads the same policy the same way.
    if shutil.which("skopeo") is not None:
        assert _skopeo_copy_allowed(policy, accepted.reference, tmp_path)
        assert not _skopeo_copy_allowed(policy, rejected.reference, tmp_path)


# --- OpenJsonRPCFdPass, Shutdown --------------------------------------------------


async def test_open_jsonrpc_fdpass_returns_one_independent_stream_socket_per_call(
    test_images: ImageSet,
) -> None:
    async with initialized_proxy() as proxy:
        clients: list[RpcClient] = []
        inodes = []
        for _ in range(2):
            value, fds, pipeid = await proxy.legacy.call("OpenJsonRPCFdPass")
            assert value is None and pipeid == 0 and len(fds) == 1
            sock = socket.socket(fileno=fds[0])
            assert sock.family == socket.AF_UNIX
            assert sock.type == socket.SOCK_STREAM
            inodes.append(os.fstat(sock.fileno()).st_ino)
            clients.append(RpcClient(FdSocket(sock)))
        assert inodes[0] != inodes[1]

        first, second = clients
        with anyio.fail_after(GENEROUS):
            await first.initialize()
            await second.initialize()
            await first.aclose()
            # The second connection does not depend on the first.
            image_id = await second.open_image(test_images["basic"].reference)
            assert image_id == 1
            await second.aclose()
        # Nor does the legacy session depend on either.
        await assert_still_serving(proxy.legacy, test_images["basic"].reference)


async def test_shutdown_exits_zero_without_a_reply() -> None:
    async with initialized_proxy() as proxy:
        await proxy.legacy.shutdown()
        with anyio.fail_after(GENEROUS):
            status = await anyio.to_thread.run_sync(proxy.process.wait)
            reply = await receive_packet(proxy.legacy._sock, 1 << 20)  # noqa: SLF001
        assert status == 0
        assert reply is None


# --- file descriptors ------------------------------------------------------------


async def _mixed_session(client: LegacyClient, test_images: ImageSet) -> int:
    """About 50 calls of every kind, successes and failures; returns the count."""
    basic_layer = layers_of(test_images["basic"].path)[0]
    corrupt_layer = layers_of(test_images["corrupt"].path)[0]
    count = 0

    async def call(*request: Any) -> None:
        nonlocal count
        count += 1
        await record(client, *request)

    for name in ("basic", "zstd", "multiarch", "corrupt", "big-layerinfo"):
        await call("OpenImage", test_images[name].reference)
    for image_id in (1, 2, 3):
        for method in ("GetManifest", "GetConfig", "GetFullConfig"):
            await call(method, image_id)
        await call("GetLayerInfo", image_id)
        await call("GetLayerInfoPiped", image_id)
    await call("GetLayerInfo", 5)
    await call("GetBlob", 1, basic_layer["digest"], basic_layer["size"])
    await call("GetBlob", 1, basic_layer["digest"], -1)
    await call("GetBlob", 1, basic_layer["digest"], basic_layer["size"] + 1)
    await call("GetBlob", 4, corrupt_layer["digest"], corrupt_layer["size"])
    await call("GetBlob", 1, "sha256:" + "0" * 64, 1)
    await call("GetBlob", 1, "sha256:zz", 1)
    for image_id, digest in ((1, basic_layer["digest"]), (4, corrupt_layer["digest"])):
        count += 1
        await _raw_blob(client, image_id, digest)
    await call("GetRawBlob", 1, "sha256:" + "0" * 64)
    for bad in ("no-colon", "bogus:x", f"oci:{test_images.root}/nope:x", 5):
        await call("OpenImage", bad)
    await call("OpenImageOptional", f"{test_images['basic'].reference}-missing")
    for bad_id in (0, 99, "1", None, -1):
        await call("CloseImage", bad_id)
    await call("FinishPipe", 12345)
    await call("NoSuchMethod")
    await call("Initialize")
    # The jsonrpc-fdpass socket is closed unused by record(): the proxy must
    # notice and let go of its end.
    await call("OpenJsonRPCFdPass")
    await call("OpenJsonRPCFdPass")
    for image_id in (1, 2, 3, 4, 5):
        await call("CloseImage", image_id)
    return count


async def test_a_long_mixed_session_leaks_no_fds_in_either_process(
    test_images: ImageSet,
) -> None:
    ours_before = open_fd_count("self")
    async with initialized_proxy() as proxy:
        pid = proxy.process.pid
        proxy_before = open_fd_count(pid)
        calls = await _mixed_session(proxy.legacy, test_images)
        assert calls >= 50

        # Workers close their ends just after the client saw EOF; wait for
        # them rather than racing them.
        with anyio.move_on_after(GENEROUS):
            while open_fd_count(pid) != proxy_before:
                await anyio.sleep(0.05)
        assert open_fd_count(pid) == proxy_before, os.listdir(f"/proc/{pid}/fd")
    assert open_fd_count("self") == ours_before


async def test_unread_blob_pipes_do_not_starve_the_next_request(
    debian_image: DebianImage, test_images: ImageSet
) -> None:
    # Each unread pipe blocks its transfer thread once the pipe buffer is
    # full; more of them than anyio has default worker threads (40) used to
    # leave no thread to open the next blob with.
    size = blob_path(debian_image.path, debian_image.layer_digest).stat().st_size
    unread: list[int] = []
    try:
        async with initialized_proxy() as proxy:
            image_id = await open_image(proxy.legacy, debian_image.reference)
            for _ in range(60):
                _, fds, _ = await proxy.legacy.call(
                    "GetBlob", image_id, debian_image.layer_digest, size
                )
                unread.extend(fds)
            with anyio.fail_after(GENEROUS):
                await assert_still_serving(proxy.legacy, test_images["basic"].reference)
                layout = test_images["basic"].path
                layer = layers_of(layout)[0]
                basic_id = await open_image(
                    proxy.legacy, test_images["basic"].reference
                )
                _, blob = await proxy.legacy.call_piped(
                    "GetBlob", basic_id, layer["digest"], layer["size"]
                )
            assert sha256_digest(blob) == layer["digest"]
    finally:
        for fd in unread:
            os.close(fd)
