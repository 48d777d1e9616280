"""Start-up: turn command-line settings into a running proxy."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from protocol.image import PlatformWanted
from proxy.api import ApiShared, serve_api
from proxy.legacy_server import SessionOptions, serve_legacy
from proxy.policy import Policy
from proxy.transports.base import SystemContext

log = logging.getLogger("image-proxy")


def platform_for(context: SystemContext) -> PlatformWanted:
    machine = PlatformWanted.of_machine()
    return PlatformWanted(
        os=context.override_os or machine.os,
        architecture=context.override_arch or machine.architecture,
        variant=context.override_variant
        if context.override_variant is not None
        else ("" if context.override_arch else machine.variant),
    )


def session_options(
    context: SystemContext,
    policy_path: str | None,
    insecure_policy: bool,
    stall_timeout: float,
    cache_dir: Path | None,
) -> SessionOptions:
    policy = Policy.insecure() if insecure_policy else Policy.load(policy_path)
    options = SessionOptions(
        context, policy, stall_timeout=stall_timeout, platform=platform_for(context)
    )
    options.open_rpc = rpc_opener(options, cache_dir)
    return options


def rpc_opener(
    options: SessionOptions, cache_dir: Path | None
) -> Callable[[socket.socket], Coroutine[Any, Any, None]]:
    shared = ApiShared(options, cache_dir)

    async def open_rpc(sock: socket.socket) -> None:
        # A bug in one jsonrpc connection must end that connection only, not
        # the legacy session and every other connection with it.
        try:
            await serve_api(sock, shared)
        except Exception:
            log.exception("jsonrpc-fdpass connection failed")
            sock.close()

    return open_rpc


async def run_legacy(
    sockfd: int,
    context: SystemContext,
    policy_path: str | None,
    insecure_policy: bool,
    stall_timeout: float,
    cache_dir: Path | None,
) -> None:
    options = session_options(
        context, policy_path, insecure_policy, stall_timeout, cache_dir
    )
    await serve_legacy(sockfd, options)
