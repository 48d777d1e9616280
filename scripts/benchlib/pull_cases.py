"""Cases 5 and 6: pulling an image into a directory, and the scale layers.

Every variant is a separate process tree run under a :class:`TreeSampler`:

- ``GetBlob|tar (skopeo)`` and ``GetBlob|tar (ours)``: ``benchlib.legacy_pull``
  with either server, the pipe handed to ``tar -xzf -``;
- ``pull cold``: ``image-proxy pull`` with an empty cache (the proxy unpacks
  the layer into the cache, then the client reflinks or copies from it);
- ``pull warm``: the same with the cache filled by the cold run.

Cache and DEST share one loop-mounted filesystem per row group (XFS with
reflinks, ext4 without), created for the run and unmounted in ``finally``.
``sync`` runs before each timed variant so that no run pays for the
previous one's writeback. Wall times include interpreter start-up of the
Python clients and proxy (see the ``0 start-up`` row).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import anyio

from benchlib.images import Layout
from benchlib.measure import ProcStats, RunResult, process_snapshot, run_sampled
from benchlib.mounts import loop_filesystem
from benchlib.results import Report, Row
from proxy.client import ProxyProcess

LEGACY_SKOPEO = "GetBlob|tar (skopeo)"
LEGACY_OURS = "GetBlob|tar (ours)"
COLD = "pull cold"
WARM = "pull warm"
PULL_FILESYSTEMS = ("xfs", "ext4")

_PULL_SUMMARY = re.compile(
    r"(?P<files>\d+) files, (?P<reflinked>\d+) bytes reflinked, "
    r"(?P<copied>\d+) bytes copied"
)


def bench_env(repo: Path) -> dict[str, str]:
    """The environment of every child: this repo's packages and ours."""
    env = dict(os.environ)
    paths = [str(repo), str(repo / "scripts")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # An installed proxy runs from compiled bytecode; without .pyc files
    # every start would compile our modules again (0.1-0.2 s here).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _legacy_argv(server: str, image: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "benchlib.legacy_pull", server, image, str(dest)]


def _pull_argv(image: str, dest: Path, cache: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "proxy", "pull", "--quiet"),
        *("--cache-dir", str(cache), image, str(dest)),
    ]


def record(row: Row, result: RunResult) -> None:
    """Append one run's wall time and the resource figures of its processes."""
    roles = result.roles
    none = ProcStats(0)
    proxy, client = roles.get("proxy", none), roles.get("client", none)
    helpers = [
        stats for role, stats in roles.items() if role not in {"proxy", "client"}
    ]
    row.values.append(result.seconds)
    row.add_resources(
        cpu_s=result.cpu_seconds,
        proxy_rchar=proxy.rchar,
        proxy_read_bytes=proxy.read_bytes,
        peak_proxy_rss_mb=proxy.peak_rss_mb,
        peak_client_rss_mb=client.peak_rss_mb,
        peak_helper_rss_mb=max((s.peak_rss_mb for s in helpers), default=float("nan")),
        peak_proxy_fds=proxy.peak_fds,
        peak_client_fds=client.peak_fds,
    )
    names = sorted({stats.name for stats in helpers} - {"?"})
    if names and not row.note:
        row.note = "helpers: " + ", ".join(names)
    summary = _PULL_SUMMARY.search(result.stdout)
    if summary is not None:
        row.add_resources(
            bytes_reflinked=int(summary["reflinked"]),
            bytes_copied=int(summary["copied"]),
        )


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def _check_tree(dest: Path, expect: str) -> None:
    if not (dest / expect).exists():
        raise RuntimeError(f"{dest} has no {expect} after the pull")


class PullRunner:
    """Runs the variants of one image on one mounted filesystem."""

    def __init__(self, repo: Path, layout: Layout, root: Path, expect: str) -> None:
        self.env = bench_env(repo)
        self.layout = layout
        self.root = root
        self.expect = expect

    def _run(self, argv: list[str], dest: Path) -> RunResult:
        os.sync()
        result = run_sampled(argv, env=self.env)
        _check_tree(dest, self.expect)
        return result

    def legacy(self, server: str) -> RunResult:
        dest = _fresh(self.root / "dest")
        try:
            return self._run(_legacy_argv(server, self.layout.reference, dest), dest)
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def pull(self, cache: Path) -> RunResult:
        dest = _fresh(self.root / "dest")
        try:
            return self._run(_pull_argv(self.layout.reference, dest, cache), dest)
        finally:
            shutil.rmtree(dest, ignore_errors=True)


def debian_pull_cases(
    report: Report, repo: Path, debian: Layout, runs: int, workdir: Path
) -> None:
    """Case 5 on a loop XFS (reflinks) and a loop ext4 (copies)."""
    for filesystem in PULL_FILESYSTEMS:
        case = f"5 pull debian ({filesystem})"
        report.anchors[case] = LEGACY_SKOPEO
        rows = {
            variant: report.add(Row(case, variant, "s", higher_is_better=False))
            for variant in (LEGACY_SKOPEO, LEGACY_OURS, COLD, WARM)
        }
        with loop_filesystem(filesystem, "2G", workdir) as mounted:
            runner = PullRunner(repo, debian, mounted, "etc/debian_version")
            for _ in range(runs):
                record(rows[LEGACY_SKOPEO], runner.legacy("skopeo"))
                record(rows[LEGACY_OURS], runner.legacy("ours"))
                cache = _fresh(mounted / "cache")
                try:
                    record(rows[COLD], runner.pull(cache))
                    record(rows[WARM], runner.pull(cache))
                finally:
                    shutil.rmtree(cache, ignore_errors=True)


def scale_cases(
    report: Report, repo: Path, layers: list[tuple[str, Layout, str]], workdir: Path
) -> None:
    """Case 6: one cold and one warm pull of each big layer on a loop XFS.

    ``layers`` holds (label, layout, a path the pulled tree must contain).
    """
    with loop_filesystem("xfs", "8G", workdir) as mounted:
        for label, layout, expect in layers:
            case = f"6 scale {label}"
            cold = report.add(Row(case, COLD, "s", higher_is_better=False))
            warm = report.add(Row(case, WARM, "s", higher_is_better=False))
            runner = PullRunner(repo, layout, mounted, expect)
            cache = _fresh(mounted / "cache")
            try:
                record(cold, runner.pull(cache))
                record(warm, runner.pull(cache))
            finally:
                shutil.rmtree(cache, ignore_errors=True)


async def proxy_session_rchar(image: str) -> int:
    """Bytes our proxy reads for a jsonrpc session that touches no layer.

    Start-up (Python imports), Initialize on both protocols, OpenImage,
    GetLayerInfo and GetConfig: what a warm pull reads besides layers.
    """
    async with ProxyProcess.spawn() as proxy:
        await proxy.legacy.initialize()
        rpc = await proxy.legacy.open_rpc()
        try:
            await rpc.initialize()
            image_id = await rpc.open_image(image)
            assert image_id is not None, f"{image} did not open"
            await rpc.get_layer_info(image_id)
            await rpc.get_config(image_id)
            return process_snapshot(proxy.process.pid).rchar
        finally:
            await rpc.aclose()


def session_rchar(image: str) -> int:
    return anyio.run(proxy_session_rchar, image)
