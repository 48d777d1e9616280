"""The image model: digests, platform choice, config re-serialisation.

Expected values come from the OCI image spec, go-digest's error texts (as
skopeo sends them) and hashlib; conversions against skopeo itself are in
test_legacy_vs_skopeo.py.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from protocol.errors import ClientError, SourceError
from protocol.image import (
    Descriptor,
    Digest,
    Index,
    Platform,
    PlatformWanted,
    choose_instance,
    go_json,
    guess_media_type,
    parse_oci_config,
    serialise_full_config,
)

SHA = "sha256:" + "ab" * 32


def test_digest_accepts_the_three_spec_algorithms() -> None:
    for algorithm, length in (("sha256", 64), ("sha384", 96), ("sha512", 128)):
        assert Digest(f"{algorithm}:{'0' * length}").hex == "0" * length


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sha256:zz", "invalid checksum digest length"),
        ("sha256:" + "Z" * 64, "invalid checksum digest format"),
        ("nocolon", "invalid checksum digest format"),
        ("md5:" + "0" * 32, "unsupported digest algorithm"),
        ("sha256:" + "0" * 63, "invalid checksum digest length"),
    ],
)
def test_digest_errors_use_go_digest_wording(text: str, message: str) -> None:
    with pytest.raises(ClientError) as caught:
        Digest(text)
    assert str(caught.value) == message


def test_digest_matches_hashlib() -> None:
    data = b"layer bytes"
    assert Digest.of(data) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert Digest.of(data).matches(data)
    assert not Digest.of(data).matches(data + b"!")


def _index(*platforms: tuple[str, str, str]) -> Index:
    return Index(
        schema_version=2,
        manifests=[
            Descriptor(
                digest=f"sha256:{position:064x}",
                platform=Platform(os=os_name, architecture=arch, variant=variant),
            )
            for position, (os_name, arch, variant) in enumerate(platforms)
        ],
    )


def test_platform_choice_prefers_the_exact_variant_over_an_empty_one() -> None:
    index = _index(("linux", "arm64", ""), ("linux", "arm64", "v8"))
    chosen = choose_instance(index, PlatformWanted("linux", "arm64", "v8"))
    assert chosen.digest == f"sha256:{1:064x}"


def test_platform_choice_lets_armv7_run_v6_images_but_not_the_reverse() -> None:
    index = _index(("linux", "arm", "v6"))
    assert choose_instance(index, PlatformWanted("linux", "arm", "v7")).digest
    with pytest.raises(SourceError):
        choose_instance(
            _index(("linux", "arm", "v7")), PlatformWanted("linux", "arm", "v6")
        )


def test_platform_choice_ignores_other_operating_systems() -> None:
    index = _index(("windows", "amd64", ""), ("linux", "amd64", ""))
    chosen = choose_instance(index, PlatformWanted("linux", "amd64"))
    assert chosen.digest == f"sha256:{1:064x}"


def test_no_matching_platform_names_what_was_wanted() -> None:
    with pytest.raises(SourceError, match='architecture "s390x"'):
        choose_instance(
            _index(("linux", "amd64", "")), PlatformWanted("linux", "s390x")
        )


@pytest.mark.parametrize(
    ("document", "media_type"),
    [
        (
            {"schemaVersion": 2, "manifests": []},
            "application/vnd.oci.image.index.v1+json",
        ),
        (
            {"schemaVersion": 2, "config": {}, "layers": []},
            "application/vnd.oci.image.manifest.v1+json",
        ),
        (
            {"schemaVersion": 1, "fsLayers": []},
            "application/vnd.docker.distribution.manifest.v1+json",
        ),
        (
            {"schemaVersion": 1, "signatures": []},
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        ),
    ],
)
def test_media_type_is_guessed_from_shape_when_absent(
    document: dict[str, object], media_type: str
) -> None:
    assert guess_media_type(json.dumps(document).encode()) == media_type


def test_full_config_keeps_oci_fields_in_go_order_and_drops_docker_extras() -> None:
    docker_config = {
        "os": "linux",
        "architecture": "arm64",
        "variant": "v8",
        "container": "abc",
        "docker_version": "24.0",
        "created": "2024-01-02T03:04:05.120000000Z",
        "config": {
            "Cmd": ["/bin/sh"],
            "Hostname": "x",
            "Labels": {"b": "2", "a": "<1>"},
        },
        "rootfs": {"type": "layers", "diff_ids": [SHA]},
    }
    view = parse_oci_config(json.dumps(docker_config).encode())
    serialised = serialise_full_config(view)
    # Field order of image-spec's v1.Image; Go trims a fraction's trailing
    # zeros and escapes <, > and &.
    assert serialised == (
        b'{"created":"2024-01-02T03:04:05.12Z","architecture":"arm64","os":"linux",'
        b'"variant":"v8","config":{"Cmd":["/bin/sh"],"Labels":{"a":"\\u003c1\\u003e",'
        b'"b":"2"}},"rootfs":{"type":"layers","diff_ids":["' + SHA.encode() + b'"]}}'
    )


def test_go_json_escapes_html_characters_only_inside_strings() -> None:
    assert go_json({"k": "a&b<c>"}) == b'{"k":"a\\u0026b\\u003cc\\u003e"}'
