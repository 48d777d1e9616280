"""``oci-archive:``, ``docker-archive:`` and ``dir:`` against Debian's skopeo.

The archives are made by skopeo itself from the test images, or by hand
(tests/archives.py) where skopeo 1.9 cannot make them. For each, the legacy
transcript (OpenImage, GetManifest, GetConfig, GetFullConfig, and GetBlob of
every blob the manifest names) must equal skopeo's through the same client
code; the methods skopeo 1.9 lacks (GetLayerInfo, OpenImageOptional) are
checked against the archive's own files; and ``image-proxy pull`` of the
Debian image from each format must give the tree a pull from ``oci:`` gives.

Deliberate differences from skopeo, asserted as ours only:

- a missing archive file, a missing ``dir:`` directory and a docker-archive
  NAME:TAG or @INDEX not in the archive are "missing" for OpenImageOptional
  (skopeo reports the first and ignores the rest until GetManifest);
- docker-archive and dir: problems skopeo reports at GetManifest are
  reported at OpenImage, with the same text.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from proxy.client import LegacyClient, ProxyProcess
from proxy.pull import pull
from tests.api_helpers import describe_tree, sha256_of
from tests.archives import (
    SavedImage,
    gzip_file,
    require_skopeo,
    skopeo_copy,
    tar_members,
    write_docker_archive,
)
from tests.images import DebianImage, ImageSet
from tests.legacy_helpers import SKOPEO, Call, record

pytestmark = pytest.mark.anyio

DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

Steps = Callable[[LegacyClient], Awaitable[list[Call]]]


# --- making the archives ---------------------------------------------------------


@dataclass(frozen=True)
class Archives:
    """Image names of one image in every format, keyed by format."""

    references: dict[str, str]
    files: dict[str, Path]


def make_archives(layout: Path, ref: str, where: Path) -> Archives:
    source = f"oci:{layout}:{ref}"
    files = {
        "oci-archive": where / "oci.tar",
        "docker-archive": where / "docker.tar",
        "dir-v2s2": where / "dir-v2s2",
        "dir-oci": where / "dir-oci",
        "docker-archive-gzip-layers": where / "docker-gzip-layers.tar",
    }
    skopeo_copy(source, f"oci-archive:{files['oci-archive']}:{ref}")
    skopeo_copy(source, f"docker-archive:{files['docker-archive']}:example.com/x:v1")
    skopeo_copy(source, f"dir:{files['dir-v2s2']}", "--format", "v2s2")
    skopeo_copy(source, f"dir:{files['dir-oci']}", "--format", "oci")
    write_docker_archive(
        files["docker-archive-gzip-layers"],
        [SavedImage.from_layout(layout, "example.com/x:v1", ref=ref)],
        layers_as="gzip-blobs",
    )
    references = {
        "oci-archive": f"oci-archive:{files['oci-archive']}:{ref}",
        "docker-archive": f"docker-archive:{files['docker-archive']}",
        "docker-archive-tagged": (
            f"docker-archive:{files['docker-archive']}:example.com/x:v1"
        ),
        "dir-v2s2": f"dir:{files['dir-v2s2']}",
        "dir-oci": f"dir:{files['dir-oci']}",
        "docker-archive-gzip-layers": (
            f"docker-archive:{files['docker-archive-gzip-layers']}"
        ),
    }
    return Archives(references, files)


@pytest.fixture(scope="session")
def basic_archives(
    test_images: ImageSet, tmp_path_factory: pytest.TempPathFactory
) -> Archives:
    where = tmp_path_factory.mktemp("basic-archives")
    archives = make_archives(test_images["basic"].path, "latest", where)
    compressed = where / "oci.tar.gz"
    gzip_file(archives.files["oci-archive"], compressed)
    multi = where / "multi.tar"
    write_docker_archive(
        multi,
        [
            SavedImage.from_layout(test_images["basic"].path, "example.com/basic:v1"),
            SavedImage.from_layout(test_images["whiteouts"].path, "whiteouts:latest"),
        ],
    )
    references = dict(archives.references)
    references["oci-archive-gzip"] = f"oci-archive:{compressed}:latest"
    references["multi@0"] = f"docker-archive:{multi}:@0"
    references["multi@1"] = f"docker-archive:{multi}:@1"
    references["multi-by-name"] = f"docker-archive:{multi}:example.com/basic:v1"
    references["multi-by-short-name"] = f"docker-archive:{multi}:whiteouts"
    files = dict(archives.files, multi=multi, **{"oci-archive-gzip": compressed})
    return Archives(references, files)


@pytest.fixture(scope="session")
def debian_archives(
    debian_image: DebianImage, tmp_path_factory: pytest.TempPathFactory
) -> Archives:
    where = tmp_path_factory.mktemp("debian-archives")
    return make_archives(debian_image.path, "bookworm", where)


# --- transcripts -------------------------------------------------------------------


def image_steps(reference: str) -> Steps:
    """Open, then the manifest, both configs and every blob it names."""

    async def steps(client: LegacyClient) -> list[Call]:
        calls = [await record(client, "Initialize")]
        calls.append(await record(client, "OpenImage", reference))
        if not calls[-1].success:
            return calls
        manifest = await record(client, "GetManifest", 1)
        calls.append(manifest)
        calls.append(await record(client, "GetConfig", 1))
        calls.append(await record(client, "GetFullConfig", 1))
        if manifest.payload is not None:
            document = json.loads(manifest.payload)
            for blob in [document["config"], *document["layers"]]:
                calls.append(
                    await record(client, "GetBlob", 1, blob["digest"], blob["size"])
                )
        return calls

    return steps


def comparable(call: Call) -> Call:
    """Normalised as in test_legacy_vs_skopeo; big payloads kept as digests."""
    call = call.normalised()
    if call.method == "Initialize" and call.success:
        call = replace(call, value="0.2.x")
    if call.payload is not None and len(call.payload) > 1 << 16:
        call = replace(call, payload=sha256_of(call.payload).encode())
    return call


async def run_steps(command: list[str] | None, steps: Steps) -> list[Call]:
    async with ProxyProcess.spawn(["--insecure-policy"], command=command) as proxy:
        return [comparable(call) for call in await steps(proxy.legacy)]


async def assert_same_as_skopeo(reference: str) -> list[Call]:
    require_skopeo()
    theirs = await run_steps(SKOPEO, image_steps(reference))
    ours = await run_steps(None, image_steps(reference))
    assert ours == theirs
    return ours


BASIC_FORMATS = [
    "oci-archive",
    "oci-archive-gzip",
    "docker-archive",
    "docker-archive-tagged",
    "docker-archive-gzip-layers",
    "dir-v2s2",
    "dir-oci",
    "multi@0",
    "multi@1",
    "multi-by-name",
    "multi-by-short-name",
]


@pytest.mark.parametrize("kind", BASIC_FORMATS)
async def test_legacy_transcript_equals_skopeos(
    basic_archives: Archives, kind: str
) -> None:
    ours = await assert_same_as_skopeo(basic_archives.references[kind])
    assert all(call.success for call in ours[:5])
    layer_count = len(json.loads(ours[2].payload or b"")["layers"])
    for blob in ours[len(ours) - layer_count :]:
        assert blob.finish is not None and blob.finish.success


@pytest.mark.debian
@pytest.mark.parametrize(
    "kind",
    ["oci-archive", "docker-archive", "docker-archive-gzip-layers", "dir-v2s2"],
)
async def test_debian_legacy_transcript_equals_skopeos(
    debian_archives: Archives, kind: str
) -> None:
    await assert_same_as_skopeo(debian_archives.references[kind])


async def test_docker_archive_manifest_is_synthesised_as_containers_image_does(
    basic_archives: Archives,
) -> None:
    """The digest skopeo reports is that of this document, written out here
    from the archive's files: layers named by diffID with their uncompressed
    size and the gzip media type, whatever the file's compression."""
    members = tar_members(basic_archives.files["docker-archive"])
    (item,) = json.loads(members["manifest.json"])
    config = members[item["Config"]]
    layers = [members[name] for name in item["Layers"]]
    expected = (
        '{"schemaVersion":2,'
        '"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
        '"config":{"mediaType":"application/vnd.docker.container.image.v1+json",'
        f'"size":{len(config)},"digest":"{sha256_of(config)}"}},'
        '"layers":['
        + ",".join(
            f'{{"mediaType":"{DOCKER_LAYER_GZIP}","size":{len(layer)},'
            f'"digest":"{sha256_of(layer)}"}}'
            for layer in layers
        )
        + "]}"
    ).encode()
    ours = await run_steps(
        None, image_steps(basic_archives.references["docker-archive"])
    )
    assert ours[2].value == sha256_of(expected)


# --- GetLayerInfo, which skopeo 1.9 lacks -------------------------------------------


def expected_layer_infos(archives: Archives, kind: str) -> list[dict[str, Any]]:
    """What the stored manifest says (docker-archive: the synthesised one)."""
    path = archives.files[kind]
    if kind.startswith("dir"):
        manifest = json.loads((path / "manifest.json").read_bytes())
    elif kind == "oci-archive":
        members = tar_members(path)
        (descriptor,) = json.loads(members["index.json"])["manifests"]
        manifest = json.loads(
            members["blobs/" + descriptor["digest"].replace(":", "/")]
        )
    else:
        members = tar_members(path)
        (item,) = json.loads(members["manifest.json"])
        diff_ids = json.loads(members[item["Config"]])["rootfs"]["diff_ids"]
        layers = [members[name] for name in item["Layers"]]
        return [
            {"digest": diff_id, "size": len(layer), "media_type": DOCKER_LAYER_GZIP}
            for diff_id, layer in zip(diff_ids, layers, strict=True)
        ]
    return [
        {
            "digest": layer["digest"],
            "size": layer["size"],
            "media_type": layer["mediaType"],
        }
        for layer in manifest["layers"]
    ]


@pytest.mark.parametrize(
    "kind", ["oci-archive", "docker-archive", "dir-v2s2", "dir-oci"]
)
async def test_get_layer_info_reports_the_stored_manifests_layers(
    basic_archives: Archives, kind: str
) -> None:
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await proxy.legacy.initialize()
        image_id, _, _ = await proxy.legacy.call(
            "OpenImage", basic_archives.references[kind]
        )
        value, _, _ = await proxy.legacy.call("GetLayerInfo", image_id)
    assert value == expected_layer_infos(basic_archives, kind)


# --- missing images and broken references -------------------------------------------


async def open_optional(reference: str) -> Call:
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await record(proxy.legacy, "Initialize")
        return await record(proxy.legacy, "OpenImageOptional", reference)


@pytest.mark.parametrize(
    "reference",
    [
        "oci-archive:{where}/no-such.tar",
        "oci-archive:{oci}:no-such-ref",
        "docker-archive:{where}/no-such.tar",
        "docker-archive:{docker}:no-such:tag",
        "docker-archive:{docker}:@7",
        "dir:{where}/no-such-dir",
    ],
)
async def test_open_image_optional_says_missing(
    basic_archives: Archives, reference: str, tmp_path: Path
) -> None:
    name = reference.format(
        where=tmp_path,
        oci=basic_archives.files["oci-archive"],
        docker=basic_archives.files["docker-archive"],
    )
    call = await open_optional(name)
    assert call.success and call.value == 0


def _not_a_tar(where: Path) -> str:
    path = where / "garbage.tar"
    path.write_bytes(b"this is not a tar archive\n" * 100)
    return f"oci-archive:{path}"


def _no_manifest_json(where: Path) -> str:
    path = where / "empty.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("repositories")
        tar.addfile(info)
    return f"docker-archive:{path}"


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("not-a-tar", "is not a tar archive"),
        ("no-manifest-json", 'loading tar component "manifest.json"'),
        ("several-images", "Unexpected tar manifest.json: expected 1 item, got 2"),
        ("digest-reference", "reference does not include a tag"),
        ("uppercase-name", "must be lowercase"),
    ],
)
async def test_open_image_optional_fails_on_broken_archives_and_references(
    basic_archives: Archives, tmp_path: Path, case: str, error: str
) -> None:
    multi = basic_archives.files["multi"]
    reference = {
        "not-a-tar": lambda: _not_a_tar(tmp_path),
        "no-manifest-json": lambda: _no_manifest_json(tmp_path),
        "several-images": lambda: f"docker-archive:{multi}",
        "digest-reference": lambda: f"docker-archive:{multi}:x@sha256:{'0' * 64}",
        "uppercase-name": lambda: f"docker-archive:{multi}:library/Upper:v1",
    }[case]()
    call = await open_optional(reference)
    assert not call.success
    assert error in call.error


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive"])
async def test_open_image_of_a_missing_file_fails_as_skopeo_does(
    tmp_path: Path, transport: str
) -> None:
    require_skopeo()
    steps = image_steps(f"{transport}:{tmp_path}/no-such.tar")
    assert await run_steps(None, steps) == await run_steps(SKOPEO, steps)


@pytest.mark.parametrize(
    "reference",
    [
        "docker-archive:{docker}:no-such:tag",
        "docker-archive:{docker}:@7",
        "dir:{where}",
    ],
)
async def test_errors_skopeo_gives_at_get_manifest_we_give_at_open(
    basic_archives: Archives, tmp_path: Path, reference: str
) -> None:
    require_skopeo()
    name = reference.format(
        docker=basic_archives.files["docker-archive"], where=tmp_path / "absent"
    )
    theirs = await run_steps(SKOPEO, image_steps(name))
    ours = await run_steps(None, image_steps(name))
    assert theirs[1].success and not theirs[2].success
    assert not ours[1].success
    assert ours[1].error == theirs[2].error


async def test_docker_archive_finds_a_name_only_the_repositories_file_holds(
    test_images: ImageSet, tmp_path: Path
) -> None:
    """Older tools leave RepoTags empty; skopeo reaches the image by @1."""
    require_skopeo()
    path = tmp_path / "legacy.tar"
    images = [
        SavedImage.from_layout(test_images["whiteouts"].path),
        SavedImage.from_layout(test_images["basic"].path),
    ]
    top_ids = write_docker_archive(path, images)
    write_docker_archive(path, images, repositories={"legacy/app": {"v2": top_ids[1]}})
    theirs = await run_steps(SKOPEO, image_steps(f"docker-archive:{path}:@1"))
    ours = await run_steps(None, image_steps(f"docker-archive:{path}:legacy/app:v2"))
    assert [replace(call, args=()) for call in ours[2:]] == [
        replace(call, args=()) for call in theirs[2:]
    ]


async def test_docker_archive_follows_a_layer_symlink_skopeo_reports_as_empty(
    test_images: ImageSet, tmp_path: Path
) -> None:
    """skopeo 1.9 sizes a layer by the header manifest.json names, so a
    symlink gives size 0 and its GetBlob then fails; we follow the link and
    answer as skopeo does for the same layers stored as regular files."""
    images = [SavedImage.from_layout(test_images["basic"].path)]
    linked, regular = tmp_path / "linked.tar", tmp_path / "regular.tar"
    write_docker_archive(linked, images, layers_as="symlinks")
    write_docker_archive(regular, images)
    theirs = await run_steps(SKOPEO, image_steps(f"docker-archive:{regular}"))
    ours = await run_steps(None, image_steps(f"docker-archive:{linked}"))
    assert [replace(call, args=call.args[1:]) for call in ours[2:]] == [
        replace(call, args=call.args[1:]) for call in theirs[2:]
    ]


# --- nothing outside the archive or directory is served ----------------------------


async def test_a_symlink_in_an_oci_archive_cannot_reach_a_host_file(
    basic_archives: Archives, tmp_path: Path
) -> None:
    """The layer member is replaced by a link to an absolute host path."""
    source = basic_archives.files["oci-archive"]
    members = tar_members(source)
    (descriptor,) = json.loads(members["index.json"])["manifests"]
    manifest = json.loads(members["blobs/" + descriptor["digest"].replace(":", "/")])
    (layer,) = manifest["layers"]
    layer_member = "blobs/" + layer["digest"].replace(":", "/")
    hostile = tmp_path / "hostile.tar"
    with tarfile.open(source) as original, tarfile.open(hostile, "w") as tar:
        for info in original:
            if info.name == layer_member:
                info = tarfile.TarInfo(layer_member)
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/hostname"
                tar.addfile(info)
            else:
                tar.addfile(info, original.extractfile(info))
    ours = await run_steps(None, image_steps(f"oci-archive:{hostile}:latest"))
    (get_layer,) = [call for call in ours if call.args[1:2] == (layer["digest"],)]
    assert not get_layer.success
    assert "not in" in get_layer.error


async def test_a_symlink_in_a_dir_image_cannot_reach_a_host_file(
    basic_archives: Archives, tmp_path: Path
) -> None:
    directory = tmp_path / "dir"
    source = basic_archives.files["dir-oci"]
    directory.mkdir()
    for entry in source.iterdir():
        (directory / entry.name).write_bytes(entry.read_bytes())
    manifest = json.loads((directory / "manifest.json").read_bytes())
    (layer,) = manifest["layers"]
    hex_digest = layer["digest"].split(":")[1]
    (directory / hex_digest).unlink()
    os.symlink("/etc/hostname", directory / hex_digest)
    ours = await run_steps(None, image_steps(f"dir:{directory}"))
    (get_layer,) = [call for call in ours if call.args[1:2] == (layer["digest"],)]
    assert not get_layer.success
    assert "outside the directory: refused" in get_layer.error


# --- pull: the same tree from every format --------------------------------------------


@pytest.fixture(scope="session")
def debian_tree_from_oci(
    debian_image: DebianImage, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    where = tmp_path_factory.mktemp("debian-oci-pull")
    anyio.run(_pull, debian_image.reference, where / "tree", where / "cache")
    return where / "tree"


async def _pull(reference: str, dest: Path, cache: Path) -> None:
    await pull(reference, dest, cache_dir=cache)


@pytest.mark.debian
@pytest.mark.parametrize(
    "kind",
    [
        "oci-archive",
        "docker-archive",
        "docker-archive-gzip-layers",
        "dir-v2s2",
        "dir-oci",
    ],
)
async def test_debian_pull_gives_the_tree_a_pull_from_oci_gives(
    debian_archives: Archives, debian_tree_from_oci: Path, tmp_path: Path, kind: str
) -> None:
    # A cache of its own, so the layer is really unpacked from this format.
    await pull(debian_archives.references[kind], tmp_path / "tree", cache_dir=tmp_path)
    ours_nodes, ours_links = describe_tree(tmp_path / "tree")
    oci_nodes, oci_links = describe_tree(debian_tree_from_oci)
    assert sorted(ours_nodes) == sorted(oci_nodes)
    for path, node in oci_nodes.items():
        assert ours_nodes[path] == node, path
    assert ours_links == oci_links
