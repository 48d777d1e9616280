"""The ``image-proxy`` command.

``experimental-image-proxy`` accepts the flags clients pass to skopeo, before
or after the subcommand as skopeo's global flags allow. A flag is either
honoured, kept for a transport that uses it, or refused at start-up with its
name: never silently ignored.
"""

from __future__ import annotations

import logging
import os
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
from proxy.transports.base import SystemContext

app = typer.Typer(
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
    help="Fetch container images for other processes: a drop-in for "
    "`skopeo experimental-image-proxy`, plus `pull` and `inspect`.",
)

# Flags that skopeo takes globally; we accept them before or after the
# subcommand and merge the two.
_GLOBAL_KEYS = (
    "debug",
    "policy",
    "insecure_policy",
    "override_arch",
    "override_os",
    "override_variant",
    "registries_conf",
    "tmpdir",
    "command_timeout",
    "user_agent_prefix",
)

DebugOpt = Annotated[bool, typer.Option("--debug", help="Log each request to stderr.")]
PolicyOpt = Annotated[
    str | None, typer.Option("--policy", help="Path to a signature policy file.")
]
InsecurePolicyOpt = Annotated[
    bool, typer.Option("--insecure-policy", help="Run images without any policy check.")
]
ArchOpt = Annotated[
    str | None, typer.Option("--override-arch", help="Architecture to choose.")
]
OsOpt = Annotated[str | None, typer.Option("--override-os", help="OS to choose.")]
VariantOpt = Annotated[
    str | None, typer.Option("--override-variant", help="Variant to choose.")
]
RegistriesConfOpt = Annotated[
    str | None, typer.Option("--registries-conf", hidden=True)
]
TmpdirOpt = Annotated[str | None, typer.Option("--tmpdir", hidden=True)]
TimeoutOpt = Annotated[str | None, typer.Option("--command-timeout", hidden=True)]
AgentOpt = Annotated[str | None, typer.Option("--user-agent-prefix", hidden=True)]


@app.callback()
def global_options(
    ctx: typer.Context,
    debug: DebugOpt = False,
    policy: PolicyOpt = None,
    insecure_policy: InsecurePolicyOpt = False,
    override_arch: ArchOpt = None,
    override_os: OsOpt = None,
    override_variant: VariantOpt = None,
    registries_conf: RegistriesConfOpt = None,
    tmpdir: TmpdirOpt = None,
    command_timeout: TimeoutOpt = None,
    user_agent_prefix: AgentOpt = None,
) -> None:
    ctx.obj = {key: value for key, value in locals().items() if key in _GLOBAL_KEYS}


def _merged(ctx: typer.Context, local: dict[str, Any]) -> dict[str, Any]:
    merged = dict(ctx.obj or {})
    for key in _GLOBAL_KEYS:
        value = local.get(key)
        if value not in (None, False):
            merged[key] = value
    return merged


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


def _refuse(flag: str, why: str) -> None:
    typer.echo(f"image-proxy: {flag} is not supported: {why}", err=True)
    raise typer.Exit(2)


@app.command("experimental-image-proxy")
def experimental_image_proxy(
    ctx: typer.Context,
    sockfd: Annotated[int, typer.Option("--sockfd", help="Serve on this fd.")] = 0,
    authfile: Annotated[str | None, typer.Option("--authfile")] = None,
    creds: Annotated[str | None, typer.Option("--creds")] = None,
    username: Annotated[str | None, typer.Option("--username")] = None,
    password: Annotated[str | None, typer.Option("--password")] = None,
    registry_token: Annotated[str | None, typer.Option("--registry-token")] = None,
    no_creds: Annotated[bool, typer.Option("--no-creds")] = False,
    cert_dir: Annotated[str | None, typer.Option("--cert-dir")] = None,
    tls_verify: Annotated[
        str | None, typer.Option("--tls-verify", is_flag=False, flag_value="true")
    ] = None,
    shared_blob_dir: Annotated[str | None, typer.Option("--shared-blob-dir")] = None,
    daemon_host: Annotated[str | None, typer.Option("--daemon-host")] = None,
    decryption_key: Annotated[
        list[str] | None, typer.Option("--decryption-key")
    ] = None,
    stall_timeout: Annotated[
        float,
        typer.Option(
            "--stall-timeout",
            help="Seconds a blob transfer may make no progress before FinishPipe "
            "fails it with a retryable error.",
        ),
    ] = 60.0,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Where unpacked layers are kept.")
    ] = None,
    debug: DebugOpt = False,
    policy: PolicyOpt = None,
    insecure_policy: InsecurePolicyOpt = False,
    override_arch: ArchOpt = None,
    override_os: OsOpt = None,
    override_variant: VariantOpt = None,
    registries_conf: RegistriesConfOpt = None,
    tmpdir: TmpdirOpt = None,
    command_timeout: TimeoutOpt = None,
    user_agent_prefix: AgentOpt = None,
) -> None:
    """Serve skopeo's image proxy protocol on an inherited socket."""
    options = _merged(ctx, locals())
    _setup_logging(bool(options.get("debug")))
    if decryption_key:
        _refuse("--decryption-key", "image-proxy does not decrypt layers yet")
    if daemon_host:
        _refuse("--daemon-host", "the docker-daemon: transport is not available")
    if password and not username:
        _refuse("--password", "it needs --username")
    if options.get("registries_conf"):
        # The docker transport reads registries.conf from this variable; the
        # flag, as in skopeo, names the file for this process only.
        os.environ["CONTAINERS_REGISTRIES_CONF"] = str(options["registries_conf"])
    context = SystemContext(
        authfile=authfile,
        creds=creds,
        username=username,
        password=password,
        registry_token=registry_token,
        no_creds=no_creds,
        cert_dir=cert_dir,
        tls_verify=_parse_bool("--tls-verify", tls_verify),
        user_agent_prefix=options.get("user_agent_prefix"),
        shared_blob_dir=shared_blob_dir,
        override_os=options.get("override_os"),
        override_arch=options.get("override_arch"),
        override_variant=options.get("override_variant"),
    )
    from proxy.server import run_legacy

    try:
        anyio.run(
            run_legacy,
            sockfd,
            context,
            options.get("policy"),
            bool(options.get("insecure_policy")),
            stall_timeout,
            cache_dir,
        )
    except ImageProxyError as exc:
        typer.echo(f"image-proxy: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


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
    app()
