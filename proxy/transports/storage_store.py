"""A containers-storage store on disk, read the way its readers read it.

What we read (overlay shown; vfs uses ``vfs-`` and ``vfs/dir/ID``):

- ``ROOT/overlay-images/images.json`` under a shared lock on ``images.lock``:
  images with their names, top layer and big data (manifests, the config);
  each big-data item is a file in ``ROOT/overlay-images/ID/``;
- ``ROOT/overlay-layers/layers.json`` under a shared lock on ``layers.lock``:
  layers with their parent, diff digest and size; the layer's files are in
  ``ROOT/overlay/ID/diff/`` and its tar-split in
  ``ROOT/overlay-layers/ID.tar-split.gz``.

Locks: containers-storage guards each of those files with a whole-file
``fcntl`` record lock (read lock for readers, write lock for writers). We take
*open file description* locks (``F_OFD_SETLK``) on the same byte range: the
kernel makes them conflict with the classic record locks podman takes, and,
unlike those, closing one of our fds never drops a lock another of our
streams still holds. fcntl has no wait with a deadline, so a lock held by a
writer is retried with sleeps growing from 10 ms to 200 ms until
``lock_timeout`` runs out; then we fail naming the lock file. We never write
to the store and never create a file in it; its lock files must exist.

Known shortcomings: additional image stores, layers stored only through
composefs or a TOC (partial pulls), and drivers other than overlay and vfs
are refused or not found, with a message saying so.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import os
import re
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import msgspec

from protocol.errors import ClientError, SourceError, UnsupportedError

#: Seconds to wait for a store lock held by a writer; the environment variable
#: overrides it (a podman pull can hold the layer store for minutes).
LOCK_TIMEOUT_ENV = "IMAGE_PROXY_STORAGE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 300.0

SUPPORTED_DRIVERS = ("overlay", "vfs")
DRIVER_ALIASES = {"overlay2": "overlay"}

_HEX64 = re.compile(r"[0-9a-f]{64}")


# --- where the store is ---------------------------------------------------------


@dataclass(frozen=True)
class StoreLocation:
    """A store's driver and directories, as a reference or storage.conf names them."""

    driver: str
    root: Path
    run_root: Path | None
    options: tuple[str, ...] = ()

    def spec(self) -> str:
        """The bracketed form skopeo prints: ``[driver@root+runroot:options]``."""
        text = f"{self.driver}@{self.root}"
        if self.run_root is not None:
            text += f"+{self.run_root}"
        if self.options:
            text += ":" + ",".join(self.options)
        return f"[{text}]"


def split_store_spec(reference: str) -> tuple[StoreLocation | None, str]:
    """Peel ``[DRIVER@ROOT+RUNROOT:OPTIONS]`` off a reference.

    Returns None for the location when the reference has no bracket part.
    Both paths must be absolute, as containers/image requires.
    """
    if not reference.startswith("["):
        return None, reference
    close = reference.find("]")
    if close < 1:
        raise ClientError(f'store specifier in "{reference}" did not end')
    spec, rest = reference[1:close], reference[close + 1 :]
    driver, at, spec_rest = spec.partition("@")
    if not at:
        driver, spec_rest = "", driver
    if at and not driver:
        raise ClientError(f'store specifier "[{spec}]" has an empty driver')
    if not spec_rest:
        raise ClientError(f'store specifier "[{spec}]" has no graph root')
    paths, _, options_text = spec_rest.partition(":")
    root_text, _, run_root_text = paths.partition("+")
    for path in (root_text, run_root_text):
        if path and not os.path.isabs(path):
            raise ClientError(f'store path "{path}" in "[{spec}]" is not absolute')
    options = tuple(options_text.split(",")) if options_text else ()
    default = default_store_location() if not root_text or not driver else None
    root = Path(root_text) if root_text else _root_of(default)
    location = StoreLocation(
        driver=_check_driver(driver or detect_driver(root, default)),
        root=root,
        run_root=Path(run_root_text) if run_root_text else None,
        options=options,
    )
    return location, rest


def _root_of(default: StoreLocation | None) -> Path:
    assert default is not None
    return default.root


def _check_driver(driver: str) -> str:
    driver = DRIVER_ALIASES.get(driver, driver)
    if driver not in SUPPORTED_DRIVERS:
        raise UnsupportedError(
            f'storage driver "{driver}" is not supported: only overlay and vfs '
            "stores can be read"
        )
    return driver


def detect_driver(root: Path, configured: StoreLocation | None) -> str:
    """The driver of a store when the reference names none.

    containers-storage prefers ``$STORAGE_DRIVER``, then storage.conf, then a
    driver whose directories already exist under the root.
    """
    from_env = os.environ.get("STORAGE_DRIVER")
    if from_env:
        return from_env
    if configured is not None and configured.driver:
        return configured.driver
    for driver in SUPPORTED_DRIVERS:
        if (root / f"{driver}-layers").is_dir():
            return driver
    return "overlay"


def configured_store_location() -> StoreLocation:
    """The store a reference without a bracket part names, driver resolved."""
    configured = default_store_location()
    return StoreLocation(
        driver=_check_driver(detect_driver(configured.root, configured)),
        root=configured.root,
        run_root=configured.run_root,
    )


def _is_rootless() -> bool:
    return os.geteuid() != 0


def storage_conf_path() -> Path | None:
    """The storage.conf containers-storage would read, if any exists."""
    explicit = os.environ.get("CONTAINERS_STORAGE_CONF")
    if explicit:
        return Path(explicit)
    candidates: list[Path] = []
    if _is_rootless():
        config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        candidates.append(Path(config_home) / "containers" / "storage.conf")
    candidates += [
        Path("/etc/containers/storage.conf"),
        Path("/usr/share/containers/storage.conf"),
    ]
    return next((path for path in candidates if path.is_file()), None)


def _expand(path: str) -> str:
    # storage.conf allows $HOME and $UID in rootless_storage_path.
    return path.replace("$HOME", str(Path.home())).replace("$UID", str(os.getuid()))


def default_store_location() -> StoreLocation:
    """The store used when a reference has no bracket part.

    Read from storage.conf (``CONTAINERS_STORAGE_CONF``, the rootless user's
    ``~/.config/containers/storage.conf``, ``/etc/containers/storage.conf``),
    falling back to containers-storage's default paths for root and for
    rootless users.
    """
    settings: dict[str, object] = {}
    conf = storage_conf_path()
    if conf is not None:
        try:
            parsed = tomllib.loads(conf.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SourceError(f"reading storage configuration {conf}: {exc}") from None
        section = parsed.get("storage", {})
        if isinstance(section, dict):
            settings = section
    user_file = conf is not None and conf.is_relative_to(Path.home())
    root, run_root = _default_paths()
    graphroot = settings.get("graphroot")
    runroot = settings.get("runroot")
    rootless_path = settings.get("rootless_storage_path")
    if (
        _is_rootless()
        and not user_file
        and not os.environ.get("CONTAINERS_STORAGE_CONF")
    ):
        # A system-wide file describes root's store; rootless users keep
        # their own unless it names a rootless path.
        graphroot = rootless_path
        runroot = None
    if isinstance(graphroot, str) and graphroot:
        root = Path(_expand(graphroot))
    if isinstance(runroot, str) and runroot:
        run_root = Path(_expand(runroot))
    driver = settings.get("driver")
    return StoreLocation(
        driver=driver if isinstance(driver, str) else "", root=root, run_root=run_root
    )


def _default_paths() -> tuple[Path, Path]:
    if not _is_rootless():
        return Path("/var/lib/containers/storage"), Path("/run/containers/storage")
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return (
        Path(data_home) / "containers" / "storage",
        Path(runtime_dir) / "containers",
    )


# --- locks ----------------------------------------------------------------------


class _Flock(ctypes.Structure):
    # struct flock as Linux lays it out on 64-bit and LFS builds.
    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    ]


def lock_timeout() -> float:
    text = os.environ.get(LOCK_TIMEOUT_ENV)
    if not text:
        return DEFAULT_LOCK_TIMEOUT
    try:
        return max(0.0, float(text))
    except ValueError:
        raise ClientError(
            f"{LOCK_TIMEOUT_ENV}={text!r} is not a number of seconds"
        ) from None


class SharedLock:
    """A held read lock on one of the store's lock files; ``release`` once."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"opening store lock {path}: {exc.strerror}") from None
        try:
            self._acquire(timeout)
        except BaseException:
            self.release()
            raise

    def _acquire(self, timeout: float) -> None:
        assert self._fd is not None
        request = bytes(_Flock(l_type=fcntl.F_RDLCK, l_whence=os.SEEK_SET))
        deadline = time.monotonic() + timeout
        pause = 0.01
        while True:
            try:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, request)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise SourceError(
                        f"locking store lock {self.path}: {exc.strerror}"
                    ) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SourceError(
                    f"timed out after {timeout:g} s waiting for a read lock on "
                    f"{self.path}: another process is writing to the store "
                    f"(raise {LOCK_TIMEOUT_ENV} to wait longer)"
                )
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.2)

    def release(self) -> None:
        # Closing our own open file description drops its OFD lock.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextmanager
def shared_lock(path: Path, timeout: float) -> Iterator[SharedLock]:
    lock = SharedLock(path, timeout)
    try:
        yield lock
    finally:
        lock.release()


# --- records --------------------------------------------------------------------


class ImageRecord(msgspec.Struct, rename="kebab"):
    """One entry of images.json."""

    id: str
    digest: str = ""
    names: list[str] = msgspec.field(default_factory=list)
    layer: str = ""
    big_data_names: list[str] = msgspec.field(default_factory=list)
    big_data_digests: dict[str, str] = msgspec.field(default_factory=dict)

    def manifest_digests(self) -> set[str]:
        """Digests of every manifest stored with the image."""
        found = {self.digest} if self.digest else set()
        for key, value in self.big_data_digests.items():
            if key == "manifest" or key.startswith("manifest-"):
                found.add(value)
        return found


class LayerRecord(msgspec.Struct, rename="kebab"):
    """One entry of layers.json."""

    id: str
    parent: str = ""
    diff_digest: str = ""
    diff_size: int = -1
    compressed_diff_digest: str = ""
    compressed_size: int = -1
    toc_digest: str = ""


_R = TypeVar("_R", ImageRecord, LayerRecord)

_images_decoder = msgspec.json.Decoder(list[ImageRecord])
_layers_decoder = msgspec.json.Decoder(list[LayerRecord])


def big_data_file_name(key: str) -> str:
    """The file name containers-storage gives a big-data item.

    Keys made only of ``.``, digits and lower-case letters are used as they
    are; others become ``=`` plus their base64. Like containers-storage, a
    key whose only unusual character is its last one stays plain.
    """
    for position, char in enumerate(key):
        if char != "." and not ("0" <= char <= "9") and not ("a" <= char <= "z"):
            if position < len(key) - 1:
                return "=" + base64.b64encode(key.encode()).decode("ascii")
            break
    return key


@dataclass
class Store:
    """One store, read-only. Methods block: call them from worker threads."""

    location: StoreLocation
    lock_timeout: float = field(default_factory=lock_timeout)

    @property
    def driver(self) -> str:
        return self.location.driver

    @property
    def images_dir(self) -> Path:
        return self.location.root / f"{self.driver}-images"

    @property
    def layers_dir(self) -> Path:
        return self.location.root / f"{self.driver}-layers"

    @property
    def layers_lock_path(self) -> Path:
        return self.layers_dir / "layers.lock"

    def content_dir(self, layer_id: str) -> Path:
        """Where the driver keeps a layer's unpacked files."""
        _check_id(layer_id)
        if self.driver == "vfs":
            return self.location.root / "vfs" / "dir" / layer_id
        return self.location.root / "overlay" / layer_id / "diff"

    def tar_split_path(self, layer_id: str) -> Path:
        _check_id(layer_id)
        return self.layers_dir / f"{layer_id}.tar-split.gz"

    def images(self) -> list[ImageRecord]:
        path = self.images_dir / "images.json"
        with shared_lock(self.images_dir / "images.lock", self.lock_timeout):
            return _decode_records(path, _images_decoder)

    def layers(self) -> dict[str, LayerRecord]:
        """layers.json by layer ID, read under the layer store's read lock."""
        with shared_lock(self.layers_lock_path, self.lock_timeout):
            return self.layers_locked()

    def layers_locked(self) -> dict[str, LayerRecord]:
        """layers.json by layer ID; the caller holds the layer store's lock."""
        records = _decode_records(self.layers_dir / "layers.json", _layers_decoder)
        return {record.id: record for record in records}

    def big_data(self, image: ImageRecord, key: str) -> bytes | None:
        """A big-data item of an image, or None when the image has no such key."""
        if key not in image.big_data_names:
            return None
        _check_id(image.id)
        path = self.images_dir / image.id / big_data_file_name(key)
        with shared_lock(self.images_dir / "images.lock", self.lock_timeout):
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise SourceError(
                    f"reading {key} of image {image.id}: {exc.strerror}"
                ) from None

    def layer_chain(
        self, top: str, layers: dict[str, LayerRecord]
    ) -> list[LayerRecord]:
        """The layers of an image, base first, following ``parent`` links."""
        chain: list[LayerRecord] = []
        layer_id = top
        while layer_id:
            record = layers.get(layer_id)
            if record is None:
                raise SourceError(
                    f"layer {layer_id} is missing from {self.layers_dir}/layers.json"
                )
            if len(chain) > len(layers):
                raise SourceError(f"the parents of layer {top} form a loop")
            chain.append(record)
            layer_id = record.parent
        chain.reverse()
        return chain


def _check_id(identifier: str) -> None:
    # IDs become path components: anything but 64 hex digits could climb.
    if not _HEX64.fullmatch(identifier):
        raise SourceError(f"the store names an invalid ID {identifier!r}")


def _decode_records(path: Path, decoder: msgspec.json.Decoder[list[_R]]) -> list[_R]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SourceError(f"reading {path}: {exc.strerror}") from None
    if not raw.strip():
        return []
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise SourceError(f"{path} is malformed: {exc}") from None
