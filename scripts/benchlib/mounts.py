"""Loop-mounted scratch filesystems, always unmounted on the way out.

The backing file is sparse (``truncate``), so a 6 GB filesystem costs only
what is written to it. ``mount -o loop`` sets the loop device to detach
itself on unmount, so unmounting is the whole cleanup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


def missing_tools(filesystem: str) -> list[str]:
    tools = [MKFS[filesystem][0], "mount", "umount", "truncate"]
    return [tool for tool in tools if shutil.which(tool) is None]


@contextmanager
def loop_filesystem(filesystem: str, size: str, under: Path) -> Iterator[Path]:
    """A fresh ``filesystem`` of ``size`` mounted under ``under``; yields it."""
    mountpoint = Path(tempfile.mkdtemp(prefix=f"{filesystem}-", dir=under))
    image = mountpoint.with_suffix(".img")
    mounted = False
    try:
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        subprocess.run([*MKFS[filesystem], str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
        mounted = True
        yield mountpoint
    finally:
        if mounted:
            _unmount(mountpoint)
        image.unlink(missing_ok=True)
        if not os.path.ismount(mountpoint):
            mountpoint.rmdir()


def _unmount(mountpoint: Path) -> None:
    for attempt in range(5):
        done = subprocess.run(["umount", str(mountpoint)], capture_output=True)
        if done.returncode == 0:
            return
        subprocess.run(["sync"], check=False)
        if attempt < 4:
            time.sleep(0.5)
    # Still busy after retries: detach lazily so the run can finish, and
    # say so; the kernel completes it when the last user goes.
    print(f"bench: {mountpoint} was busy; detached lazily", file=sys.stderr)
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)
