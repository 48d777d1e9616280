"""The ``image-proxy`` program: the server path first, the rest on demand.

The proxy is spawned once per consumer operation, so when the arguments name
``experimental-image-proxy`` we go straight to its lean argparse command and
never import typer; ``pull``, ``inspect`` and help use the typer app.
"""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    from proxy.proxy_command import COMMAND

    if COMMAND in argv and not {"-h", "--help"} & set(argv[: argv.index(COMMAND)]):
        from proxy.proxy_command import run

        sys.exit(run(argv))
    from proxy.cli import app

    app()
