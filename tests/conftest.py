"""Shared fixtures: the anyio backend and the test images."""

import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.images import (
    MAKE_TEST_IMAGES,
    DebianImage,
    ImageSet,
    images_dir,
    read_debian_image,
)
from tests.storage import (
    DRIVERS,
    SYNTHETIC_IMAGES,
    ContainerStore,
    make_store,
    unmount_driver_home,
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


# --- containers-storage stores (written by skopeo, see tests/storage.py) -----


@pytest.fixture(scope="session")
def synthetic_stores(
    test_images: ImageSet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ContainerStore]]:
    """An overlay and a vfs store holding the synthetic edge-case images."""
    layouts = {name: (test_images.path(name), "latest") for name in SYNTHETIC_IMAGES}
    stores = {
        driver: make_store(driver, tmp_path_factory.mktemp(driver), layouts)
        for driver in DRIVERS
    }
    yield stores
    # skopeo reading a store in a test mounts the driver's home again.
    for store in stores.values():
        unmount_driver_home(store)


@pytest.fixture(scope="session")
def debian_stores(
    debian_image: DebianImage, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ContainerStore]:
    """An overlay and a vfs store holding the Debian image as ``debian``."""
    layouts = {"debian": (debian_image.path, debian_image.ref)}
    return {
        driver: make_store(driver, tmp_path_factory.mktemp(f"debian-{driver}"), layouts)
        for driver in DRIVERS
    }
