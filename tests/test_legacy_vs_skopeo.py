"""Our legacy proxy against Debian's skopeo 1.9 (protocol 0.2.3), side by side.

Each test runs the same calls, through the same client code, against
``skopeo experimental-image-proxy`` and against ours, and asserts that the
transcripts agree: success, value, error text, number of fds, pipe payload
bytes and FinishPipe's outcome. The methods covered are those skopeo 0.2.3
has; later methods and our own behaviour are in test_legacy_protocol.py.

Normalised, because the protocol lets them differ:

- the pipe id is opaque: only zero versus non-zero is compared;
- ``error_code`` arrived in 0.2.8, so skopeo 0.2.3 sends none;
- Initialize's version: skopeo says 0.2.3, we say 0.2.9 (both asserted).

Normalised, because we follow the current reference (container-libs
``common/pkg/json-proxy/handler.go``) where it reworded skopeo 1.9's errors:

- a non-numeric image id: 1.9 says ``expecting integer imageid, not T``,
  the reference and we say ``expecting numeric, not T``;
- image id 0: 1.9 says ``no image 0``, the reference and we say
  ``invalid imageid value of zero``.

Deliberate differences, tested on ours only (in test_legacy_protocol.py):

- a malformed request's error text after ``invalid request:`` comes from
  the JSON decoder (Go's or msgspec's); only that prefix is compared here;
- FinishPipe with no arguments makes skopeo panic (it indexes ``args[0]``
  unchecked) and kill the session; we answer an error;
- a negative, fractional or 2**53 and larger number is silently truncated
  by skopeo (``CloseImage(-1)`` says ``no image 4294967295``, ``1.5`` reaches
  image 1); we refuse it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from proxy.client import LegacyClient, ProxyProcess
from tests.images import ImageSet
from tests.legacy_helpers import (
    SKOPEO,
    Call,
    blob_path,
    exchange_raw,
    image_manifest_descriptor,
    layers_of,
    machine_architecture,
    read_json_blob,
    record,
    top_descriptor,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        shutil.which("skopeo") is None,
        reason="skopeo is not installed: nothing to compare against",
    ),
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SKOPEO_VERSION = "0.2.3"
OUR_VERSION = "0.2.9"

Steps = Callable[[LegacyClient], Awaitable[list[Call]]]

# skopeo 1.9's wording -> the current reference's (see the module docstring).
_REWORDED_PREFIXES = {"expecting integer imageid, not ": "expecting numeric, not "}
_REWORDED = {"no image 0": "invalid imageid value of zero"}


async def run_on(command: list[str] | None, steps: Steps) -> list[Call]:
    async with ProxyProcess.spawn(["--insecure-policy"], command=command) as proxy:
        return await steps(proxy.legacy)


async def transcripts(steps: Steps) -> tuple[list[Call], list[Call]]:
    """(skopeo's transcript, ours) for the same calls."""
    return await run_on(SKOPEO, steps), await run_on(None, steps)


def _comparable(call: Call, version: str, reworded: bool) -> Call:
    call = call.normalised()
    if call.method == "Initialize" and call.success:
        assert call.value == version
        call = replace(call, value="0.2.x")
    if reworded:
        error = _REWORDED.get(call.error, call.error)
        for old, new in _REWORDED_PREFIXES.items():
            if error.startswith(old):
                error = new + error.removeprefix(old)
        call = replace(call, error=error)
    return call


def assert_same(theirs: list[Call], ours: list[Call]) -> None:
    assert [_comparable(call, OUR_VERSION, False) for call in ours] == [
        _comparable(call, SKOPEO_VERSION, True) for call in theirs
    ]


def initialized(*more: Steps) -> Steps:
    """Initialize, then run each of ``more`` in turn."""

    async def steps(client: LegacyClient) -> list[Call]:
        calls = [await record(client, "Initialize")]
        for step in more:
            calls += await step(client)
        return calls

    return steps


def calls(*requests: tuple[Any, ...]) -> Steps:
    """Make each ``(method, *args)`` request in turn."""

    async def steps(client: LegacyClient) -> list[Call]:
        return [await record(client, *request) for request in requests]

    return steps


# --- Initialize, dispatch, framing ---------------------------------------------


async def test_initialize_returns_the_version_then_refuses_a_second_call() -> None:
    theirs, ours = await transcripts(calls(("Initialize",), ("Initialize",)))
    assert ours[1].error == "already initialized"
    assert_same(theirs, ours)


async def test_calls_before_initialize_are_refused_but_finish_pipe_is_not_gated(
    test_images: ImageSet,
) -> None:
    theirs, ours = await transcripts(
        calls(
            ("OpenImage", test_images["basic"].reference),
            ("GetManifest", 1),
            ("CloseImage", 1),
            ("GetBlob", 1, "sha256:" + "0" * 64, 1),
            ("FinishPipe", 5),
            ("Initialize",),
        )
    )
    assert ours[0].error == "client error: must invoke Initialize"
    assert ours[4].error == "finishpipe: no active pipe 5"
    assert ours[5].success
    assert_same(theirs, ours)


async def test_unknown_method_is_an_error_and_the_session_goes_on() -> None:
    theirs, ours = await transcripts(
        initialized(calls(("NoSuchMethod", 1), ("Initialize",)))
    )
    assert ours[1].error == "unknown method: NoSuchMethod"
    assert_same(theirs, ours)


async def test_malformed_request_packets_are_errors_and_the_session_goes_on() -> None:
    packets = [b"{not json", b"[]", b'{"method": 5, "args": []}']
    replies: dict[str, list[dict[str, Any]]] = {}
    for name, command in (("skopeo", SKOPEO), ("ours", None)):
        async with ProxyProcess.spawn(["--insecure-policy"], command=command) as proxy:
            replies[name] = [
                await exchange_raw(proxy.legacy, packet) for packet in packets
            ]
            after = await record(proxy.legacy, "Initialize")
            assert after.success, name
    for reply in replies["skopeo"] + replies["ours"]:
        assert reply["success"] is False
        assert reply["value"] is None
        assert reply["pipeid"] == 0
        assert reply["error"].startswith("invalid request: ")


# --- OpenImage, CloseImage ---------------------------------------------------------


def _open_image_args(test_images: ImageSet, case: str) -> tuple[Any, ...]:
    basic = test_images["basic"].path
    return {
        "good-ref": (f"oci:{basic}:latest",),
        "missing-ref": (f"oci:{basic}:no-such-tag",),
        "missing-directory": (f"oci:{basic.parent / 'no-such-layout'}:latest",),
        "missing-parent": (f"oci:{basic.parent / 'no-such-dir' / 'layout'}:latest",),
        "unknown-transport": ("bogus-transport:whatever",),
        "no-colon": ("no-transport-here",),
        "non-string": (42,),
        "no-args": (),
        "two-args": (f"oci:{basic}:latest", "extra"),
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "good-ref",
        "missing-ref",
        "missing-directory",
        "missing-parent",
        "unknown-transport",
        "no-colon",
        "non-string",
        "no-args",
        "two-args",
    ],
)
async def test_open_image_answers_like_skopeo(test_images: ImageSet, case: str) -> None:
    args = _open_image_args(test_images, case)
    theirs, ours = await transcripts(initialized(calls(("OpenImage", *args))))
    assert ours[1].success == (case == "good-ref")
    assert_same(theirs, ours)


@pytest.mark.parametrize(
    ("image_id", "closes"),
    [
        pytest.param(1, True, id="open"),
        pytest.param(99, False, id="unknown"),
        pytest.param(0, False, id="zero"),
        pytest.param("1", False, id="string"),
        pytest.param(True, False, id="bool"),
        pytest.param(None, False, id="null"),
    ],
)
async def test_close_image_answers_like_skopeo(
    test_images: ImageSet, image_id: Any, closes: bool
) -> None:
    theirs, ours = await transcripts(
        initialized(
            calls(
                ("OpenImage", test_images["basic"].reference),
                ("CloseImage", image_id),
                # A closed image is gone.
                ("CloseImage", image_id),
            )
        )
    )
    assert ours[2].success == closes
    assert not ours[3].success
    assert_same(theirs, ours)


async def test_close_image_texts_follow_the_current_reference(
    test_images: ImageSet,
) -> None:
    """The two texts normalised above, asserted as we send them."""
    ours = await run_on(
        None,
        initialized(
            calls(
                ("OpenImage", test_images["basic"].reference),
                ("CloseImage", "1"),
                ("CloseImage", 0),
            )
        ),
    )
    assert [call.error for call in ours[2:]] == [
        "expecting numeric, not string",
        "invalid imageid value of zero",
    ]


# --- manifests and configs -----------------------------------------------------


def _reference(test_images: ImageSet, name: str) -> str:
    # skopeo 1.9 finds a lone Docker manifest only without a reference name.
    if name == "docker-v2s2":
        return f"oci:{test_images[name].path}"
    return test_images[name].reference


def _image_calls(reference: str, *requests: tuple[Any, ...]) -> Steps:
    return initialized(calls(("OpenImage", reference), *requests))


@pytest.mark.parametrize(
    "name", ["basic", "zstd", "uncompressed", "multiarch", "docker-v2s2"]
)
async def test_manifest_and_configs_match_skopeo_byte_for_byte(
    test_images: ImageSet, name: str
) -> None:
    theirs, ours = await transcripts(
        _image_calls(
            _reference(test_images, name),
            ("GetManifest", 1),
            ("GetConfig", 1),
            ("GetFullConfig", 1),
        )
    )
    assert_same(theirs, ours)

    manifest, config, full_config = ours[2:]
    for call in (manifest, config, full_config):
        assert call.has_pipe and call.fd_count == 1 and call.finish
        assert call.finish.success
    assert config.value is None and full_config.value is None

    layout = test_images[name].path
    descriptor = image_manifest_descriptor(layout)
    assert manifest.value == descriptor["digest"]
    assert manifest.payload is not None
    assert json.loads(manifest.payload)["mediaType"] == OCI_MANIFEST
    if descriptor["mediaType"] == OCI_MANIFEST:
        assert manifest.payload == blob_path(layout, descriptor["digest"]).read_bytes()


async def test_multiarch_resolves_to_this_machines_instance(
    test_images: ImageSet,
) -> None:
    layout = test_images["multiarch"].path
    nested = read_json_blob(layout, top_descriptor(layout)["digest"])
    (instance,) = [
        entry
        for entry in nested["manifests"]
        if entry["platform"]["architecture"] == machine_architecture()
    ]
    theirs, ours = await transcripts(
        _image_calls(test_images["multiarch"].reference, ("GetManifest", 1))
    )
    assert_same(theirs, ours)
    assert ours[2].value == instance["digest"]
    assert ours[2].payload == blob_path(layout, instance["digest"]).read_bytes()


async def test_docker_schema2_is_converted_but_keeps_its_digest(
    test_images: ImageSet,
) -> None:
    layout = test_images["docker-v2s2"].path
    stored = top_descriptor(layout)
    theirs, ours = await transcripts(
        _image_calls(_reference(test_images, "docker-v2s2"), ("GetManifest", 1))
    )
    assert_same(theirs, ours)
    assert ours[2].value == stored["digest"]
    assert ours[2].payload is not None
    converted = json.loads(ours[2].payload)
    assert converted["mediaType"] == OCI_MANIFEST
    original = read_json_blob(layout, stored["digest"])
    assert [layer["digest"] for layer in converted["layers"]] == [
        layer["digest"] for layer in original["layers"]
    ]


# --- blobs ------------------------------------------------------------------------


async def test_get_blob_streams_the_layer_verified(test_images: ImageSet) -> None:
    (layer,) = layers_of(test_images["basic"].path)
    theirs, ours = await transcripts(
        _image_calls(
            test_images["basic"].reference,
            ("GetBlob", 1, layer["digest"], layer["size"]),
        )
    )
    assert_same(theirs, ours)
    blob = ours[2]
    assert blob.value == layer["size"]
    assert blob.payload is not None and blob.finish is not None
    assert "sha256:" + hashlib.sha256(blob.payload).hexdigest() == layer["digest"]
    assert blob.finish.success


@pytest.mark.parametrize(
    "digest",
    ["sha256:zz", "md5:d41d8cd98f00b204e9800998ecf8427e", "nocolon"],
)
async def test_get_blob_refuses_a_malformed_digest(
    test_images: ImageSet, digest: str
) -> None:
    theirs, ours = await transcripts(
        _image_calls(test_images["basic"].reference, ("GetBlob", 1, digest, 10))
    )
    assert not ours[2].success
    assert_same(theirs, ours)


async def test_get_blob_of_a_missing_blob_names_the_file(
    test_images: ImageSet,
) -> None:
    missing = "sha256:" + "0" * 64
    theirs, ours = await transcripts(
        _image_calls(test_images["basic"].reference, ("GetBlob", 1, missing, 10))
    )
    assert_same(theirs, ours)
    assert str(blob_path(test_images["basic"].path, missing)) in ours[2].error


async def test_get_blob_of_a_corrupt_blob_fails_at_finish_pipe(
    test_images: ImageSet,
) -> None:
    layout = test_images["corrupt"].path
    (layer,) = layers_of(layout)
    theirs, ours = await transcripts(
        _image_calls(
            test_images["corrupt"].reference,
            ("GetBlob", 1, layer["digest"], layer["size"]),
        )
    )
    assert_same(theirs, ours)
    blob = ours[2]
    assert blob.success
    assert blob.payload == blob_path(layout, layer["digest"]).read_bytes()
    assert blob.finish is not None
    assert not blob.finish.success
    assert blob.finish.error == f"corrupted blob, expecting {layer['digest']}"


async def test_finish_pipe_of_an_unknown_id_is_an_error() -> None:
    theirs, ours = await transcripts(initialized(calls(("FinishPipe", 4242))))
    assert ours[1].error == "finishpipe: no active pipe 4242"
    assert_same(theirs, ours)
