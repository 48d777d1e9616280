"""``image-proxy experimental-image-proxy``: the server's own command line.

Consumers spawn the proxy once per operation, so its start-up is on their
critical path. This parser uses argparse, not typer: typer with click and
rich costs about 200 ms to import, longer than the rest of start-up together.

It accepts the flags clients pass to skopeo, before or after the subcommand
as skopeo's global flags allow. A flag is honoured, kept for a transport that
uses it, or refused with its name: never silently ignored.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

COMMAND = "experimental-image-proxy"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"image-proxy: {message}\n")


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "t"):
        return True
    if lowered in ("false", "0", "f"):
        return False
    raise argparse.ArgumentTypeError(f"--tls-verify takes true or false, not {text!r}")


def _fd_number(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sockfd takes an fd number, not {text!r}"
        ) from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"--sockfd takes an fd number, not {number}")
    return number


def parser() -> argparse.ArgumentParser:
    parsed = _Parser(
        prog=f"image-proxy {COMMAND}",
        description="Serve skopeo's image proxy protocol on an inherited socket.",
    )
    parsed.add_argument("command", choices=[COMMAND], help=argparse.SUPPRESS)
    add = parsed.add_argument
    add("--sockfd", type=_fd_number, default=0, help="serve on this fd (default 0)")
    add("--debug", action="store_true", help="log each request to stderr")
    add("--policy", help="signature policy file")
    add("--insecure-policy", action="store_true", help="skip the policy check")
    add("--authfile", help="registry credentials file (auth.json)")
    add("--creds", help="USER[:PASSWORD] for the registry")
    add("--username")
    add("--password")
    add("--registry-token", help="bearer token for the registry")
    add("--no-creds", action="store_true", help="access the registry anonymously")
    add("--cert-dir", help="CA and client certificates for the registry")
    add(
        "--tls-verify",
        nargs="?",
        const=True,
        type=_boolean,
        help="false: allow plain HTTP and unverified TLS",
    )
    add("--shared-blob-dir", help="blobs of oci: layouts live here")
    add("--daemon-host", help="refused: there is no docker-daemon transport")
    add("--decryption-key", action="append", help="refused: layers are not decrypted")
    add("--override-arch")
    add("--override-os")
    add("--override-variant")
    add("--registries-conf", help="registries.conf to use")
    add("--user-agent-prefix")
    # Accepted for compatibility; they change nothing here.
    add("--tmpdir", help=argparse.SUPPRESS)
    add("--command-timeout", help=argparse.SUPPRESS)
    add(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="seconds a blob transfer may make no progress before FinishPipe "
        "fails it with a retryable error (default 60)",
    )
    add("--cache-dir", type=Path, help="where unpacked layers are kept")
    return parsed


def _refuse(flag: str, why: str) -> int:
    print(f"image-proxy: {flag} is not supported: {why}", file=sys.stderr)
    return 2


def run(argv: list[str]) -> int:
    """Parse ``argv`` (without the program name) and serve; the exit status."""
    options = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.debug else logging.WARNING,
        stream=sys.stderr,
        format="image-proxy: %(levelname)s %(message)s",
    )
    if options.decryption_key:
        return _refuse("--decryption-key", "image-proxy does not decrypt layers yet")
    if options.daemon_host:
        return _refuse("--daemon-host", "the docker-daemon: transport is not available")
    if options.password and not options.username:
        return _refuse("--password", "it needs --username")
    if options.registries_conf:
        # The docker transport reads registries.conf from this variable; the
        # flag, as in skopeo, names the file for this process only.
        os.environ["CONTAINERS_REGISTRIES_CONF"] = options.registries_conf

    import anyio

    from protocol.errors import ImageProxyError
    from proxy.server import run_legacy
    from proxy.transports.base import SystemContext

    context = SystemContext(
        authfile=options.authfile,
        creds=options.creds,
        username=options.username,
        password=options.password,
        registry_token=options.registry_token,
        no_creds=options.no_creds,
        cert_dir=options.cert_dir,
        tls_verify=options.tls_verify,
        user_agent_prefix=options.user_agent_prefix,
        shared_blob_dir=options.shared_blob_dir,
        override_os=options.override_os,
        override_arch=options.override_arch,
        override_variant=options.override_variant,
    )
    try:
        anyio.run(
            run_legacy,
            options.sockfd,
            context,
            options.policy,
            options.insecure_policy,
            options.stall_timeout,
            options.cache_dir,
        )
    except ImageProxyError as exc:
        print(f"image-proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
