"""The ``image-proxy`` command.

``experimental-image-proxy`` accepts the flags clients pass to skopeo, before
or after the subcommand as skopeo's global flags allow. A flag is either
honoured, kept for a transport that uses it, or refused at start-up with its
name: never silently ignored.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer

from protocol.errors import ImageProxyError
from protocol.jsonrpc import RpcError
from proxy.client import LegacyError

app = typer.Typer(
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
    help="Fetch container images for other processes: a drop-in for "
    "`skopeo experimental-image-proxy`, plus `pull` and `inspect`.",
)

DebugOpt = Annotated[bool, typer.Option("--debug", help="Log to stderr.")]
PolicyOpt = Annotated[
    str | None, typer.Option("--policy", help="Path to a signature policy file.")
]
InsecurePolicyOpt = Annotated[
    bool, typer.Option("--insecure-policy", help="Run images without any policy check.")
]


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        stream=sys.stderr,
        format="image-proxy: %(levelname)s %(message)s",
    )


def _parse_bool(flag: str, value: str | None) -> bool | None:
    if value is None:
        return None
    lowered = value.lower()
    if lowered in ("true", "1", "t"):
        return True
    if lowered in ("false", "0", "f"):
        return False
    raise typer.BadParameter(f"{flag} takes true or false, not {value!r}")


@app.command(
    "experimental-image-proxy",
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
    add_help_option=False,
)
def experimental_image_proxy(ctx: typer.Context) -> None:
    """Serve skopeo's image proxy protocol on an inherited socket.

    Its flags are skopeo's; see `image-proxy experimental-image-proxy --help`.
    """
    # Normally proxy.entry dispatches here without typer; this keeps the
    # command listed in --help and working when reached through the app.
    from proxy.proxy_command import COMMAND, run

    raise typer.Exit(run([COMMAND, *ctx.args]))


TlsVerifyOpt = Annotated[
    str | None,
    typer.Option(
        "--tls-verify",
        is_flag=False,
        flag_value="true",
        help="false: allow plain HTTP and unverified TLS for registries.",
    ),
]
CertDirOpt = Annotated[
    str | None, typer.Option("--cert-dir", help="CA and client certificates.")
]
CredsOpt = Annotated[
    str | None, typer.Option("--creds", help="USER[:PASSWORD] for the registry.")
]
AuthfileOpt = Annotated[str | None, typer.Option("--authfile", help="auth.json path.")]


def _source_args(
    insecure_policy: bool,
    policy: str | None,
    tls_verify: str | None,
    cert_dir: str | None,
    creds: str | None,
    authfile: str | None,
) -> list[str]:
    """The proxy flags pull and inspect pass through to the proxy they spawn."""
    args = ["--insecure-policy"] if insecure_policy else []
    _parse_bool("--tls-verify", tls_verify)
    for flag, value in (
        ("--policy", policy),
        ("--cert-dir", cert_dir),
        ("--creds", creds),
        ("--authfile", authfile),
    ):
        if value:
            args += [flag, value]
    if tls_verify is not None:
        args.append(f"--tls-verify={tls_verify}")
    return args


@app.command()
def pull(
    image: Annotated[str, typer.Argument(help="transport:reference, e.g. oci:DIR:TAG")],
    dest: Annotated[Path, typer.Argument(help="New or empty directory to fill.")],
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Layer cache (default: XDG cache dir)."),
    ] = None,
    insecure_policy: InsecurePolicyOpt = False,
    policy: PolicyOpt = None,
    tls_verify: TlsVerifyOpt = None,
    cert_dir: CertDirOpt = None,
    creds: CredsOpt = None,
    authfile: AuthfileOpt = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar.")
    ] = False,
) -> None:
    """Pull IMAGE into DEST through the proxy, reflinking file contents."""
    from proxy.pull import pull as run_pull

    proxy_args = _source_args(
        insecure_policy, policy, tls_verify, cert_dir, creds, authfile
    )
    _setup_logging(False)
    with _progress(quiet) as on_progress:
        try:
            report = anyio.run(
                partial(
                    run_pull,
                    image,
                    dest,
                    cache_dir=cache_dir,
                    proxy_args=proxy_args,
                    on_progress=on_progress,
                )
            )
        except (ImageProxyError, LegacyError, RpcError) as exc:
            typer.echo(f"image-proxy: pull {image}: {_message(exc)}", err=True)
            raise typer.Exit(1) from None
    stats = report.stats
    typer.echo(
        f"pulled {image} into {dest}: {report.layers} layers, {stats.files} files, "
        f"{stats.bytes_reflinked} bytes reflinked, {stats.bytes_copied} bytes copied, "
        f"{stats.bytes_inline} bytes inline, {report.seconds:.2f} s"
    )


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[int, int, Any], None] | None]:
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} layers {task.fields[detail]}"),
        transient=True,
    )
    task = bar.add_task("pulling", total=None, detail="")

    def update(done: int, total: int, stats: Any) -> None:
        written = stats.bytes_reflinked + stats.bytes_copied + stats.bytes_inline
        detail = f"{stats.files} files, {written / 1e6:.1f} MB"
        bar.update(task, completed=done, total=total, detail=detail)

    with bar:
        yield update


def _message(exc: BaseException) -> str:
    if isinstance(exc, LegacyError):
        return exc.message
    if isinstance(exc, RpcError):
        return exc.message
    return str(exc)


@app.command()
def inspect(
    image: Annotated[str, typer.Argument(help="transport:reference")],
    raw: Annotated[
        bool, typer.Option("--raw", help="Print the stored manifest.")
    ] = False,
    insecure_policy: InsecurePolicyOpt = False,
    policy: PolicyOpt = None,
    tls_verify: TlsVerifyOpt = None,
    cert_dir: CertDirOpt = None,
    creds: CredsOpt = None,
    authfile: AuthfileOpt = None,
) -> None:
    """Show an image's digest, platform, layers and config."""
    from proxy.inspect import inspect_image

    proxy_args = _source_args(
        insecure_policy, policy, tls_verify, cert_dir, creds, authfile
    )
    _setup_logging(False)
    try:
        text = anyio.run(partial(inspect_image, image, raw=raw, proxy_args=proxy_args))
    except (ImageProxyError, LegacyError, RpcError) as exc:
        typer.echo(f"image-proxy: inspect {image}: {_message(exc)}", err=True)
        raise typer.Exit(1) from None
    if raw:
        # The stored bytes exactly, as skopeo inspect --raw writes them, so
        # that piping them to sha256sum gives the digest.
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.flush()
    else:
        typer.echo(text)


def main() -> None:
    from proxy.entry import main as entry_main

    entry_main()
