"""The images the benchmark reads, built on demand.

``debian`` and ``manyfiles`` come from ``scripts/make-test-images`` (which
skips what is already built). ``bigfile`` is built here: one gzip layer
holding a single file of ``BIGFILE_SIZE`` bytes. Its content is a 1 MiB
pseudo-random block rotated by a different offset for every MiB, so deflate
finds nothing within its 32 KiB window and the blob is as large as the file
(stored blocks), yet generating it costs one memory copy per MiB. ISA-L at
level 1 compresses it at about 600 MB/s here.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.oci_writer import OCILayoutWriter

MANYFILES_COUNT = 100_000
BIGFILE_SIZE = 2 << 30
BIGFILE_VERSION = f"1 size={BIGFILE_SIZE}"
_MIB = 1 << 20


@dataclass(frozen=True)
class Layout:
    """An OCI layout on disk, its reference and its (single-manifest) layers."""

    path: Path
    ref: str

    @property
    def reference(self) -> str:
        return f"oci:{self.path}:{self.ref}"

    def layers(self) -> list[dict[str, Any]]:
        blobs = self.path / "blobs" / "sha256"
        index = json.loads((self.path / "index.json").read_bytes())
        for entry in index["manifests"]:
            names = entry.get("annotations", {})
            if names.get("org.opencontainers.image.ref.name") == self.ref:
                hex_digest = entry["digest"].partition(":")[2]
                manifest = json.loads((blobs / hex_digest).read_bytes())
                return list(manifest["layers"])
        raise LookupError(f"{self.path} has no manifest tagged {self.ref}")

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.partition(":")[2]


def make_test_images(repo: Path, images: Path, *args: str) -> None:
    """Run ``scripts/make-test-images IMAGES ARGS`` (it skips what is built)."""
    command = [sys.executable, str(repo / "scripts" / "make-test-images")]
    subprocess.run([*command, str(images), *args], check=True)


def debian(repo: Path, images: Path) -> Layout:
    if not (images / "debian" / "index.json").is_file():
        make_test_images(repo, images, "--only", "debian")
    return Layout(images / "debian", "bookworm")


def manyfiles(repo: Path, images: Path) -> Layout:
    stamp = images / ".stamps" / "manyfiles"
    if not stamp.is_file() or stamp.read_text() != f"1 files={MANYFILES_COUNT}":
        make_test_images(
            repo, images, "--no-debian", "--only", "manyfiles",
            "--many", str(MANYFILES_COUNT),
        )  # fmt: skip
    return Layout(images / "manyfiles", "latest")


def _bigfile_chunks(size: int) -> Iterator[bytes]:
    block = random.Random(2024).randbytes(_MIB)
    for number in range(size // _MIB):
        shift = (number * 7919) % _MIB
        yield block[shift:] + block[:shift]
    if size % _MIB:
        yield block[: size % _MIB]


def _write_bigfile_tar(path: Path, size: int) -> None:
    info = tarfile.TarInfo("bigfile")
    info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
    with open(path, "wb") as out:
        out.write(info.tobuf(tarfile.PAX_FORMAT))
        for chunk in _bigfile_chunks(size):
            out.write(chunk)
        out.write(bytes(-size % tarfile.BLOCKSIZE))
        out.write(bytes(2 * tarfile.BLOCKSIZE))


@contextmanager
def _images_lock(images: Path) -> Iterator[None]:
    """The flock ``make-test-images`` holds on ``IMAGES/.lock`` while building.

    Without it a concurrent make-test-images run takes our ``.tmp-*``
    directory for a crash leftover and removes it mid-build.
    """
    images.mkdir(parents=True, exist_ok=True)
    fd = os.open(images / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def bigfile(images: Path) -> Layout:
    """``IMAGES/bigfile``, built into a temporary sibling and renamed in."""
    final, stamp = images / "bigfile", images / ".stamps" / "bigfile"
    if final.is_dir() and stamp.is_file() and stamp.read_text() == BIGFILE_VERSION:
        return Layout(final, "latest")
    with _images_lock(images):
        _build_bigfile(images, final, stamp)
    return Layout(final, "latest")


def _build_bigfile(images: Path, final: Path, stamp: Path) -> None:
    print(f"bench: building {final} ({BIGFILE_SIZE >> 20} MiB file)", flush=True)
    temp = Path(tempfile.mkdtemp(prefix=".tmp-bigfile-", dir=images))
    try:
        tar_path = temp / "layer.tar"
        _write_bigfile_tar(tar_path, BIGFILE_SIZE)
        writer = OCILayoutWriter(temp / "layout")
        layer = writer.add_layer_tar(tar_path, gzip_library="isal", level=1)
        tar_path.unlink()
        writer.add_image([layer], ref_name="latest")
        stamp.unlink(missing_ok=True)
        if final.exists():
            shutil.rmtree(final)
        (temp / "layout").rename(final)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    stamp.parent.mkdir(exist_ok=True)
    stamp.write_text(BIGFILE_VERSION)
    os.sync()
