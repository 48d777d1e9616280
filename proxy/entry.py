"""The ``image-proxy`` program: the server path first, the rest on demand.

The proxy is spawned once per consumer operation, so when the arguments name
``experimental-image-proxy`` we go straight to its lean argparse command and
never import typer; ``pull``, ``inspect`` and help use the typer app.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    argv = sys.argv[1:]
    from proxy.proxy_command import COMMAND

    if COMMAND in argv and not {"-h", "--help"} & set(argv[: argv.index(COMMAND)]):
        from proxy.proxy_command import run

        status = run(argv)
        # A transfer thread may still be blocked reading a stalled source;
        # the client asked us to stop (or hung up), so do not wait for it.
        # Everything the proxy holds is released by the kernel at exit, and
        # an interrupted cache build is swept by the next proxy.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    from proxy.cli import app

    app()
