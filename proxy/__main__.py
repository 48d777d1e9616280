"""``python -m proxy``: the same as the ``image-proxy`` command."""

from proxy.entry import main

main()
