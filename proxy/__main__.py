"""``python -m proxy``: the same as the ``image-proxy`` command."""

from proxy.cli import main

main()
