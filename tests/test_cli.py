"""The command line: skopeo's flags accepted, unsupported ones refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.images import ImageSet

PROXY = [sys.executable, "-m", "proxy"]


def _call(sock: socket.socket, method: str, *args: Any) -> dict[str, Any]:
    sock.send(json.dumps({"method": method, "args": list(args)}).encode())
    data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(8))
    for _, _, payload in ancillary:
        for position in range(0, len(payload) - len(payload) % 4, 4):
            os.close(int.from_bytes(payload[position : position + 4], "little"))
    reply: dict[str, Any] = json.loads(data)
    return reply


def _spawn(*args: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen(
        [*PROXY, *args],
        stdin=theirs.fileno(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    ours.settimeout(30)
    return process, ours


def _shutdown(
    process: subprocess.Popen[bytes], sock: socket.socket
) -> tuple[bytes, bytes]:
    sock.send(b'{"method":"Shutdown","args":[]}')
    stdout, stderr = process.communicate(timeout=30)
    sock.close()
    assert process.returncode == 0, stderr.decode()
    return stdout, stderr


def test_flags_the_rust_client_passes_are_accepted(tmp_path: Path) -> None:
    authfile = tmp_path / "auth.json"
    authfile.write_text("{}")
    process, sock = _spawn(
        "experimental-image-proxy",
        "--authfile",
        str(authfile),
        "--no-creds",
        "--cert-dir",
        str(tmp_path),
        "--tls-verify=false",
        "--insecure-policy",
        "--user-agent-prefix",
        "bootc/1.0",
    )
    assert _call(sock, "Initialize")["value"] == "0.2.9"
    _shutdown(process, sock)


def test_global_flags_are_accepted_before_the_subcommand() -> None:
    process, sock = _spawn("--insecure-policy", "--debug", "experimental-image-proxy")
    assert _call(sock, "Initialize")["success"] is True
    _shutdown(process, sock)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--decryption-key", "key.pem"), ("--daemon-host", "unix:///run/docker.sock")],
)
def test_flags_we_cannot_honour_fail_at_start_up_naming_the_flag(
    flag: str, value: str
) -> None:
    result = subprocess.run(
        [*PROXY, "experimental-image-proxy", flag, value],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert flag in result.stderr.decode()


def test_tls_verify_rejects_a_value_that_is_not_a_boolean() -> None:
    result = subprocess.run(
        [*PROXY, "experimental-image-proxy", "--tls-verify=maybe"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "--tls-verify" in result.stderr.decode()


def test_sockfd_serves_on_the_given_descriptor() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen(
        [*PROXY, "experimental-image-proxy", "--sockfd", str(theirs.fileno())],
        stdin=subprocess.DEVNULL,
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    ours.settimeout(30)
    assert _call(ours, "Initialize")["value"] == "0.2.9"
    ours.send(b'{"method":"Shutdown","args":[]}')
    assert process.wait(timeout=30) == 0
    ours.close()


def test_a_sockfd_that_is_not_a_seqpacket_socket_is_a_clear_start_up_error(
    tmp_path: Path,
) -> None:
    with open(tmp_path / "file", "w") as not_a_socket:
        result = subprocess.run(
            [
                *PROXY,
                "experimental-image-proxy",
                "--sockfd",
                str(not_a_socket.fileno()),
            ],
            stdin=subprocess.DEVNULL,
            pass_fds=[not_a_socket.fileno()],
            capture_output=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert "socket" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_debug_logs_each_request_to_stderr_and_stdout_stays_empty(
    test_images: ImageSet,
) -> None:
    process, sock = _spawn("experimental-image-proxy", "--debug")
    _call(sock, "Initialize")
    _call(sock, "OpenImage", test_images["basic"].reference)
    _call(sock, "CloseImage", 99)
    stdout, stderr = _shutdown(process, sock)
    assert stdout == b""
    log = stderr.decode()
    for method in ("Initialize", "OpenImage", "CloseImage"):
        assert method in log


def _index_entry(layout: Path, architecture: str, variant: str | None) -> str:
    """The instance digest for a platform, read from the layout's files."""
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    nested = json.loads(
        (layout / "blobs" / "sha256" / digest.split(":")[1]).read_text()
    )
    for entry in nested["manifests"]:
        platform = entry["platform"]
        if (
            platform["architecture"] == architecture
            and platform.get("variant") == variant
        ):
            return str(entry["digest"])
    raise AssertionError(f"no {architecture} entry in the test image")


@pytest.mark.parametrize(
    ("flags", "architecture", "variant"),
    [
        (["--override-arch", "arm64", "--override-variant", "v8"], "arm64", "v8"),
        (["--override-arch", "arm", "--override-variant", "v7"], "arm", "v7"),
        (["--override-arch", "amd64"], "amd64", None),
    ],
)
def test_override_flags_choose_the_instance_of_another_platform(
    test_images: ImageSet, flags: list[str], architecture: str, variant: str | None
) -> None:
    image = test_images["multiarch"]
    process, sock = _spawn("experimental-image-proxy", *flags)
    _call(sock, "Initialize")
    image_id = _call(sock, "OpenImage", image.reference)["value"]
    reply = _call(sock, "GetManifest", image_id)
    _call(sock, "FinishPipe", reply["pipeid"])
    _shutdown(process, sock)
    assert reply["value"] == _index_entry(image.path, architecture, variant)


def test_pull_and_inspect_pass_registry_flags_to_the_proxy(
    test_images: ImageSet, tmp_path: Path
) -> None:
    from tests.registry import run_registry, skopeo_copy

    source = test_images["basic"]
    with run_registry(tmp_path / "registry") as registry:
        skopeo_copy(
            source.reference,
            registry.reference("basic:latest"),
            "--dest-tls-verify=false",
        )
        image = registry.reference("basic:latest")
        refused = subprocess.run(
            [*PROXY, "inspect", image], capture_output=True, timeout=120
        )
        # A plain-HTTP registry needs --tls-verify=false, as with skopeo.
        assert refused.returncode != 0
        inspected = subprocess.run(
            [*PROXY, "inspect", "--tls-verify=false", image],
            capture_output=True,
            timeout=120,
            check=True,
        )
        manifest_digest = _index_top_digest(source.path)
        assert manifest_digest in inspected.stdout.decode()
        pulled = subprocess.run(
            [*PROXY, "pull", "--tls-verify=false", image, str(tmp_path / "rootfs")],
            capture_output=True,
            timeout=300,
        )
        assert pulled.returncode == 0, pulled.stderr.decode()
        assert (tmp_path / "rootfs" / "usr" / "bin").is_dir()


def _index_top_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


def test_a_negative_sockfd_is_refused_without_a_traceback() -> None:
    result = subprocess.run(
        [*PROXY, "experimental-image-proxy", "--sockfd", "-3"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--sockfd" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_an_image_name_with_a_nul_byte_is_a_client_error() -> None:
    process, sock = _spawn("experimental-image-proxy")
    _call(sock, "Initialize")
    reply = _call(sock, "OpenImage", "oci:/tmp/x\u0000y")
    assert reply["success"] is False
    assert "NUL" in reply["error"]
    assert _call(sock, "CloseImage", 1)["error"] == "no image 1"
    _shutdown(process, sock)
