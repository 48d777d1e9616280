"""Write OCI image layouts: blobs, layers, configs, manifests and indexes.

The project builds its own test and demo images with this module instead of a
container tool, so that every byte of a layer is chosen by the test that needs
it (hostile names, whiteouts, PAX and GNU headers, empty tars).

Strategy: every blob is streamed once through hashlib into a temporary file
inside the layout's ``blobs/sha256`` and renamed to its digest, so memory stays
bounded by the copy buffer (except for :func:`build_tar`, which returns bytes
by design) and an interrupted write never leaves a blob under a digest it does
not match. A layer's diffID is the sha256 of the uncompressed tar, hashed on
the way into the compressor. ``index.json`` is rewritten atomically after each
image or index added with a reference name. Nothing is written outside the
layout directory; the only input read from elsewhere is a tar file the caller
names.

Output is deterministic for the same input and the same compression library:
tar headers carry the caller's mtimes, gzip headers carry mtime 0, JSON is
compact with keys in a fixed order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform as host_platform
import tarfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import zstandard

OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

# 2023-11-14T22:13:20Z: a fixed instant so that images built twice are equal.
FIXED_MTIME = 1_700_000_000
FIXED_CREATED = "2023-11-14T22:13:20Z"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Compression = Literal["gzip", "zstd", "none"]
GzipLibrary = Literal["zlib", "isal"]
TarFormat = Literal["pax", "gnu", "ustar"]
ManifestFormat = Literal["oci", "docker"]
EntryType = Literal["file", "dir", "symlink", "hardlink", "fifo", "char", "block"]

_COPY_CHUNK = 1 << 20
_TAR_FORMATS = {
    "pax": tarfile.PAX_FORMAT,
    "gnu": tarfile.GNU_FORMAT,
    "ustar": tarfile.USTAR_FORMAT,
}
_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
}
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}
_LAYER_MEDIA_TYPES: dict[tuple[ManifestFormat, Compression], str] = {
    ("oci", "gzip"): OCI_LAYER_GZIP,
    ("oci", "zstd"): OCI_LAYER_ZSTD,
    ("oci", "none"): OCI_LAYER,
    ("docker", "gzip"): DOCKER_LAYER_GZIP,
    ("docker", "none"): DOCKER_LAYER,
}


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


@dataclass(frozen=True)
class Platform:
    """The OS and CPU an image runs on, with Go's architecture names."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    def to_json(self) -> dict[str, str]:
        """The ``platform`` object of an index entry."""
        doc = {"architecture": self.architecture, "os": self.os}
        if self.variant is not None:
            doc["variant"] = self.variant
        return doc


_MACHINE_PLATFORMS = {
    "x86_64": Platform(architecture="amd64"),
    "amd64": Platform(architecture="amd64"),
    "aarch64": Platform(architecture="arm64", variant="v8"),
    "arm64": Platform(architecture="arm64", variant="v8"),
    "armv7l": Platform(architecture="arm", variant="v7"),
    "armhf": Platform(architecture="arm", variant="v7"),
    "armv6l": Platform(architecture="arm", variant="v6"),
    "armel": Platform(architecture="arm", variant="v6"),
    "i386": Platform(architecture="386"),
    "i686": Platform(architecture="386"),
    "ppc64le": Platform(architecture="ppc64le"),
    "ppc64el": Platform(architecture="ppc64le"),
    "s390x": Platform(architecture="s390x"),
    "riscv64": Platform(architecture="riscv64"),
}


def platform_for_machine(machine: str | None = None) -> Platform:
    """Map a kernel or Debian architecture name to Go's names.

    :param machine: ``uname -m`` or ``dpkg --print-architecture`` output;
        this host's machine when omitted.
    :raises ValueError: for an architecture this table does not know.
    """
    name = machine if machine is not None else host_platform.machine()
    try:
        return _MACHINE_PLATFORMS[name]
    except KeyError:
        raise ValueError(f"no Go architecture name known for {name!r}") from None


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest or index says about a blob."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The descriptor as the OCI spec spells it."""
        doc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            doc["platform"] = self.platform.to_json()
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc

    @property
    def hex(self) -> str:
        """The digest without its ``sha256:`` prefix."""
        return self.digest.partition(":")[2]


@dataclass(frozen=True)
class Layer:
    """A layer blob written to the layout, with its diffID.

    The media type depends on the manifest that lists the layer, so it is
    chosen by :meth:`OCILayoutWriter.add_image`, not stored here.
    """

    digest: str
    size: int
    diff_id: str
    compression: Compression
    uncompressed_size: int

    def media_type(self, manifest_format: ManifestFormat = "oci") -> str:
        """The layer's media type in a manifest of the given format."""
        try:
            return _LAYER_MEDIA_TYPES[(manifest_format, self.compression)]
        except KeyError:
            raise ValueError(
                f"a {manifest_format} manifest has no media type for "
                f"{self.compression} layers (layer {self.digest})"
            ) from None


@dataclass(frozen=True)
class TarEntry:
    """One member of a layer tar, described field by field.

    ``mode`` defaults to 0o755 for directories, 0o777 for symlinks and 0o644
    otherwise. ``xattrs`` are written as ``SCHILY.xattr.NAME`` PAX records, so
    they only survive in the PAX format. ``pax_headers`` adds raw PAX records.
    """

    name: str
    type: EntryType = "file"
    content: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = FIXED_MTIME
    linkname: str = ""
    xattrs: Mapping[str, str] = field(default_factory=dict)
    uname: str = ""
    gname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax_headers: Mapping[str, str] = field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        """The ``tarfile`` header for this entry (names kept verbatim)."""
        info = tarfile.TarInfo(self.name)
        info.type = _TAR_TYPES[self.type]
        info.size = len(self.content) if self.type == "file" else 0
        info.mode = self.mode if self.mode is not None else self._default_mode()
        info.uid, info.gid = self.uid, self.gid
        info.uname, info.gname = self.uname, self.gname
        info.mtime = self.mtime
        info.linkname = self.linkname
        info.devmajor, info.devminor = self.devmajor, self.devminor
        records = {f"SCHILY.xattr.{k}": v for k, v in self.xattrs.items()}
        records.update(self.pax_headers)
        info.pax_headers = records
        return info

    def _default_mode(self) -> int:
        return _DEFAULT_MODES.get(self.type, 0o644)


def write_tar(
    entries: Iterable[TarEntry], out: IO[bytes], tar_format: TarFormat = "pax"
) -> None:
    """Serialise entries as a tar archive with Python's ``tarfile``.

    Names are written as given: ``../x`` and ``/abs`` stay as they are, which
    is what hostile test layers need. The archive ends with tarfile's usual
    two zero blocks padded to a 10 KiB record.
    """
    with tarfile.open(
        fileobj=out, mode="w", format=_TAR_FORMATS[tar_format], encoding="utf-8"
    ) as archive:
        for entry in entries:
            content = io.BytesIO(entry.content) if entry.type == "file" else None
            archive.addfile(entry.tarinfo(), content)


def build_tar(entries: Iterable[TarEntry], tar_format: TarFormat = "pax") -> bytes:
    """The tar archive of the entries, in memory (see :func:`write_tar`)."""
    buffer = io.BytesIO()
    write_tar(entries, buffer, tar_format)
    return buffer.getvalue()


def _compressor(
    compression: Compression, gzip_library: GzipLibrary, level: int | None
) -> _Compressor:
    if compression == "none":
        return _Identity()
    if compression == "zstd":
        zstd_level = 3 if level is None else level
        chunker: _Compressor = zstandard.ZstdCompressor(level=zstd_level).compressobj()
        return chunker
    # wbits 31 selects the gzip container; both libraries write mtime 0 there.
    if gzip_library == "isal":
        from isal import isal_zlib

        isal_level = 1 if level is None else level
        isal_chunker: _Compressor = isal_zlib.compressobj(
            isal_level, isal_zlib.DEFLATED, 31
        )
        return isal_chunker
    return zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)


def _canonical_json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


class OCILayoutWriter:
    """Builds an OCI image layout directory (``oci-layout``, ``index.json``,
    ``blobs/sha256``).

    An existing layout at ``root`` is extended: its ``index.json`` entries are
    kept and new ones appended.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_bytes(
            _canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})
        )
        self._index_entries: list[dict[str, Any]] = []
        index_path = self.root / "index.json"
        if index_path.exists():
            self._index_entries = list(json.loads(index_path.read_bytes())["manifests"])
        self._write_index()

    def blob_path(self, digest: str) -> Path:
        """Where the blob with this ``sha256:`` digest lives in the layout."""
        algorithm, _, hex_digest = digest.partition(":")
        if algorithm != "sha256" or len(hex_digest) != 64:
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.blob_dir / hex_digest

    def add_blob(
        self, data: bytes | Path, media_type: str = "application/octet-stream"
    ) -> Descriptor:
        """Store bytes, or a copy of a file's content, as a blob.

        :returns: the blob's descriptor with the given media type.
        """
        source: IO[bytes]
        with (
            io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")
        ) as source:
            digest, size, _, _ = self._store(source, _Identity())
        return Descriptor(media_type, digest, size)

    def add_layer(
        self,
        entries: Iterable[TarEntry],
        *,
        tar_format: TarFormat = "pax",
        compression: Compression = "gzip",
        gzip_library: GzipLibrary = "zlib",
        level: int | None = None,
    ) -> Layer:
        """Build a tar from entries, compress it and store it as a layer."""
        return self.add_layer_tar(
            build_tar(entries, tar_format),
            compression=compression,
            gzip_library=gzip_library,
            level=level,
        )

    def add_layer_tar(
        self,
        tar: bytes | Path,
        *,
        compression: Compression = "gzip",
        gzip_library: GzipLibrary = "zlib",
        level: int | None = None,
    ) -> Layer:
        """Compress an existing tar, byte for byte, and store it as a layer.

        The tar is not re-serialised, so its sha256 is the layer's diffID.
        ``level`` defaults to 6 for zlib, 1 for isal (its range is 0-3) and
        3 for zstd.
        """
        chunker = _compressor(compression, gzip_library, level)
        source: IO[bytes]
        with io.BytesIO(tar) if isinstance(tar, bytes) else open(tar, "rb") as source:
            digest, size, diff_id, tar_size = self._store(source, chunker)
        return Layer(digest, size, diff_id, compression, tar_size)

    def add_image(
        self,
        layers: Sequence[Layer],
        *,
        platform: Platform | None = None,
        config: Mapping[str, Any] | None = None,
        history: Sequence[Mapping[str, Any]] | None = None,
        created: str = FIXED_CREATED,
        ref_name: str | None = None,
        annotations: Mapping[str, str] | None = None,
        manifest_format: ManifestFormat = "oci",
    ) -> Descriptor:
        """Write an image config and manifest for the layers.

        :param config: fields of the config's ``config`` object (``Env``,
            ``Cmd``, ``WorkingDir``...); ``Env`` defaults to a standard PATH.
        :param history: one entry per layer by default, each naming the layer.
        :param ref_name: when given, the manifest is listed in ``index.json``
            under this ``org.opencontainers.image.ref.name``.
        :param annotations: the manifest's own annotations (OCI only).
        :returns: the manifest's descriptor, carrying the platform, ready to
            be listed in an index.
        """
        platform = platform if platform is not None else Platform()
        config_desc = self._write_config(
            layers, platform, config, history, created, manifest_format
        )
        docker = manifest_format == "docker"
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [
                Descriptor(
                    layer.media_type(manifest_format), layer.digest, layer.size
                ).to_json()
                for layer in layers
            ],
        }
        if annotations and not docker:
            manifest["annotations"] = dict(annotations)
        stored = self.add_blob(_canonical_json(manifest), manifest["mediaType"])
        descriptor = Descriptor(stored.media_type, stored.digest, stored.size, platform)
        if ref_name is not None:
            self.tag(descriptor, ref_name)
        return descriptor

    def add_index(
        self,
        manifests: Sequence[Descriptor],
        *,
        ref_name: str | None = None,
        annotations: Mapping[str, str] | None = None,
        media_type: str = OCI_INDEX,
    ) -> Descriptor:
        """Write a nested index (or Docker manifest list) over manifests.

        :param manifests: descriptors from :meth:`add_image`; their platforms
            are listed, which is what platform choice reads.
        :param ref_name: when given, the index is listed in ``index.json``
            under this reference name.
        """
        index: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [descriptor.to_json() for descriptor in manifests],
        }
        if annotations:
            index["annotations"] = dict(annotations)
        descriptor = self.add_blob(_canonical_json(index), media_type)
        if ref_name is not None:
            self.tag(descriptor, ref_name)
        return descriptor

    def tag(self, descriptor: Descriptor, ref_name: str) -> None:
        """List a manifest or index in ``index.json`` under a reference name.

        The entry keeps the descriptor's platform, as image tools do.
        """
        annotations = {**(descriptor.annotations or {}), REF_NAME_ANNOTATION: ref_name}
        entry = Descriptor(
            descriptor.media_type,
            descriptor.digest,
            descriptor.size,
            descriptor.platform,
            annotations,
        )
        self._index_entries.append(entry.to_json())
        self._write_index()

    def _write_config(
        self,
        layers: Sequence[Layer],
        platform: Platform,
        config: Mapping[str, Any] | None,
        history: Sequence[Mapping[str, Any]] | None,
        created: str,
        manifest_format: ManifestFormat,
    ) -> Descriptor:
        container_config: dict[str, Any] = {"Env": [DEFAULT_PATH_ENV]}
        container_config.update(config or {})
        if history is None:
            history = [
                {"created": created, "created_by": f"layer {n} ({layer.digest})"}
                for n, layer in enumerate(layers)
            ]
        doc: dict[str, Any] = {"created": created, **platform.to_json()}
        doc["config"] = container_config
        doc["rootfs"] = {
            "type": "layers",
            "diff_ids": [layer.diff_id for layer in layers],
        }
        doc["history"] = [dict(item) for item in history]
        media_type = DOCKER_CONFIG if manifest_format == "docker" else OCI_CONFIG
        return self.add_blob(_canonical_json(doc), media_type)

    def _store(
        self, source: IO[bytes], chunker: _Compressor
    ) -> tuple[str, int, str, int]:
        """Stream source through the compressor into a blob.

        :returns: stored digest, stored size, sha256 of the input, input size.
        """
        input_hash, stored_hash = hashlib.sha256(), hashlib.sha256()
        input_size = stored_size = 0
        temp = self.blob_dir / f".tmp-{os.getpid()}-{id(source)}"
        try:
            with open(temp, "wb") as out:
                while chunk := source.read(_COPY_CHUNK):
                    input_hash.update(chunk)
                    input_size += len(chunk)
                    stored = chunker.compress(chunk)
                    stored_hash.update(stored)
                    stored_size += len(stored)
                    out.write(stored)
                tail = chunker.flush()
                stored_hash.update(tail)
                stored_size += len(tail)
                out.write(tail)
            digest = f"sha256:{stored_hash.hexdigest()}"
            os.replace(temp, self.blob_path(digest))
        finally:
            temp.unlink(missing_ok=True)
        return digest, stored_size, f"sha256:{input_hash.hexdigest()}", input_size

    def _write_index(self) -> None:
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": self._index_entries,
        }
        temp = self.root / "index.json.tmp"
        temp.write_bytes(_canonical_json(index))
        os.replace(temp, self.root / "index.json")
