"""Archives and directories of the test images, made by skopeo or by hand.

skopeo (Debian's 1.9) makes what it can: ``docker-archive:`` (one image,
uncompressed layers under ``<id>/layer.tar`` symlinks), ``oci-archive:`` and
``dir:`` in both manifest formats. What it cannot make is built here with
``tarfile`` from an OCI layout's files, read with ``json`` only: a
``docker save`` archive holding several images, one whose layers stay gzip
compressed (named ``blobs/sha256/<hex>`` as Docker 25 names them), one whose
manifest.json names symlinks, and one tagged only through the legacy
``repositories`` file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.api_helpers import Layout


def require_skopeo() -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed: cannot make the archives")


def skopeo_copy(source: str, destination: str, *flags: str) -> None:
    """``skopeo copy`` with the test policy; fails the test on error."""
    require_skopeo()
    command = ["skopeo", "--insecure-policy", "copy", "-q", *flags]
    result = subprocess.run(
        [*command, source, destination], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(f"skopeo copy {source} {destination}: {result.stderr}")


def hex_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class SavedImage:
    """One image as ``docker save`` stores it: config, layer blobs, tags."""

    config: bytes
    #: Layer blobs as the OCI layout stores them (gzip).
    layers: list[bytes]
    repo_tags: list[str] = field(default_factory=list)

    @classmethod
    def from_layout(
        cls, layout: Path, *repo_tags: str, ref: str = "latest"
    ) -> SavedImage:
        reader = Layout(layout)
        manifest = reader.manifest(ref)
        config = reader.blob(manifest["config"]["digest"])
        layers = [reader.blob(layer["digest"]) for layer in manifest["layers"]]
        return cls(config, layers, list(repo_tags))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def _add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tar.addfile(info)


def write_docker_archive(
    path: Path,
    images: list[SavedImage],
    *,
    layers_as: str = "docker-save",
    repositories: dict[str, dict[str, str]] | None = None,
) -> list[str]:
    """Write a ``docker save`` archive; return each image's top layer id.

    ``layers_as`` says how layers are stored and named in manifest.json:
    ``docker-save``, uncompressed as ``<id>/layer.tar`` (classic Docker);
    ``symlinks``, uncompressed as ``<hex>.tar`` with manifest.json naming a
    ``<id>/layer.tar`` symlink to it; ``gzip-blobs``, the gzip blobs as
    ``blobs/sha256/<hex>`` (Docker 25). A layer id is the sha256 of the
    image's config digest and the layer's position, unique per archive.
    """
    entries: list[dict[str, object]] = []
    top_ids: list[str] = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for image in images:
            config_name = f"{hex_of(image.config)}.json"
            _add(tar, config_name, image.config)
            layer_names = []
            for position, blob in enumerate(image.layers):
                layer_id = hex_of(f"{hex_of(image.config)}/{position}".encode())
                if layers_as == "gzip-blobs":
                    name = f"blobs/sha256/{hex_of(blob)}"
                    _add(tar, name, blob)
                elif layers_as == "symlinks":
                    plain = gzip.decompress(blob)
                    _add(tar, f"{hex_of(plain)}.tar", plain)
                    name = f"{layer_id}/layer.tar"
                    _add_symlink(tar, name, f"../{hex_of(plain)}.tar")
                else:
                    name = f"{layer_id}/layer.tar"
                    _add(tar, name, gzip.decompress(blob))
                layer_names.append(name)
            top_ids.append(layer_id)
            entries.append(
                {
                    "Config": config_name,
                    "RepoTags": image.repo_tags or None,
                    "Layers": layer_names,
                }
            )
        _add(tar, "manifest.json", json.dumps(entries).encode())
        if repositories is not None:
            _add(tar, "repositories", json.dumps(repositories).encode())
    return top_ids


def gzip_file(source: Path, destination: Path) -> None:
    with open(source, "rb") as plain, gzip.open(destination, "wb") as packed:
        shutil.copyfileobj(plain, packed)


def tar_members(path: Path) -> dict[str, bytes]:
    """Every regular file of a tar, by name, links followed as GNU tar would."""
    members: dict[str, bytes] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            extracted = tar.extractfile(info)
            if extracted is not None:
                members[info.name] = extracted.read()
    return members
