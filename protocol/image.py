"""The image model: digests, descriptors, manifests, indexes and configs.

Manifests are parsed into msgspec Structs for reading, but the bytes a source
stored are always kept: a manifest's digest is the sha256 of those bytes, and
re-serialising would change it. The only place we serialise image documents
ourselves is where the legacy protocol converts to OCI; there the output
mirrors what containers/image (Go) produces, field order included, because
legacy clients hash and compare what they receive.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Sequence
from typing import Any

import msgspec

from protocol.errors import ClientError, SourceError, UnsupportedError

# OCI media types (image-spec v1.1).
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

# Docker media types (image manifest v2, schema 2 and the legacy schema 1).
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MULTI_IMAGE_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
SINGLE_IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

# How the legacy protocol renames Docker layer types when it converts to OCI.
_DOCKER_TO_OCI_LAYER = {
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER: OCI_LAYER,
    DOCKER_FOREIGN_LAYER: OCI_LAYER_NONDIST,
    DOCKER_FOREIGN_LAYER_GZIP: OCI_LAYER_NONDIST_GZIP,
}

GZIP_LAYER_TYPES = frozenset(
    {OCI_LAYER_GZIP, OCI_LAYER_NONDIST_GZIP, DOCKER_LAYER_GZIP}
)
ZSTD_LAYER_TYPES = frozenset({OCI_LAYER_ZSTD, OCI_LAYER_NONDIST_ZSTD})
PLAIN_LAYER_TYPES = frozenset({OCI_LAYER, OCI_LAYER_NONDIST, DOCKER_LAYER})

_DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_HEX_RE = re.compile(r"^[a-f0-9]+$")


class Digest(str):
    """A validated content digest, ``algorithm:hex``.

    Validation follows the OCI spec and go-digest so that a digest we accept
    is one skopeo would accept, and the error texts match its wording.
    """

    __slots__ = ()

    def __new__(cls, text: str) -> Digest:
        # The texts are go-digest's, without the value, as skopeo sends them.
        if not _DIGEST_RE.match(text):
            raise ClientError("invalid checksum digest format")
        algorithm, hexpart = text.split(":", 1)
        expected_length = _DIGEST_HEX_LENGTH.get(algorithm)
        if expected_length is None:
            raise ClientError("unsupported digest algorithm")
        if len(hexpart) != expected_length:
            raise ClientError("invalid checksum digest length")
        if not _HEX_RE.match(hexpart):
            raise ClientError("invalid checksum digest format")
        return super().__new__(cls, text)

    @property
    def algorithm(self) -> str:
        return self.split(":", 1)[0]

    @property
    def hex(self) -> str:
        return self.split(":", 1)[1]

    def hasher(self) -> Any:
        """A fresh hashlib object for this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` hashes to this digest."""
        hasher = self.hasher()
        hasher.update(data)
        return bool(hasher.hexdigest() == self.hex)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        """The sha256 digest of ``data``."""
        return cls("sha256:" + hashlib.sha256(data).hexdigest())


class Platform(
    msgspec.Struct,
    omit_defaults=True,
    rename={"os_version": "os.version", "os_features": "os.features"},
):
    architecture: str = ""
    os: str = ""
    os_version: str = ""
    os_features: list[str] = msgspec.field(default_factory=list)
    variant: str = ""


class Descriptor(msgspec.Struct, omit_defaults=True, rename="camel"):
    media_type: str = ""
    digest: str = ""
    size: int = 0
    urls: list[str] = msgspec.field(default_factory=list)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)
    data: str = ""
    platform: Platform | None = None
    artifact_type: str = ""


class Manifest(msgspec.Struct, rename="camel"):
    """An image manifest, OCI or Docker schema 2 (the two share a shape)."""

    schema_version: int = 0
    media_type: str = ""
    config: Descriptor = msgspec.field(default_factory=Descriptor)
    layers: list[Descriptor] = msgspec.field(default_factory=list)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)


class Index(msgspec.Struct, rename="camel"):
    """An OCI index or a Docker manifest list."""

    schema_version: int = 0
    media_type: str = ""
    manifests: list[Descriptor] = msgspec.field(default_factory=list)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)


def guess_media_type(raw: bytes) -> str:
    """The media type of a manifest whose container did not say.

    Follows the rules of containers/image: an explicit ``mediaType`` wins,
    then the shape (``manifests`` means an index, ``config`` a manifest,
    ``signatures``/``fsLayers`` schema 1).
    """
    try:
        probe = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise SourceError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(probe, dict):
        raise SourceError("manifest is not a JSON object")
    media_type = probe.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    if probe.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in probe else DOCKER_SCHEMA1
    if "manifests" in probe:
        return OCI_INDEX
    if "config" in probe:
        return OCI_MANIFEST
    raise SourceError("cannot tell the manifest's media type")


def parse_manifest(raw: bytes) -> Manifest:
    try:
        return msgspec.json.decode(raw, type=Manifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SourceError(f"malformed image manifest: {exc}") from None


def parse_index(raw: bytes) -> Index:
    try:
        return msgspec.json.decode(raw, type=Index)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SourceError(f"malformed image index: {exc}") from None


def check_single_image_type(media_type: str) -> None:
    """Refuse manifests the legacy protocol cannot serve, as skopeo words it."""
    if media_type in SINGLE_IMAGE_TYPES:
        return
    if media_type in SCHEMA1_TYPES:
        raise UnsupportedError(f"unsupported legacy manifest MIME type: {media_type}")
    raise UnsupportedError(f"unsupported manifest MIME type: {media_type}")


# -- platform choice ---------------------------------------------------------

# Variants an architecture can run, best first, as containers/image ranks them.
_COMPATIBLE_VARIANTS = {
    "arm64": ["v8", ""],
    "arm": ["v7", "v6", "v5", ""],
    "amd64": ["", "v1"],
}


class PlatformWanted(msgspec.Struct, frozen=True):
    """The platform an instance is chosen for: this machine's by default."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def of_machine(cls) -> PlatformWanted:
        import platform as _platform

        machine = _platform.machine().lower()
        architecture = {
            "x86_64": "amd64",
            "aarch64": "arm64",
            "arm64": "arm64",
            "armv7l": "arm",
            "armv6l": "arm",
            "ppc64le": "ppc64le",
            "s390x": "s390x",
            "riscv64": "riscv64",
            "i686": "386",
        }.get(machine, machine)
        variant = {"armv7l": "v7", "armv6l": "v6"}.get(machine, "")
        return cls(os="linux", architecture=architecture, variant=variant)

    def ranked_variants(self) -> list[str]:
        if self.variant:
            known = _COMPATIBLE_VARIANTS.get(self.architecture, [""])
            if self.variant in known:
                return known[known.index(self.variant) :]
            return [self.variant, ""]
        return _COMPATIBLE_VARIANTS.get(self.architecture, [""])


def choose_instance(index: Index, wanted: PlatformWanted) -> Descriptor:
    """Pick the manifest in ``index`` that runs on ``wanted``.

    Among entries for the right OS and architecture the best-ranked variant
    wins; ties go to the earlier entry, as in containers/image.
    """
    variants = wanted.ranked_variants()
    best: tuple[int, int] | None = None
    chosen: Descriptor | None = None
    for position, entry in enumerate(index.manifests):
        platform = entry.platform
        if platform is None or platform.os != wanted.os:
            continue
        if platform.architecture != wanted.architecture:
            continue
        if platform.variant not in variants:
            continue
        rank = (variants.index(platform.variant), position)
        if best is None or rank < best:
            best, chosen = rank, entry
    if chosen is None:
        raise SourceError(
            "no image found in image index for architecture "
            f'"{wanted.architecture}", variant "{wanted.variant}", '
            f'OS "{wanted.os}"'
        )
    return chosen


# -- the OCI config as containers/image re-serialises it ---------------------


class _History(msgspec.Struct, omit_defaults=True):
    created: str | None = None
    created_by: str = ""
    author: str = ""
    comment: str = ""
    empty_layer: bool = False


class _RootFS(msgspec.Struct):
    type: str = ""
    diff_ids: list[str] | None = None


class _RuntimeConfig(msgspec.Struct, omit_defaults=True):
    User: str = ""
    ExposedPorts: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    Env: list[str] = msgspec.field(default_factory=list)
    Entrypoint: list[str] = msgspec.field(default_factory=list)
    Cmd: list[str] = msgspec.field(default_factory=list)
    Volumes: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    WorkingDir: str = ""
    Labels: dict[str, str] = msgspec.field(default_factory=dict)
    StopSignal: str = ""
    ArgsEscaped: bool = False


class _ImageConfigHead(
    msgspec.Struct,
    omit_defaults=True,
    rename={"os_version": "os.version", "os_features": "os.features"},
):
    created: str | None = None
    author: str = ""
    # Go emits these two even when empty.
    architecture: str = msgspec.field(default="")
    os: str = msgspec.field(default="")
    os_version: str = ""
    os_features: list[str] = msgspec.field(default_factory=list)
    variant: str = ""


class OCIConfigView(msgspec.Struct):
    """The fields of an OCI image config that containers/image keeps."""

    head: _ImageConfigHead
    config: _RuntimeConfig
    rootfs: _RootFS
    history: list[_History]


def _normalise_time(text: str | None) -> str | None:
    """Re-format an RFC 3339 time the way Go's time.Time marshals it."""
    if text is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SourceError(f"image config has a malformed time: {text!r}") from None
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = ""
    if moment.microsecond:
        fraction = ("." + f"{moment.microsecond:06d}").rstrip("0")
    # Python keeps microseconds only; Go keeps nanoseconds. Copy any extra
    # digits the source gave so a 9-digit fraction survives unchanged.
    match = re.search(r"\.(\d+)", text)
    if match and len(match.group(1)) > 6:
        fraction = ("." + match.group(1)).rstrip("0")
        if fraction == ".":
            fraction = ""
    offset = moment.utcoffset()
    if offset is None or offset == datetime.timedelta(0):
        zone = "Z"
    else:
        minutes = int(offset.total_seconds() // 60)
        sign = "+" if minutes >= 0 else "-"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return base + fraction + zone


def parse_oci_config(raw: bytes) -> OCIConfigView:
    """Read an OCI or Docker image config, keeping what OCI defines."""
    try:
        document = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise SourceError(f"image config is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SourceError("image config is not a JSON object")
    try:
        head = msgspec.convert(document, _ImageConfigHead)
        runtime = msgspec.convert(document.get("config") or {}, _RuntimeConfig)
        rootfs = msgspec.convert(document.get("rootfs") or {}, _RootFS)
        history = msgspec.convert(document.get("history") or [], list[_History])
    except msgspec.ValidationError as exc:
        raise SourceError(f"malformed image config: {exc}") from None
    head.created = _normalise_time(head.created)
    for entry in history:
        entry.created = _normalise_time(entry.created)
    return OCIConfigView(head=head, config=runtime, rootfs=rootfs, history=history)


def _encode_str_subclass(value: Any) -> Any:
    # msgspec encodes exact str only; Digest is a str subclass.
    if isinstance(value, str):
        return str(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


# Go sorts map keys and keeps struct fields in declaration order; msgspec's
# "deterministic" order does the same for dicts and Structs, so every object
# whose field order matters is a Struct here.
_encoder = msgspec.json.Encoder(enc_hook=_encode_str_subclass, order="deterministic")


def go_json(value: Any) -> bytes:
    """Encode like Go's encoding/json: compact, HTML characters escaped."""
    encoded = _encoder.encode(value)
    # These characters only ever appear inside JSON strings, so replacing
    # them byte-wise cannot touch the document's structure.
    return (
        encoded.replace(b"<", b"\\u003c")
        .replace(b">", b"\\u003e")
        .replace(b"&", b"\\u0026")
        .replace("\u2028".encode(), b"\\u2028")
        .replace("\u2029".encode(), b"\\u2029")
    )


class _FullConfigOut(
    msgspec.Struct,
    omit_defaults=True,
    rename={"os_version": "os.version", "os_features": "os.features"},
):
    """image-spec's v1.Image in Go's field order (Platform is embedded)."""

    architecture: str
    os: str
    config: _RuntimeConfig
    rootfs: _RootFS
    created: str | None = None
    author: str = ""
    os_version: str = ""
    os_features: list[str] = msgspec.field(default_factory=list)
    variant: str = ""
    history: list[_History] = msgspec.field(default_factory=list)


# Declaration order above is for the required-first rule of Python; this is
# the order Go writes the fields in.
_FULL_CONFIG_ORDER = (
    "created",
    "author",
    "architecture",
    "os",
    "os.version",
    "os.features",
    "variant",
    "config",
    "rootfs",
    "history",
)


def serialise_full_config(view: OCIConfigView) -> bytes:
    """The full OCI config as containers/image marshals ``v1.Image``."""
    head = view.head
    document = _FullConfigOut(
        architecture=head.architecture,
        os=head.os,
        config=view.config,
        rootfs=view.rootfs,
        created=head.created,
        author=head.author,
        os_version=head.os_version,
        os_features=head.os_features,
        variant=head.variant,
        history=view.history,
    )
    fields = msgspec.json.decode(go_json(document), type=dict[str, msgspec.Raw])
    parts = [
        go_json(key) + b":" + bytes(fields[key])
        for key in _FULL_CONFIG_ORDER
        if key in fields
    ]
    return b"{" + b",".join(parts) + b"}"


def serialise_runtime_config(view: OCIConfigView) -> bytes:
    """Only the ``config`` object, as the historical GetConfig returns it."""
    return go_json(view.config)


def docker_to_oci_manifest(manifest: Manifest, oci_config: bytes) -> bytes:
    """Convert a Docker schema 2 manifest to OCI as containers/image does.

    The config descriptor then names ``oci_config`` (the converted config),
    which the source itself may not hold; layers keep digest, size and URLs
    with their media types renamed.
    """
    layers = []
    for layer in manifest.layers:
        oci_type = _DOCKER_TO_OCI_LAYER.get(layer.media_type)
        if oci_type is None:
            raise UnsupportedError(
                f'Unknown media type during manifest conversion: "{layer.media_type}"'
            )
        layers.append(
            Descriptor(
                media_type=oci_type,
                digest=layer.digest,
                size=layer.size,
                urls=layer.urls,
            )
        )
    config = Descriptor(
        media_type=OCI_CONFIG, digest=str(Digest.of(oci_config)), size=len(oci_config)
    )
    return go_json(
        _ManifestOut(
            schema_version=2,
            media_type=OCI_MANIFEST,
            config=config,
            layers=layers,
            annotations=manifest.annotations,
        )
    )


class _ManifestOut(msgspec.Struct, rename="camel", omit_defaults=True):
    """image-spec's v1.Manifest in Go's field order."""

    schema_version: int
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = msgspec.field(default_factory=dict)


def layer_compression(media_type: str) -> str:
    """``gzip``, ``zstd`` or ``none`` for a layer media type."""
    if media_type in GZIP_LAYER_TYPES:
        return "gzip"
    if media_type in ZSTD_LAYER_TYPES:
        return "zstd"
    if media_type in PLAIN_LAYER_TYPES:
        return "none"
    raise UnsupportedError(f"unsupported layer media type: {media_type}")


def diff_ids_of(view: OCIConfigView, layers: Sequence[Descriptor]) -> list[str]:
    """The diffIDs of ``layers``, which must match the config's rootfs."""
    diff_ids = view.rootfs.diff_ids or []
    if len(diff_ids) != len(layers):
        raise SourceError(
            f"image config lists {len(diff_ids)} diffIDs for {len(layers)} layers"
        )
    return list(diff_ids)
