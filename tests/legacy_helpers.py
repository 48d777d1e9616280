"""Helpers for the legacy protocol tests: recorded calls and layout reading.

A ``Call`` records everything a client can observe of one request: success,
value, error text and code, how many fds came back, whether a pipe id did,
and for piped methods the payload read to EOF and FinishPipe's outcome. The
same recorder runs against skopeo and against our proxy, so the two
transcripts differ only where the implementations do.

The layout readers use ``json`` on the OCI layout files directly, so the
expected values never come from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from proxy.client import LegacyClient, LegacyError
from proxy.seqpacket import close_all, receive_packet, send_packet

SKOPEO = ["skopeo"]


@dataclass(frozen=True)
class Finish:
    """What FinishPipe answered after the payload was read."""

    success: bool
    error: str = ""
    error_code: str = ""


@dataclass(frozen=True)
class Call:
    """One request and everything observable of its reply."""

    method: str
    args: tuple[Any, ...]
    success: bool
    value: Any = None
    error: str = ""
    error_code: str = ""
    fd_count: int = 0
    has_pipe: bool = False
    payload: bytes | None = None
    finish: Finish | None = None

    def normalised(self) -> Call:
        """Forget what the protocol lets differ: the error code (absent
        before 0.2.8) and the one in FinishPipe's outcome."""
        finish = self.finish and replace(self.finish, error_code="")
        return replace(self, error_code="", finish=finish)


#: Seconds any one recorded call may take; only a hung proxy gets near it.
CALL_BOUND = 60


async def record(client: LegacyClient, method: str, *args: Any) -> Call:
    """Make one call; a pipe is read to EOF concurrently with FinishPipe.

    A proxy that never answers, or never closes a pipe, fails the call with
    TimeoutError after ``CALL_BOUND`` seconds instead of hanging the suite.
    """
    with anyio.fail_after(CALL_BOUND):
        return await _record(client, method, *args)


async def _record(client: LegacyClient, method: str, *args: Any) -> Call:
    try:
        value, fds, pipeid = await client.call(method, *args)
    except LegacyError as exc:
        return Call(method, args, False, error=exc.message, error_code=exc.error_code)
    call = Call(method, args, True, value, fd_count=len(fds), has_pipe=pipeid != 0)
    if pipeid == 0:
        close_all(fds)
        return call
    (fd,) = fds
    payload, finish = await read_and_finish(client, fd, pipeid)
    return replace(call, payload=payload, finish=finish)


async def read_and_finish(
    client: LegacyClient, fd: int, pipeid: int
) -> tuple[bytes, Finish]:
    """Read ``fd`` to EOF (closing it) while FinishPipe runs, as skopeo only
    closes the write end inside FinishPipe."""
    payload: list[bytes] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_read_into, fd, payload)
        try:
            await client.call("FinishPipe", pipeid)
            finish = Finish(True)
        except LegacyError as exc:
            finish = Finish(False, exc.message, exc.error_code)
    return payload[0], finish


async def _read_into(fd: int, out: list[bytes]) -> None:
    out.append(await read_in_thread(fd))


async def read_in_thread(fd: int) -> bytes:
    """Read ``fd`` to EOF off the event loop; a cancelled read is abandoned
    (its thread ends when the fd does)."""
    return await anyio.to_thread.run_sync(read_fd_to_end, fd, abandon_on_cancel=True)


def read_fd_to_end(fd: int) -> bytes:
    """Everything until EOF; the fd is closed."""
    with os.fdopen(fd, "rb") as reader:
        return reader.read()


async def exchange_raw(client: LegacyClient, packet: bytes) -> dict[str, Any]:
    """Send ``packet`` as it is and decode the reply as plain JSON.

    The client only sends well-formed requests, so this borrows its socket to
    send what a broken client would.
    """
    sock: socket.socket = client._sock  # noqa: SLF001 - see the docstring
    await send_packet(sock, packet, [])
    received = await receive_packet(sock, 1 << 20)
    assert received is not None, "the proxy closed the connection"
    data, fds = received
    close_all(fds)
    reply: dict[str, Any] = json.loads(data)
    return reply


# --- reading OCI layouts directly ----------------------------------------------


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, hex_part = digest.split(":", 1)
    return layout / "blobs" / algorithm / hex_part


def read_json_blob(layout: Path, digest: str) -> Any:
    return json.loads(blob_path(layout, digest).read_bytes())


def top_descriptor(layout: Path) -> dict[str, Any]:
    """The one descriptor in the layout's index.json."""
    index = json.loads((layout / "index.json").read_bytes())
    (descriptor,) = index["manifests"]
    assert isinstance(descriptor, dict)
    return descriptor


def machine_architecture() -> str:
    """This machine's architecture in OCI's (Go's) words."""
    names = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}
    machine = platform.machine()
    return names.get(machine, machine)


def image_manifest_descriptor(layout: Path) -> dict[str, Any]:
    """The image manifest a proxy on this machine picks from the layout."""
    descriptor = top_descriptor(layout)
    while descriptor["mediaType"].endswith("index.v1+json"):
        index = read_json_blob(layout, descriptor["digest"])
        matching = [
            entry
            for entry in index["manifests"]
            if entry.get("platform", {}).get("os") == "linux"
            and entry["platform"].get("architecture") == machine_architecture()
        ]
        descriptor = matching[0]
    return descriptor


def layers_of(layout: Path) -> list[dict[str, Any]]:
    """The layer descriptors of the image manifest chosen for this machine."""
    manifest = read_json_blob(layout, image_manifest_descriptor(layout)["digest"])
    layers: list[dict[str, Any]] = manifest["layers"]
    return layers


def open_fd_count(pid: int | str) -> int:
    """How many fds a process has open (``self`` for this process)."""
    return len(os.listdir(f"/proc/{pid}/fd"))
