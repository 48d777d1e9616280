"""Importing a transport module registers it; this loads all of them."""

from __future__ import annotations


def load_all() -> None:
    from proxy.transports import (  # noqa: F401
        dir,
        docker,
        docker_archive,
        oci_archive,
        oci_layout,
        storage,  # noqa: F401
    )
