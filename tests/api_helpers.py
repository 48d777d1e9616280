"""What the API and pull tests compare against, written without the proxy.

An OCI layout is read here straight from its JSON files, a splitfdstream is
decoded with ``struct`` from the format's definition (a signed 64-bit
little-endian prefix per chunk), and a directory tree is described by
``lstat`` and hashlib, so expected values never come from the code under
test. The proxy itself is only reached through its own client, spawned as a
separate process.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.client import ProxyProcess, RpcClient
from proxy.fdsocket import close_fds

REF_NAME = "org.opencontainers.image.ref.name"
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@asynccontextmanager
async def api_session(
    *proxy_args: str,
) -> AsyncIterator[tuple[ProxyProcess, RpcClient]]:
    """A spawned proxy and an initialized jsonrpc-fdpass client on it."""
    async with ProxyProcess.spawn(["--insecure-policy", *proxy_args]) as proxy:
        await proxy.legacy.initialize()
        rpc = await proxy.legacy.open_rpc()
        try:
            await rpc.initialize()
            yield proxy, rpc
        finally:
            await rpc.aclose()


@asynccontextmanager
async def raw_connection() -> AsyncIterator[tuple[ProxyProcess, RpcClient]]:
    """A jsonrpc-fdpass connection on which Initialize has not been called."""
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await proxy.legacy.initialize()
        rpc = await proxy.legacy.open_rpc()
        try:
            yield proxy, rpc
        finally:
            await rpc.aclose()


# --- OCI layouts, read by hand -------------------------------------------------


class Layout:
    """An OCI image layout's files, parsed with ``json`` only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def blob(self, digest: str) -> bytes:
        algorithm, _, hex_digest = digest.partition(":")
        return (self.path / "blobs" / algorithm / hex_digest).read_bytes()

    def json_blob(self, digest: str) -> Any:
        return json.loads(self.blob(digest))

    def tagged(self, ref: str = "latest") -> dict[str, Any]:
        """The ``index.json`` descriptor carrying reference name ``ref``."""
        index = json.loads((self.path / "index.json").read_bytes())
        for descriptor in index["manifests"]:
            if descriptor.get("annotations", {}).get(REF_NAME) == ref:
                return dict(descriptor)
        raise KeyError(f"{self.path} has no reference {ref!r}")

    def instance(
        self, ref: str = "latest", architecture: str = "amd64", variant: str = ""
    ) -> dict[str, Any]:
        """The image manifest descriptor for a platform, through nested indexes."""
        descriptor = self.tagged(ref)
        while descriptor["mediaType"] in INDEX_TYPES:
            candidates = [
                entry
                for entry in self.json_blob(descriptor["digest"])["manifests"]
                if entry["platform"]["architecture"] == architecture
                and entry["platform"].get("variant", "") in ("", variant)
            ]
            descriptor = candidates[0]
        return descriptor

    def manifest(self, ref: str = "latest", **platform: str) -> dict[str, Any]:
        return dict(self.json_blob(self.instance(ref, **platform)["digest"]))

    def config(self, ref: str = "latest", **platform: str) -> dict[str, Any]:
        return dict(self.json_blob(self.manifest(ref, **platform)["config"]["digest"]))

    def layers(self, ref: str = "latest", **platform: str) -> list[tuple[str, str]]:
        """(layer digest, diffID) of each layer, from manifest and config."""
        digests = [
            layer["digest"] for layer in self.manifest(ref, **platform)["layers"]
        ]
        diff_ids = self.config(ref, **platform)["rootfs"]["diff_ids"]
        assert len(digests) == len(diff_ids)
        return list(zip(digests, diff_ids, strict=True))


def sha256_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def read_fd(fd: int) -> bytes:
    """Everything readable from ``fd`` until EOF; closes it."""
    with os.fdopen(fd, "rb") as reader:
        return reader.read()


def open_fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- splitfdstreams, decoded from the format's definition -----------------------


def _whole_file(fd: int) -> bytes:
    """A content file from offset 0 to its end, leaving its offset alone."""
    parts = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


@dataclass
class RebuiltLayer:
    """A tar rebuilt from a GetSplitFDStream reply and its file windows."""

    sha256: str
    size: int
    file_count: int
    tar_size: int
    diff_id: str
    #: Stream fd plus content fds this client held at once, at most.
    peak_fds: int
    #: Rise of this process's open fds over the count before the call.
    peak_fd_rise: int


async def rebuild_layer(
    rpc: RpcClient, image_id: int, digest: str, window: int
) -> RebuiltLayer:
    """Fetch a layer's splitfdstream and concatenate it back into the tar.

    Content files come in windows of ``window`` fds; each window is closed
    before the next is asked for, as a bounded consumer would.
    """
    before = open_fd_count()
    result, stream_fd, first = await rpc.get_splitfdstream(image_id, digest, window)
    held = first
    start = 0
    peak_fds = 1 + len(held)
    peak_rise = open_fd_count() - before
    hasher = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(stream_fd, "rb") as stream:
            while prefix := stream.read(8):
                assert len(prefix) == 8, "the stream ends inside a chunk prefix"
                (value,) = struct.unpack("<q", prefix)
                if value < 0:
                    data = stream.read(-value)
                    assert len(data) == -value, "the stream ends inside a chunk"
                else:
                    if not start <= value < start + len(held):
                        close_fds(held)
                        held = []
                        held = await rpc.get_splitfdstream_files(
                            result.stream_id, value, window
                        )
                        start = value
                        peak_fds = max(peak_fds, 1 + len(held))
                        peak_rise = max(peak_rise, open_fd_count() - before)
                    data = _whole_file(held[value - start])
                hasher.update(data)
                size += len(data)
    finally:
        close_fds(held)
    await rpc.close_splitfdstream(result.stream_id)
    return RebuiltLayer(
        sha256=f"sha256:{hasher.hexdigest()}",
        size=size,
        file_count=result.file_count,
        tar_size=result.tar_size,
        diff_id=result.diff_id,
        peak_fds=peak_fds,
        peak_fd_rise=peak_rise,
    )


# --- directory trees -----------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """What a tree comparison looks at for one path."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    sha256: str | None
    target: str | None
    rdev: int | None
    mtime_ns: int | None


def describe_tree(root: Path) -> tuple[dict[str, Node], set[frozenset[str]]]:
    """Every path under ``root`` (relative), and its groups of hardlinks."""
    nodes: dict[str, Node] = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            info = path.lstat()
            nodes[relative] = _node(path, info)
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                inodes.setdefault((info.st_dev, info.st_ino), set()).add(relative)
    groups = {frozenset(group) for group in inodes.values() if len(group) > 1}
    return nodes, groups


def _node(path: Path, info: os.stat_result) -> Node:
    mode = info.st_mode
    regular = stat.S_ISREG(mode)
    return Node(
        kind=_kind(mode),
        mode=stat.S_IMODE(mode),
        uid=info.st_uid,
        gid=info.st_gid,
        size=info.st_size if regular else None,
        sha256=sha256_of_file(path) if regular else None,
        target=os.readlink(path) if stat.S_ISLNK(mode) else None,
        rdev=info.st_rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else None,
        mtime_ns=info.st_mtime_ns if regular else None,
    )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown"
