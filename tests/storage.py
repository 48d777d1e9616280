"""Real containers-storage stores for the tests, written by Debian's skopeo.

A store is made with ``skopeo copy oci:LAYOUT:REF
'containers-storage:[DRIVER@ROOT+RUNROOT]localhost/NAME:REF'`` (as root; the
overlay driver needs no mount to import). Expected values are read straight
from the store's JSON files and directories here, never through the proxy.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: The synthetic images every test store holds, with their edge cases:
#: hardlinks and symlinks (basic), whiteouts and opaque directories
#: (whiteouts), PAX and GNU long names (longnames), empty layers (empty-layer).
SYNTHETIC_IMAGES = ("basic", "whiteouts", "longnames", "empty-layer")
DRIVERS = ("overlay", "vfs")


def require_store_tools() -> None:
    """Skip unless skopeo can write a store here (it must run as root)."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed: cannot make a containers-storage store")
    if os.geteuid() != 0:
        pytest.skip("skopeo must run as root to write a containers-storage store")


@dataclass
class ContainerStore:
    """A store on disk and the images copied into it (name -> tag)."""

    driver: str
    root: Path
    run_root: Path
    images: dict[str, str] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"[{self.driver}@{self.root}+{self.run_root}]"

    def reference(self, name: str) -> str:
        """``containers-storage:[...]localhost/NAME:TAG`` of a copied image."""
        return self.reference_to(f"localhost/{name}:{self.images[name]}")

    def reference_to(self, ref: str) -> str:
        """``containers-storage:[...]REF`` for any REF."""
        return f"containers-storage:{self.spec}{ref}"

    def add(self, name: str, layout: Path, tag: str) -> None:
        """Copy ``oci:layout:tag`` into the store with Debian's skopeo."""
        destination = f"containers-storage:{self.spec}localhost/{name}:{tag}"
        result = subprocess.run(
            ["skopeo", "copy", "--quiet", f"oci:{layout}:{tag}", destination],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.fail(
                f"skopeo copy into {destination} failed: {result.stderr}",
                pytrace=False,
            )
        self.images[name] = tag
        unmount_driver_home(self)

    # -- the store's own records, read by hand ----------------------------------

    def images_json(self) -> list[dict[str, Any]]:
        path = self.root / f"{self.driver}-images" / "images.json"
        records: list[dict[str, Any]] = json.loads(path.read_text())
        return records

    def layers_json(self) -> dict[str, dict[str, Any]]:
        path = self.root / f"{self.driver}-layers" / "layers.json"
        return {layer["id"]: layer for layer in json.loads(path.read_text())}

    def image(self, name: str) -> dict[str, Any]:
        wanted = f"localhost/{name}:{self.images[name]}"
        return next(i for i in self.images_json() if wanted in i["names"])

    def layer_chain(self, name: str) -> list[dict[str, Any]]:
        """The image's layers, base first, by following ``parent``."""
        layers = self.layers_json()
        chain = []
        layer_id = self.image(name)["layer"]
        while layer_id:
            chain.append(layers[layer_id])
            layer_id = layers[layer_id].get("parent", "")
        return chain[::-1]

    def content_dir(self, layer_id: str) -> Path:
        if self.driver == "vfs":
            return self.root / "vfs" / "dir" / layer_id
        return self.root / "overlay" / layer_id / "diff"

    def tar_split(self, layer_id: str) -> Path:
        return self.root / f"{self.driver}-layers" / f"{layer_id}.tar-split.gz"

    @property
    def layers_lock(self) -> Path:
        return self.root / f"{self.driver}-layers" / "layers.lock"

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the layer store's lock as a writer does: an fcntl write lock
        on the whole of ``layers.lock`` (containers-storage's lockfile)."""
        with self.layers_lock.open("r+b") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(lock, fcntl.LOCK_UN)


def make_store(
    driver: str, directory: Path, layouts: dict[str, tuple[Path, str]]
) -> ContainerStore:
    """A new store under ``directory`` holding ``name -> (layout, tag)``."""
    require_store_tools()
    store = ContainerStore(driver, directory / "root", directory / "run")
    for name, (layout, tag) in layouts.items():
        store.add(name, layout, tag)
    return store


def mount_points() -> set[str]:
    """Mount points of this mount namespace, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as mountinfo:
        # Field 5 is the mount point, with spaces and such escaped in octal.
        return {line.split()[4].encode().decode("unicode_escape") for line in mountinfo}


def unmount_driver_home(store: ContainerStore) -> None:
    """Undo the private bind mount the overlay driver puts on ROOT/overlay.

    containers-storage mounts the driver's home on itself the first time it
    is used and leaves it there; the tests unmount it so their temporary
    directories can be removed.
    """
    home = store.root / store.driver
    while str(home) in mount_points():
        subprocess.run(["umount", str(home)], check=True, capture_output=True)
