"""Where each transport lives; its module is imported on first use.

Importing a transport module registers it. Loading lazily keeps start-up
cheap: the docker transport alone pulls in httpx, about 100 ms, which a
consumer opening an ``oci:`` layout should not pay.
"""

from __future__ import annotations

import importlib

MODULES = {
    "oci": "proxy.transports.oci_layout",
    "oci-archive": "proxy.transports.oci_archive",
    "docker": "proxy.transports.docker",
    "docker-archive": "proxy.transports.docker_archive",
    "dir": "proxy.transports.dir",
    "containers-storage": "proxy.transports.storage",
}


def load(name: str) -> bool:
    """Import the module of transport ``name``; False if there is none."""
    module = MODULES.get(name)
    if module is None:
        return False
    importlib.import_module(module)
    return True


def load_all() -> None:
    for name in MODULES:
        load(name)
