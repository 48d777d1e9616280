"""The OCI layout writer and the test images, checked by independent tools.

skopeo reads every layout and reports the digests; GNU tar, gzip and zstd
read the layers; hashlib recomputes every digest and diffID. Expected names
and contents are the literals the catalogue promises.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.oci_writer import OCILayoutWriter, Platform, TarEntry, platform_for_machine
from tests.images import (
    MAKE_TEST_IMAGES,
    REPO_ROOT,
    SYNTHETIC_IMAGES,
    DebianImage,
    ImageSet,
)

MAKE_DEMO_IMAGE = REPO_ROOT / "scripts" / "make-demo-image"
DEMO = REPO_ROOT / "demo"
GOOD_IMAGES = [name for name in SYNTHETIC_IMAGES if name != "corrupt"]
# skopeo 1.9 only looks up OCI media types by ref name; a lone Docker
# manifest is found by leaving the reference out.
SKOPEO_NO_REF = {"docker-v2s2"}


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def _json_blob(layout: Path, digest: str) -> Any:
    return json.loads(_blob(layout, digest))


def _top_entry(layout: Path) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_bytes())
    entries: list[dict[str, Any]] = index["manifests"]
    assert len(entries) == 1
    return entries[0]


def _image_manifests(layout: Path) -> list[dict[str, Any]]:
    """Every image manifest reachable from index.json, nested indexes walked."""
    found, pending = [], [_top_entry(layout)]
    while pending:
        entry = pending.pop()
        doc = _json_blob(layout, entry["digest"])
        if "manifests" in doc:
            pending.extend(doc["manifests"])
        else:
            found.append(doc)
    return found


def _skopeo_name(test_images: ImageSet, name: str) -> str:
    image = test_images[name]
    return f"oci:{image.path}" if name in SKOPEO_NO_REF else image.reference


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True)


def _inspect(*args: str) -> Any:
    result = _skopeo("inspect", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _decompress(path: Path, media_type: str) -> bytes:
    if media_type.endswith("gzip"):
        command = ["gzip", "-dc", str(path)]
    elif media_type.endswith("zstd"):
        _need("zstd")
        command = ["zstd", "-dc", str(path)]
    else:
        return path.read_bytes()
    return subprocess.run(command, capture_output=True, check=True).stdout


def _layer_blobs(layout: Path) -> list[tuple[Path, str]]:
    manifest = _image_manifests(layout)[0]
    return [
        (layout / "blobs" / "sha256" / layer["digest"][7:], layer["mediaType"])
        for layer in manifest["layers"]
    ]


def _gnu_tar_list(tar: bytes, *options: str) -> list[str]:
    result = subprocess.run(
        ["tar", "--numeric-owner", "-P", *options, "-tvf", "-"],
        input=tar,
        capture_output=True,
        check=True,
    )
    # Keep mode, owner and name columns; sizes and dates are checked elsewhere.
    lines = []
    for line in result.stdout.decode().splitlines():
        fields = line.split(maxsplit=5)
        lines.append(f"{fields[0]} {fields[1]} {fields[5]}")
    return lines


def _layer_tars(test_images: ImageSet, name: str) -> list[bytes]:
    return [
        _decompress(path, media) for path, media in _layer_blobs(test_images.path(name))
    ]


# --- skopeo reads what the writer wrote -----------------------------------


@pytest.mark.parametrize("name", list(SYNTHETIC_IMAGES))
def test_skopeo_inspect_reports_the_digests_the_layout_holds(
    test_images: ImageSet, name: str
) -> None:
    _need("skopeo")
    layout = test_images.path(name)
    entry = _top_entry(layout)
    top_bytes = _blob(layout, entry["digest"])

    # Pin the platform so that the multiarch choice is the same on any host.
    inspected = _inspect(
        "--override-arch",
        "amd64",
        "--override-os",
        "linux",
        _skopeo_name(test_images, name),
    )
    raw = _skopeo("inspect", "--raw", _skopeo_name(test_images, name)).stdout

    assert _sha256(top_bytes) == entry["digest"]
    assert len(top_bytes) == entry["size"]
    assert inspected["Digest"] == entry["digest"]
    assert raw.encode() == top_bytes
    amd64 = next(
        m
        for m in _image_manifests(layout)
        if _json_blob(layout, m["config"]["digest"])["architecture"] == "amd64"
    )
    assert inspected["Layers"] == [layer["digest"] for layer in amd64["layers"]]


@pytest.mark.parametrize("name", GOOD_IMAGES)
def test_every_blob_is_stored_under_its_sha256(
    test_images: ImageSet, name: str
) -> None:
    for blob in (test_images.path(name) / "blobs" / "sha256").iterdir():
        assert _sha256(blob.read_bytes()) == f"sha256:{blob.name}"


@pytest.mark.parametrize("name", GOOD_IMAGES)
def test_skopeo_copies_each_image_to_a_dir(
    test_images: ImageSet, name: str, tmp_path: Path
) -> None:
    _need("skopeo")
    destination = tmp_path / "copy"
    result = _skopeo(
        "copy",
        "--insecure-policy",
        _skopeo_name(test_images, name),
        f"dir:{destination}",
    )
    assert result.returncode == 0, result.stderr
    assert (destination / "manifest.json").is_file()


def test_skopeo_copy_rejects_the_corrupt_layer(
    test_images: ImageSet, tmp_path: Path
) -> None:
    _need("skopeo")
    result = _skopeo(
        "copy",
        "--insecure-policy",
        test_images["corrupt"].reference,
        f"dir:{tmp_path / 'copy'}",
    )
    assert result.returncode != 0
    assert "digest" in result.stderr.lower()


def test_corrupt_layer_keeps_its_size_but_not_its_digest(
    test_images: ImageSet,
) -> None:
    layout = test_images.path("corrupt")
    layer = _image_manifests(layout)[0]["layers"][0]
    content = _blob(layout, layer["digest"])
    assert len(content) == layer["size"]
    assert _sha256(content) != layer["digest"]


@pytest.mark.parametrize("name", GOOD_IMAGES)
def test_diff_ids_are_the_sha256_of_the_decompressed_layers(
    test_images: ImageSet, name: str
) -> None:
    layout = test_images.path(name)
    for manifest in _image_manifests(layout):
        config = _json_blob(layout, manifest["config"]["digest"])
        measured = [
            _sha256(
                _decompress(
                    layout / "blobs" / "sha256" / d["digest"][7:], d["mediaType"]
                )
            )
            for d in manifest["layers"]
        ]
        assert config["rootfs"]["diff_ids"] == measured


# --- the catalogue's promises, read by GNU tar -----------------------------


def test_basic_layer_lists_every_entry_type_under_gnu_tar(
    test_images: ImageSet,
) -> None:
    (tar,) = _layer_tars(test_images, "basic")
    assert _gnu_tar_list(tar) == [
        "drwxr-xr-x 0/0 etc/",
        "-rw-r--r-- 0/0 etc/hostname",
        "-rw-r--r-- 0/0 etc/empty",
        "-rw-r--r-- 0/0 etc/with-xattr",
        "drwxr-xr-x 0/0 data/",
        "-rw-r--r-- 0/0 data/512-bytes",
        "-rw-r--r-- 0/0 data/1-MiB",
        "-rw-r--r-- 0/0 data/old-mtime",
        "drwxr-xr-x 0/0 usr/",
        "drwxr-xr-x 0/0 usr/bin/",
        "-rwsr-xr-x 0/0 usr/bin/tool",
        "lrwxrwxrwx 0/0 usr/bin/relative-link -> tool",
        "lrwxrwxrwx 0/0 usr/bin/absolute-link -> /usr/bin/tool",
        "hrw-r--r-- 0/0 usr/bin/tool-hardlink link to usr/bin/tool",
        "drwxr-xr-x 0/0 run/",
        "prw------- 0/0 run/fifo",
        "drwxr-xr-x 0/0 home/",
        "drwxr-xr-x 1000/1000 home/user/",
        "-rw------- 1000/1000 home/user/.profile",
        "drwx------ 0/0 empty-dir/",
    ]


def test_basic_layer_sizes_mtimes_and_xattr_survive_gnu_tar_extraction(
    test_images: ImageSet, tmp_path: Path
) -> None:
    (tar,) = _layer_tars(test_images, "basic")
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-xf", "-", "-C", str(tmp_path)],
        input=tar,
        check=True,
    )
    assert (tmp_path / "data/512-bytes").stat().st_size == 512
    assert (tmp_path / "data/1-MiB").stat().st_size == 1 << 20
    assert (tmp_path / "etc/empty").stat().st_size == 0
    assert (tmp_path / "etc/hostname").stat().st_mtime == 1_700_000_000
    assert (tmp_path / "data/old-mtime").stat().st_mtime == 1_000_000_000
    tool, hardlink = tmp_path / "usr/bin/tool", tmp_path / "usr/bin/tool-hardlink"
    assert tool.stat().st_ino == hardlink.stat().st_ino
    try:
        value = os.getxattr(tmp_path / "etc/with-xattr", "user.demo")
    except OSError as error:
        pytest.skip(f"this filesystem does not keep user xattrs: {error}")
    assert value == b"hello"


def test_whiteouts_layers_hold_the_markers_in_order(test_images: ImageSet) -> None:
    base, removals, readd = _layer_tars(test_images, "whiteouts")
    assert [line.split()[-1] for line in _gnu_tar_list(removals)] == [
        "etc/",
        "etc/.wh.remove.conf",
        "etc/.wh.readd.conf",
        "opt/",
        "opt/app/",
        "opt/app/.wh..wh..opq",
        "opt/app/new",
        ".wh.srv",
    ]
    assert "-rw-r--r-- 0/0 etc/readd.conf" in _gnu_tar_list(base)
    assert _gnu_tar_list(readd) == [
        "drwxr-xr-x 0/0 etc/",
        "-rw-r--r-- 0/0 etc/readd.conf",
    ]


def _header_typeflags(tar: bytes) -> list[bytes]:
    """Typeflags of every header block, walked by the ustar size field."""
    flags, offset = [], 0
    while offset + 512 <= len(tar) and tar[offset : offset + 512] != bytes(512):
        header = tar[offset : offset + 512]
        flags.append(header[156:157])
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        offset += 512 + (size + 511) // 512 * 512
    return flags


def test_longnames_uses_pax_then_gnu_long_name_records(
    test_images: ImageSet,
) -> None:
    pax, gnu = _layer_tars(test_images, "longnames")
    pax_names = [line.split(maxsplit=2)[2] for line in _gnu_tar_list(pax)]
    long_file = next(name for name in pax_names if name.endswith(".txt"))
    assert len(long_file) > 255
    assert "unicode/日本語.txt" in pax_names
    assert "unicode/emoji-🙂.txt" in pax_names
    assert "unicode/ñandú/ave.txt" in pax_names
    assert b"x" in _header_typeflags(pax)

    gnu_names = [line.split(maxsplit=2)[2] for line in _gnu_tar_list(gnu)]
    assert "gnu/" + "g" * 200 in gnu_names
    assert "gnu/long-hardlink link to gnu/" + "g" * 200 in gnu_names
    assert "gnu/long-symlink -> ../gnu/" + "g" * 200 in gnu_names
    flags = _header_typeflags(gnu)
    assert b"L" in flags and b"K" in flags and b"x" not in flags


def test_empty_layer_is_an_empty_tar_between_two_others(
    test_images: ImageSet,
) -> None:
    first, middle, last = _layer_tars(test_images, "empty-layer")
    assert middle == bytes(len(middle)) and len(middle) % 512 == 0
    assert _gnu_tar_list(middle) == []
    assert _gnu_tar_list(first) == ["-rw-r--r-- 0/0 before"]
    assert _gnu_tar_list(last) == ["-rw-r--r-- 0/0 after"]


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
        ("uncompressed", "application/vnd.oci.image.layer.v1.tar"),
        ("basic", "application/vnd.oci.image.layer.v1.tar+gzip"),
        ("docker-v2s2", "application/vnd.docker.image.rootfs.diff.tar.gzip"),
    ],
)
def test_layer_media_type_names_its_compression(
    test_images: ImageSet, name: str, media_type: str
) -> None:
    ((path, declared),) = _layer_blobs(test_images.path(name))
    assert declared == media_type
    assert _gnu_tar_list(_decompress(path, media_type))


def test_docker_v2s2_uses_docker_media_types(test_images: ImageSet) -> None:
    _need("skopeo")
    raw = json.loads(
        _skopeo("inspect", "--raw", _skopeo_name(test_images, "docker-v2s2")).stdout
    )
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert (
        raw["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    )


@pytest.mark.parametrize(
    ("arch", "variant", "content"),
    [
        ("amd64", None, b"linux/amd64\n"),
        ("arm64", "v8", b"linux/arm64v8\n"),
        ("arm", "v7", b"linux/armv7\n"),
    ],
)
def test_multiarch_platforms_have_distinct_layers(
    test_images: ImageSet, arch: str, variant: str | None, content: bytes
) -> None:
    _need("skopeo")
    override = ["--override-arch", arch, "--override-os", "linux"]
    if variant is not None:
        override += ["--override-variant", variant]
    image = test_images["multiarch"]
    (layer,) = _inspect(*override, image.reference)["Layers"]
    tar = _decompress(image.path / "blobs" / "sha256" / layer[7:], "gzip")
    extracted = subprocess.run(
        ["tar", "-xOf", "-", "etc/platform"], input=tar, capture_output=True, check=True
    ).stdout
    assert extracted == content


def test_hostile_layer_keeps_its_escaping_names_verbatim(
    test_images: ImageSet,
) -> None:
    (tar,) = _layer_tars(test_images, "hostile")
    assert _gnu_tar_list(tar) == [
        "-rw-r--r-- 0/0 ../escape",
        "-rw-r--r-- 0/0 /abs",
        "lrwxrwxrwx 0/0 link -> /tmp",
        "-rw-r--r-- 0/0 link/owned",
        "hrw-r--r-- 0/0 hardlink link to ../../etc/passwd",
        "-rw-r--r-- 0/0 harmless",
    ]


def test_big_layerinfo_reply_exceeds_the_32_kib_packet(
    test_images: ImageSet,
) -> None:
    (manifest,) = _image_manifests(test_images.path("big-layerinfo"))
    reply = {
        "success": True,
        "value": [
            {"digest": d["digest"], "size": d["size"], "media_type": d["mediaType"]}
            for d in manifest["layers"]
        ],
        "pipeid": 0,
        "error_code": "",
        "error": "",
    }
    assert len(manifest["layers"]) == 400
    assert len({d["digest"] for d in manifest["layers"]}) == 400
    assert len(json.dumps(reply)) > 32 * 1024


# --- the build script -------------------------------------------------------


def _run_make_test_images(outdir: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(MAKE_TEST_IMAGES), str(outdir), "--no-debian", *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_test_images_skips_complete_images_and_clears_leftovers(
    tmp_path: Path,
) -> None:
    _run_make_test_images(tmp_path, "--only", "basic")
    index = tmp_path / "basic" / "index.json"
    before = index.stat().st_ino
    (tmp_path / ".tmp-basic-interrupted").mkdir()

    second = _run_make_test_images(tmp_path, "--only", "basic")

    assert second.strip().endswith("(cached)")
    assert index.stat().st_ino == before
    assert not (tmp_path / ".tmp-basic-interrupted").exists()


def test_make_test_images_builds_manyfiles_on_request(tmp_path: Path) -> None:
    _run_make_test_images(tmp_path, "--only", "manyfiles", "--many", "1500")
    (tar,) = [_decompress(p, m) for p, m in _layer_blobs(tmp_path / "manyfiles")]
    listing = _gnu_tar_list(tar)
    assert sum(line.startswith("-") for line in listing) == 1500
    assert sum(line.startswith("d") for line in listing) == 2
    assert not (tmp_path / "basic").exists()


# --- the writer on its own --------------------------------------------------


def test_uncompressed_layer_digest_is_its_diff_id(tmp_path: Path) -> None:
    writer = OCILayoutWriter(tmp_path)
    layer = writer.add_layer([TarEntry("a", content=b"x")], compression="none")
    stored = (tmp_path / "blobs/sha256" / layer.digest[7:]).read_bytes()
    assert layer.digest == layer.diff_id == _sha256(stored)


def test_layer_from_a_tar_file_keeps_its_bytes(tmp_path: Path) -> None:
    source = tmp_path / "in.tar"
    source.write_bytes(b"not even a tar, kept as is" * 100)
    writer = OCILayoutWriter(tmp_path / "layout")
    layer = writer.add_layer_tar(source, gzip_library="isal")
    blob = tmp_path / "layout/blobs/sha256" / layer.digest[7:]
    assert _decompress(blob, "gzip") == source.read_bytes()
    assert layer.diff_id == _sha256(source.read_bytes())
    assert layer.uncompressed_size == 2600


def test_same_input_gives_the_same_layout_bytes(tmp_path: Path) -> None:
    for run in ("one", "two"):
        writer = OCILayoutWriter(tmp_path / run)
        layer = writer.add_layer(
            [TarEntry("etc/", "dir"), TarEntry("etc/f", content=b"1")]
        )
        writer.add_image([layer], ref_name="v1")
    assert (tmp_path / "one/index.json").read_bytes() == (
        tmp_path / "two/index.json"
    ).read_bytes()
    assert json.loads((tmp_path / "one/oci-layout").read_bytes()) == {
        "imageLayoutVersion": "1.0.0"
    }


def test_index_entries_carry_their_ref_names(tmp_path: Path) -> None:
    writer = OCILayoutWriter(tmp_path)
    layer = writer.add_layer([TarEntry("f", content=b"1")])
    writer.add_image([layer], ref_name="one")
    OCILayoutWriter(tmp_path).add_image([layer], ref_name="two")
    index = json.loads((tmp_path / "index.json").read_bytes())
    refs = [
        e["annotations"]["org.opencontainers.image.ref.name"]
        for e in index["manifests"]
    ]
    assert refs == ["one", "two"]


def test_docker_manifests_refuse_zstd_layers(tmp_path: Path) -> None:
    writer = OCILayoutWriter(tmp_path)
    layer = writer.add_layer([TarEntry("f")], compression="zstd")
    with pytest.raises(ValueError, match="zstd"):
        writer.add_image([layer], manifest_format="docker")


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", Platform("linux", "amd64")),
        ("aarch64", Platform("linux", "arm64", "v8")),
        ("armhf", Platform("linux", "arm", "v7")),
        ("ppc64el", Platform("linux", "ppc64le")),
    ],
)
def test_machine_names_map_to_go_architectures(
    machine: str, expected: Platform
) -> None:
    assert platform_for_machine(machine) == expected


# --- the committed demo ------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_demo_layout_is_identical_to_a_fresh_build(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(MAKE_DEMO_IMAGE), str(tmp_path / "demo")],
        check=True,
        capture_output=True,
    )
    assert _tree(tmp_path / "demo") == _tree(DEMO)


def test_demo_is_small(tmp_path: Path) -> None:
    assert sum(len(content) for content in _tree(DEMO).values()) < 200 * 1024


@pytest.mark.parametrize(("arch", "variant"), [("amd64", None), ("arm64", "v8")])
def test_demo_opens_on_amd64_and_arm64_with_the_same_layers(
    arch: str, variant: str | None
) -> None:
    _need("skopeo")
    override = ["--override-arch", arch, "--override-os", "linux"]
    if variant is not None:
        override += ["--override-variant", variant]
    inspected = _inspect(*override, f"oci:{DEMO}:latest")
    assert inspected["Architecture"] == arch
    assert inspected["Layers"] == [
        layer["digest"] for layer in _image_manifests(DEMO)[0]["layers"]
    ]
    os_release = subprocess.run(
        [
            "tar",
            "-xOzf",
            str(DEMO / "blobs/sha256" / inspected["Layers"][0][7:]),
            "etc/os-release",
        ],
        capture_output=True,
        check=True,
    ).stdout
    assert b'NAME="image-proxy demo"' in os_release


# --- the Debian image -------------------------------------------------------


@pytest.mark.debian
def test_debian_layer_is_the_rootfs_tar_byte_for_byte(
    debian_image: DebianImage,
) -> None:
    blob = debian_image.path / "blobs/sha256" / debian_image.layer_digest[7:]
    gunzip = subprocess.Popen(["gzip", "-dc", str(blob)], stdout=subprocess.PIPE)
    assert gunzip.stdout is not None
    from_blob, from_tar = hashlib.sha256(), hashlib.sha256()
    while chunk := gunzip.stdout.read(1 << 20):
        from_blob.update(chunk)
    assert gunzip.wait() == 0
    with open(debian_image.rootfs_tar, "rb") as source:
        while chunk := source.read(1 << 20):
            from_tar.update(chunk)
    assert debian_image.diff_id == "sha256:" + from_blob.hexdigest()
    assert debian_image.diff_id == "sha256:" + from_tar.hexdigest()


@pytest.mark.debian
def test_skopeo_reads_the_debian_image(debian_image: DebianImage) -> None:
    _need("skopeo")
    inspected = _inspect(debian_image.reference)
    assert inspected["Layers"] == [debian_image.layer_digest]
    assert inspected["Os"] == "linux"
    os_release = subprocess.run(
        [
            "tar",
            "-xOf",
            str(debian_image.rootfs_tar),
            "./etc/os-release",
            "./usr/lib/os-release",
        ],
        capture_output=True,
    ).stdout
    assert b"VERSION_CODENAME=bookworm" in os_release
