"""Shared fixtures: the anyio backend and the test images."""

import shutil
import subprocess
import sys

import pytest

from tests.images import (
    MAKE_TEST_IMAGES,
    DebianImage,
    ImageSet,
    images_dir,
    read_debian_image,
)


@pytest.fixture
def anyio_backend() -> str:
    # The proxy runs on asyncio in production; test on what ships.
    return "asyncio"


# --- test images (built by scripts/make-test-images, see tests/images.py) ----


def _make_test_images(*args: str) -> None:
    command = [sys.executable, str(MAKE_TEST_IMAGES), str(images_dir()), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed with status {result.returncode}:\n"
            f"{result.stdout}{result.stderr}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def test_images() -> ImageSet:
    """The synthetic OCI layouts, built once into ``$IMAGE_PROXY_TEST_IMAGES``
    (default ``<repo>/test-images``); index by name: ``test_images["basic"]``.
    """
    _make_test_images("--no-debian")
    return ImageSet(images_dir())


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    """The Debian bookworm minbase layout, its layer digest, diffID and the
    rootfs tar it was packed from; skipped when mmdebstrap is missing."""
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed: cannot build the Debian image")
    _make_test_images("--only", "debian")
    return read_debian_image(images_dir())
