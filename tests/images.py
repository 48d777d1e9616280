"""The test image catalogue: synthetic OCI layouts and a real Debian image.

``scripts/make-test-images`` builds every image here into one directory, and
the ``test_images`` and ``debian_image`` fixtures read them back. Each image
is built in a temporary directory beside its final place and renamed into
place, then a stamp naming its recipe version is written; an image whose
directory and stamp are both present and current is skipped, so re-runs are
cheap and an interrupted run leaves nothing half made. A lock file serialises
concurrent builders of the same directory.

The Debian image is ``mmdebstrap --variant=minbase bookworm`` packed as one
gzip layer whose uncompressed bytes are exactly mmdebstrap's tar; the tar is
kept under ``cache/`` so that rebuilding the layout does not rerun
mmdebstrap.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.oci_writer import (
    DOCKER_MANIFEST_LIST,
    FIXED_MTIME,
    OCI_INDEX,
    OCILayoutWriter,
    Platform,
    TarEntry,
    platform_for_machine,
    write_tar,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MAKE_TEST_IMAGES = REPO_ROOT / "scripts" / "make-test-images"
DEFAULT_IMAGES_DIR = REPO_ROOT / "test-images"
IMAGES_DIR_ENV = "IMAGE_PROXY_TEST_IMAGES"
REF = "latest"
DEBIAN_REF = "bookworm"
DEBIAN_SUITE = "bookworm"

Builder = Callable[[OCILayoutWriter], None]


def images_dir() -> Path:
    """Where the test images live: ``$IMAGE_PROXY_TEST_IMAGES`` or
    ``<repo>/test-images``."""
    return Path(os.environ.get(IMAGES_DIR_ENV) or DEFAULT_IMAGES_DIR)


# --- the synthetic images ---------------------------------------------------


def _dir(name: str, **fields: Any) -> TarEntry:
    return TarEntry(name, "dir", **fields)


def _file(name: str, content: bytes, **fields: Any) -> TarEntry:
    return TarEntry(name, "file", content, **fields)


def _symlink(name: str, target: str) -> TarEntry:
    return TarEntry(name, "symlink", linkname=target)


def _hardlink(name: str, target: str) -> TarEntry:
    return TarEntry(name, "hardlink", linkname=target)


def _pseudo_random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def build_basic(writer: OCILayoutWriter) -> None:
    """One gzip layer with every common entry type and attribute."""
    entries = [
        _dir("etc/"),
        _file("etc/hostname", b"basic\n"),
        _file("etc/empty", b""),
        _file("etc/with-xattr", b"has an xattr\n", xattrs={"user.demo": "hello"}),
        _dir("data/"),
        _file("data/512-bytes", bytes(range(256)) * 2),
        _file("data/1-MiB", _pseudo_random(1 << 20, seed=1)),
        _file("data/old-mtime", b"written in 2001\n", mtime=1_000_000_000),
        _dir("usr/"),
        _dir("usr/bin/"),
        _file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755),
        _symlink("usr/bin/relative-link", "tool"),
        _symlink("usr/bin/absolute-link", "/usr/bin/tool"),
        _hardlink("usr/bin/tool-hardlink", "usr/bin/tool"),
        _dir("run/"),
        TarEntry("run/fifo", "fifo", mode=0o600),
        _dir("home/"),
        _dir("home/user/", uid=1000, gid=1000, uname="user", gname="user"),
        _file("home/user/.profile", b"umask 022\n", uid=1000, gid=1000, mode=0o600),
        _dir("empty-dir/", mode=0o700),
    ]
    layer = writer.add_layer(entries)
    writer.add_image([layer], config={"Cmd": ["/usr/bin/tool"]}, ref_name=REF)


def build_whiteouts(writer: OCILayoutWriter) -> None:
    """Three layers: a base, whiteouts and an opaque directory, a re-add."""
    base = [
        _dir("etc/"),
        _file("etc/keep.conf", b"kept\n"),
        _file("etc/remove.conf", b"removed by layer 2\n"),
        _file("etc/readd.conf", b"version 1\n"),
        _dir("opt/"),
        _dir("opt/app/"),
        _file("opt/app/old-a", b"hidden by the opaque marker\n"),
        _dir("opt/app/sub/"),
        _file("opt/app/sub/deep", b"hidden too\n"),
        _dir("srv/"),
        _dir("srv/site/"),
        _file("srv/site/index.html", b"<p>removed with its directory</p>\n"),
    ]
    removals = [
        _dir("etc/"),
        _file("etc/.wh.remove.conf", b""),
        _file("etc/.wh.readd.conf", b""),
        _dir("opt/"),
        _dir("opt/app/"),
        _file("opt/app/.wh..wh..opq", b""),
        _file("opt/app/new", b"added beside the opaque marker\n"),
        _file(".wh.srv", b""),
    ]
    readd = [
        _dir("etc/"),
        _file("etc/readd.conf", b"version 2\n"),
    ]
    layers = [writer.add_layer(entries) for entries in (base, removals, readd)]
    writer.add_image(layers, ref_name=REF)


def _long_path() -> str:
    components = [f"{n:02d}-" + "x" * 80 for n in range(4)]
    return "long/" + "/".join(components) + "/file-at-the-end-of-a-long-path.txt"


def build_longnames(writer: OCILayoutWriter) -> None:
    """A PAX layer (path > 255, long link, unicode) and a GNU layer."""
    long_path = _long_path()
    parents = long_path.split("/")[:-1]
    pax = [_dir("/".join(parents[: n + 1]) + "/") for n in range(len(parents))]
    pax += [
        _file(long_path, b"reached through a PAX path record\n"),
        _symlink("long-symlink", long_path),
        _dir("unicode/"),
        _file("unicode/héllo wörld.txt", b"latin-1 letters\n"),
        _file("unicode/日本語.txt", b"CJK\n"),
        _file("unicode/emoji-🙂.txt", b"astral plane\n"),
        _dir("unicode/ñandú/"),
        _file("unicode/ñandú/ave.txt", b"in a unicode directory\n"),
    ]
    gnu_name = "gnu/" + "g" * 200
    gnu = [
        _dir("gnu/"),
        _file(gnu_name, b"reached through a GNU long name\n"),
        _symlink("gnu/long-symlink", "../" + gnu_name),
        _hardlink("gnu/long-hardlink", gnu_name),
        _file("gnu/ünïcödé-gnu.txt", b"utf-8 in a GNU header\n"),
    ]
    layers = [
        writer.add_layer(pax, tar_format="pax"),
        writer.add_layer(gnu, tar_format="gnu"),
    ]
    writer.add_image(layers, ref_name=REF)


def build_empty_layer(writer: OCILayoutWriter) -> None:
    """Three layers, the middle one an empty tar."""
    layers = [
        writer.add_layer([_file("before", b"first layer\n")]),
        writer.add_layer([]),
        writer.add_layer([_file("after", b"third layer\n")]),
    ]
    writer.add_image(layers, ref_name=REF)


def _text_files() -> list[TarEntry]:
    lines = b"".join(b"line %d of a compressible file\n" % n for n in range(2000))
    return [_dir("text/"), _file("text/lines", lines), _file("text/short", b"hi\n")]


def build_zstd(writer: OCILayoutWriter) -> None:
    """One zstd-compressed layer (``tar+zstd``)."""
    layer = writer.add_layer(_text_files(), compression="zstd")
    writer.add_image([layer], ref_name=REF)


def build_uncompressed(writer: OCILayoutWriter) -> None:
    """One plain tar layer: its digest is its diffID."""
    layer = writer.add_layer(_text_files(), compression="none")
    writer.add_image([layer], ref_name=REF)


MULTIARCH_PLATFORMS = (
    Platform("linux", "amd64"),
    Platform("linux", "arm64", "v8"),
    Platform("linux", "arm", "v7"),
)


def build_multiarch(writer: OCILayoutWriter) -> None:
    """A reference to a nested index of three platforms, contents differing."""
    manifests = []
    for platform in MULTIARCH_PLATFORMS:
        name = platform.architecture + (platform.variant or "")
        entries = [
            _dir("etc/"),
            _file("etc/platform", f"{platform.os}/{name}\n".encode()),
        ]
        layer = writer.add_layer(entries)
        manifests.append(writer.add_image([layer], platform=platform))
    writer.add_index(manifests, ref_name=REF)


def build_docker_v2s2(writer: OCILayoutWriter) -> None:
    """A Docker schema 2 manifest and config, with Docker media types."""
    layer = writer.add_layer([_dir("etc/"), _file("etc/origin", b"docker\n")])
    writer.add_image(
        [layer], config={"Cmd": ["/bin/sh"]}, manifest_format="docker", ref_name=REF
    )


def build_hostile(writer: OCILayoutWriter) -> None:
    """A layer whose entries try to escape the directory it is applied to."""
    entries = [
        _file("../escape", b"outside the root\n"),
        _file("/abs", b"absolute name\n"),
        _symlink("link", "/tmp"),
        _file("link/owned", b"written through a symlink\n"),
        _hardlink("hardlink", "../../etc/passwd"),
        _file("harmless", b"the only well-behaved entry\n"),
    ]
    writer.add_image([writer.add_layer(entries)], ref_name=REF)


def build_corrupt(writer: OCILayoutWriter) -> None:
    """An image whose layer blob no longer matches its digest (same size)."""
    layer = writer.add_layer([_file("payload", _pseudo_random(4096, seed=2))])
    writer.add_image([layer], ref_name=REF)
    blob = writer.blob_path(layer.digest)
    content = bytearray(blob.read_bytes())
    content[len(content) // 2] ^= 0xFF
    blob.write_bytes(bytes(content))


BIG_LAYERINFO_LAYERS = 400


def build_big_layerinfo(writer: OCILayoutWriter) -> None:
    """Enough tiny layers that GetLayerInfo's inline reply passes 32 KiB."""
    layers = [
        writer.add_layer([_file(f"layer-{n:03d}", b"%d\n" % n)])
        for n in range(BIG_LAYERINFO_LAYERS)
    ]
    writer.add_image(layers, ref_name=REF)


def manyfiles_entries(count: int, per_dir: int = 1000) -> Iterator[TarEntry]:
    """``count`` regular files spread over directories of ``per_dir``.

    Sizes cycle through 0, small, and every 97th file spans several blocks,
    so a layer exercises both inline and external splitfdstream chunks.
    """
    for n in range(count):
        if n % per_dir == 0:
            yield _dir(f"d{n // per_dir:04d}/")
        size = 4096 + n % 512 if n % 97 == 0 else n % 300
        content = (b"%d " % n * (size // 2 + 1))[:size]
        yield _file(f"d{n // per_dir:04d}/f{n:07d}", content)


def build_manyfiles(writer: OCILayoutWriter, count: int) -> None:
    """One gzip layer of ``count`` files, streamed through a temporary tar."""
    tar_path = writer.root / "manyfiles.tar.tmp"
    try:
        with open(tar_path, "wb") as out:
            write_tar(manyfiles_entries(count), out)
        layer = writer.add_layer_tar(tar_path, gzip_library="isal")
    finally:
        tar_path.unlink(missing_ok=True)
    writer.add_image([layer], ref_name=REF)


# The version is part of each image's stamp: bump it when a recipe changes.
SYNTHETIC_IMAGES: dict[str, tuple[int, Builder]] = {
    "basic": (1, build_basic),
    "whiteouts": (1, build_whiteouts),
    "longnames": (1, build_longnames),
    "empty-layer": (1, build_empty_layer),
    "zstd": (1, build_zstd),
    "uncompressed": (1, build_uncompressed),
    "multiarch": (1, build_multiarch),
    "docker-v2s2": (1, build_docker_v2s2),
    "hostile": (1, build_hostile),
    "corrupt": (1, build_corrupt),
    "big-layerinfo": (1, build_big_layerinfo),
}
MANYFILES_VERSION = 1


# --- building into a directory ------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    """An OCI layout on disk and the reference name to open it by."""

    name: str
    path: Path
    ref: str = REF

    @property
    def reference(self) -> str:
        """The image name for skopeo and the proxy: ``oci:PATH:REF``."""
        return f"oci:{self.path}:{self.ref}"


@dataclass(frozen=True)
class ImageSet:
    """The synthetic test images built under one directory."""

    root: Path

    def __getitem__(self, name: str) -> BuiltImage:
        path = self.root / name
        if not (path / "index.json").is_file():
            raise KeyError(f"test image {name!r} is not built under {self.root}")
        return BuiltImage(name, path)

    def path(self, name: str) -> Path:
        """The layout directory of the named image."""
        return self[name].path

    def names(self) -> list[str]:
        """The names of the synthetic images built here."""
        return [name for name in SYNTHETIC_IMAGES if (self.root / name).is_dir()]


@dataclass(frozen=True)
class DebianImage:
    """The Debian minbase image and the facts tests compare against."""

    path: Path
    ref: str
    layer_digest: str
    diff_id: str
    rootfs_tar: Path

    @property
    def reference(self) -> str:
        """The image name for skopeo and the proxy: ``oci:PATH:REF``."""
        return f"oci:{self.path}:{self.ref}"


class _Lock:
    """An exclusive ``flock`` on ``OUTDIR/.lock`` for the whole build."""

    def __init__(self, outdir: Path) -> None:
        outdir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(outdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        os.close(self._fd)


def _stamp_path(outdir: Path, name: str) -> Path:
    return outdir / ".stamps" / name


def _is_current(outdir: Path, name: str, version: str) -> bool:
    stamp = _stamp_path(outdir, name)
    return (outdir / name).is_dir() and stamp.is_file() and stamp.read_text() == version


def _publish(outdir: Path, name: str, version: str, build: Builder) -> None:
    """Build into a temporary sibling, then rename into place and stamp."""
    final, stamp = outdir / name, _stamp_path(outdir, name)
    stamp.parent.mkdir(exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=outdir))
    try:
        build(OCILayoutWriter(temp))
        stamp.unlink(missing_ok=True)
        if final.exists():
            shutil.rmtree(final)
        temp.rename(final)
    finally:
        if temp.exists():
            shutil.rmtree(temp)
    stamp_temp = stamp.with_suffix(".tmp")
    stamp_temp.write_text(version)
    stamp_temp.rename(stamp)


def _remove_leftovers(outdir: Path) -> None:
    # Only an interrupted run leaves these; the lock says no run is active.
    for leftover in outdir.glob(".tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


def describe_layout(path: Path) -> str:
    """A one-line summary of a layout: manifests, layers and blob bytes."""
    index = json.loads((path / "index.json").read_bytes())
    blob_dir = path / "blobs" / "sha256"
    manifests = layers = 0
    pending = list(index["manifests"])
    while pending:
        entry = pending.pop()
        doc = json.loads((blob_dir / entry["digest"].partition(":")[2]).read_bytes())
        if entry["mediaType"] in (OCI_INDEX, DOCKER_MANIFEST_LIST):
            pending.extend(doc["manifests"])
        else:
            manifests += 1
            layers += len(doc["layers"])
    total = sum(blob.stat().st_size for blob in blob_dir.iterdir())
    refs = [
        entry.get("annotations", {}).get("org.opencontainers.image.ref.name", "-")
        for entry in index["manifests"]
    ]
    return (
        f"{manifests} manifest(s), {layers} layer(s), {total / 1024:.1f} KiB "
        f"of blobs, ref {','.join(refs)}"
    )


def build_synthetic(
    outdir: Path,
    *,
    only: set[str] | None = None,
    many: int | None = None,
    report: Callable[[str], None] = print,
) -> ImageSet:
    """Build the synthetic images (and ``manyfiles`` when ``many`` is given)."""
    lock = _Lock(outdir)
    try:
        _remove_leftovers(outdir)
        for name, (version, build) in SYNTHETIC_IMAGES.items():
            if only is not None and name not in only:
                continue
            _build_one(outdir, name, str(version), build, report)
        if many is not None:

            def build(writer: OCILayoutWriter) -> None:
                build_manyfiles(writer, many)

            stamp = f"{MANYFILES_VERSION} files={many}"
            _build_one(outdir, "manyfiles", stamp, build, report)
    finally:
        lock.release()
    return ImageSet(outdir)


def _build_one(
    outdir: Path,
    name: str,
    version: str,
    build: Builder,
    report: Callable[[str], None],
) -> None:
    state = "cached"
    if not _is_current(outdir, name, version):
        started = time.monotonic()
        _publish(outdir, name, version, build)
        state = f"built in {time.monotonic() - started:.2f}s"
    report(f"{name}: {describe_layout(outdir / name)} ({state})")


# --- the Debian image -------------------------------------------------------

DEBIAN_VERSION = 1


def _debian_platform() -> Platform:
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return platform_for_machine(arch)


def _run_mmdebstrap(cache: Path, report: Callable[[str], None]) -> dict[str, Any]:
    """Create the rootfs tar in the cache and return its recorded facts."""
    rootfs = cache / f"{DEBIAN_SUITE}-minbase.tar"
    temp = cache / f".tmp-{DEBIAN_SUITE}-minbase-{os.getpid()}.tar"
    mode = "root" if os.geteuid() == 0 else "unshare"
    command = [
        "mmdebstrap",
        "--variant=minbase",
        f"--mode={mode}",
        "--quiet",
        DEBIAN_SUITE,
        str(temp),
    ]
    report(f"debian: running {' '.join(command)}")
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(FIXED_MTIME)}
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"mmdebstrap failed with status {result.returncode} "
                f"(is Debian's package mirror reachable through apt?):\n"
                f"{result.stderr[-4000:]}"
            )
        seconds = time.monotonic() - started
        facts = _tar_facts(temp)
        facts["mmdebstrap_seconds"] = round(seconds, 1)
        facts["mode"] = mode
        temp.rename(rootfs)
    finally:
        temp.unlink(missing_ok=True)
    (cache / f"{DEBIAN_SUITE}-minbase.json").write_text(json.dumps(facts, indent=1))
    return facts


def _tar_facts(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    with tarfile.open(path, "r:") as archive:
        entries = sum(1 for _ in archive)
    return {
        "sha256": f"sha256:{digest.hexdigest()}",
        "size": path.stat().st_size,
        "entries": entries,
    }


def build_debian(outdir: Path, report: Callable[[str], None] = print) -> DebianImage:
    """Build (or reuse) the Debian minbase layout ``OUTDIR/debian``.

    :raises FileNotFoundError: when mmdebstrap is not installed.
    :raises RuntimeError: when mmdebstrap fails.
    """
    if shutil.which("mmdebstrap") is None:
        raise FileNotFoundError("mmdebstrap is not installed (apt-get install it)")
    lock = _Lock(outdir)
    try:
        _remove_leftovers(outdir)
        cache = outdir / "cache"
        cache.mkdir(exist_ok=True)
        _remove_cache_leftovers(cache)
        rootfs = cache / f"{DEBIAN_SUITE}-minbase.tar"
        facts_path = cache / f"{DEBIAN_SUITE}-minbase.json"
        if rootfs.is_file() and facts_path.is_file():
            facts = json.loads(facts_path.read_text())
        else:
            facts = _run_mmdebstrap(cache, report)
        platform = _debian_platform()
        version = f"{DEBIAN_VERSION} {facts['sha256']} {platform.architecture}"
        state = "cached"
        if not _is_current(outdir, "debian", version):

            def build(writer: OCILayoutWriter) -> None:
                layer = writer.add_layer_tar(rootfs, gzip_library="isal")
                writer.add_image(
                    [layer],
                    platform=platform,
                    config={"Cmd": ["bash"]},
                    history=[
                        {"created_by": f"mmdebstrap --variant=minbase {DEBIAN_SUITE}"}
                    ],
                    ref_name=DEBIAN_REF,
                )

            started = time.monotonic()
            _publish(outdir, "debian", version, build)
            state = f"built in {time.monotonic() - started:.2f}s"
    finally:
        lock.release()
    image = read_debian_image(outdir)
    compressed = (image.path / "blobs" / "sha256" / image.layer_digest[7:]).stat()
    report(
        f"debian: {facts['entries']} entries, tar {facts['size'] / 2**20:.1f} MiB, "
        f"gzip {compressed.st_size / 2**20:.1f} MiB, mmdebstrap took "
        f"{facts['mmdebstrap_seconds']}s, layer {image.layer_digest}, "
        f"ref {DEBIAN_REF} ({state})"
    )
    return image


def _remove_cache_leftovers(cache: Path) -> None:
    for leftover in cache.glob(".tmp-*"):
        leftover.unlink()


def read_debian_image(outdir: Path) -> DebianImage:
    """The facts of an already built Debian layout, read from its blobs."""
    path = outdir / "debian"
    blob_dir = path / "blobs" / "sha256"
    index = json.loads((path / "index.json").read_bytes())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((blob_dir / manifest_digest[7:]).read_bytes())
    config = json.loads((blob_dir / manifest["config"]["digest"][7:]).read_bytes())
    return DebianImage(
        path=path,
        ref=DEBIAN_REF,
        layer_digest=manifest["layers"][0]["digest"],
        diff_id=config["rootfs"]["diff_ids"][0],
        rootfs_tar=outdir / "cache" / f"{DEBIAN_SUITE}-minbase.tar",
    )
