"""The legacy pull as today's consumers do it: GetBlob piped into ``tar -x``.

``python -m benchlib.legacy_pull SERVER IMAGE DEST`` opens IMAGE through the
proxy (``ours`` or ``skopeo``), reads its manifest and config, and for each
layer hands the GetBlob pipe straight to ``tar -xzf - -C DEST`` as its stdin
while FinishPipe runs. Run as its own process so that its peak RSS and fds
can be read from /proc like those of ``image-proxy pull``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio

from proxy.client import ProxyProcess

_TAR_FILTERS = {
    "application/vnd.oci.image.layer.v1.tar+gzip": ["-z"],
    "application/vnd.docker.image.rootfs.diff.tar.gzip": ["-z"],
    "application/vnd.oci.image.layer.v1.tar+zstd": ["--zstd"],
    "application/vnd.oci.image.layer.v1.tar": [],
}


async def legacy_pull(command: list[str] | None, image: str, dest: Path) -> int:
    """Apply every layer of ``image`` under ``dest``; returns the layer count."""
    async with ProxyProcess.spawn([], command=command) as proxy:
        legacy = proxy.legacy
        await legacy.initialize()
        image_id = await legacy.open_image(image)
        _, manifest = await legacy.call_piped("GetManifest", image_id)
        await legacy.call_piped("GetConfig", image_id)
        layers = json.loads(manifest)["layers"]
        for layer in layers:
            flags = _TAR_FILTERS[layer["mediaType"]]
            _, fds, pipeid = await legacy.call(
                "GetBlob", image_id, layer["digest"], layer["size"]
            )
            (fd,) = fds
            try:
                tar = subprocess.Popen(
                    ["tar", "-x", *flags, "-f", "-", "-C", str(dest)], stdin=fd
                )
            finally:
                os.close(fd)
            await legacy.call("FinishPipe", pipeid)
            status = await anyio.to_thread.run_sync(tar.wait)
            if status != 0:
                raise RuntimeError(f"tar failed on {layer['digest']}: status {status}")
    return len(layers)


def main() -> int:
    server, image, dest = sys.argv[1:]
    command = ["skopeo"] if server == "skopeo" else None
    Path(dest).mkdir(parents=True, exist_ok=True)
    layers = anyio.run(legacy_pull, command, image, Path(dest))
    print(f"{layers} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
