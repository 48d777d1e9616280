"""``scripts/bench``: run the cases, print the tables, write the JSON.

Cases run one after another in a fixed order; a case that fails is reported
(with its error) and the others still run. Scratch space is one directory
under /var/tmp, removed at the end with its loop mounts.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio

from benchlib import images, legacy_cases, pull_cases, rpc_cases
from benchlib.mounts import missing_tools
from benchlib.results import Report, render_markdown
from benchlib.targets import judge_all

REPO = Path(__file__).resolve().parents[2]
CASES = {
    "startup": "0",
    "getblob": "1",
    "rawblob": "2",
    "roundtrip": "3",
    "rpc": "4",
    "pull": "5",
    "scale": "6",
}


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmarks of issue 5: our proxy beside skopeo's.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 runs per case instead of 5"
    )
    parser.add_argument("--runs", type=int, help="runs per case (overrides --quick)")
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO / "docs" / "performance.json",
        help="where to write the results (default: docs/performance.json)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="CASE",
        choices=[*CASES, *CASES.values()],
        help="run only this case, by number or name "
        f"({', '.join(f'{n}={k}' for k, n in CASES.items())}); repeatable",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=REPO / "test-images",
        help="the test image directory (default: test-images/)",
    )
    return parser.parse_args(argv)


def _command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return done.stdout.strip() or done.stderr.strip()


def machine_facts() -> dict[str, object]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    commit = _command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _command_output(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory / (1 << 30), 1),
        "kernel": platform.release(),
        "root_filesystem": _command_output(["findmnt", "-no", "FSTYPE,OPTIONS", "/"]),
        "scratch": "sparse files under /var/tmp, loop-mounted",
        "python": platform.python_version(),
        "skopeo": _command_output(["skopeo", "--version"]),
        "tar": _command_output(["tar", "--version"]).splitlines()[0],
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def _run_case(
    report: Report, name: str, work: Callable[[], None], errors: list[str]
) -> None:
    print(f"bench: case {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        work()
    except Exception as exc:  # one broken case must not hide the others
        traceback.print_exc()
        errors.append(f"{name}: {type(exc).__name__}: {exc}")
    print(
        f"bench: case {name} took {time.monotonic() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    runs = args.runs or (3 if args.quick else 5)
    wanted = {CASES.get(case, case) for case in args.only or CASES.values()}
    report = Report(facts=machine_facts())
    report.facts["command"] = " ".join(["scripts/bench", *sys.argv[1:]])
    report.facts["runs"] = runs
    report.facts["load_average_start"] = _load_average()
    errors: list[str] = []
    # Proxies spawned by the cases import this checkout, installed or not.
    env = pull_cases.bench_env(REPO)
    os.environ.clear()
    os.environ.update(env)
    _compile_modules()
    if shutil.which("skopeo") is None:
        print(
            "bench: skopeo is not installed (apt-get install skopeo)", file=sys.stderr
        )
        return 2

    debian = images.debian(REPO, args.images)
    layer = debian.layers()[0]
    blob = legacy_cases.BlobUnderTest(
        debian.reference,
        layer["digest"],
        layer["size"],
        debian.blob_path(layer["digest"]),
    )
    report.facts["debian_layer"] = f"{layer['digest']} ({layer['size']} bytes gzip)"

    def run(number: str, name: str, work: Callable[[], None]) -> None:
        if number in wanted:
            _run_case(report, f"{number} {name}", work, errors)

    run("0", "start-up", lambda: anyio.run(legacy_cases.startup_case, report, runs))
    if wanted & {"1", "2"}:
        # One pair of proxies serves both blob cases: they read the same blob.
        _run_case(
            report,
            "1+2 GetBlob, GetRawBlob",
            lambda: anyio.run(legacy_cases.blob_cases, report, blob, runs),
            errors,
        )
    run(
        "3",
        "round trips",
        lambda: anyio.run(
            legacy_cases.round_trip_cases, report, debian.reference, runs
        ),
    )
    run(
        "4",
        "jsonrpc",
        lambda: anyio.run(rpc_cases.rpc_cases, report, debian.reference, runs),
    )

    needs_mounts = wanted & {"5", "6"}
    missing = missing_tools("xfs") + missing_tools("ext4")
    if needs_mounts and (os.geteuid() != 0 or missing):
        errors.append(
            "5/6 skipped: loop mounts need root and "
            + (", ".join(missing) or "are available")
        )
        needs_mounts = set()
    if needs_mounts:
        workdir = Path(tempfile.mkdtemp(prefix="image-proxy-bench-", dir="/var/tmp"))
        try:
            if "5" in wanted:
                _pull_facts(report, debian)
                run(
                    "5",
                    "pull",
                    lambda: pull_cases.debian_pull_cases(
                        report, REPO, debian, runs, workdir
                    ),
                )
            if "6" in wanted:
                run("6", "scale", lambda: _scale(report, args.images, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    report.facts["errors"] = errors
    report.facts["load_average_end"] = _load_average()
    judge_all(report)
    report.write_json(args.json)
    print(render_markdown(report))
    for error in errors:
        print(f"bench: error: {error}", file=sys.stderr)
    return 1 if errors else 0


def _load_average() -> str:
    """1, 5 and 15 minute load: how much else shared the 2 cores."""
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def _compile_modules() -> None:
    """Write the .pyc files once, so that no timed run pays for compiling."""
    modules = "proxy.cli, proxy.server, proxy.api, proxy.pull, benchlib.legacy_pull"
    subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)


def _pull_facts(report: Report, debian: images.Layout) -> None:
    report.facts["proxy_session_rchar"] = pull_cases.session_rchar(debian.reference)
    tar = REPO / "test-images" / "cache" / "bookworm-minbase.tar"
    if tar.is_file():
        report.facts["debian_tar_bytes"] = tar.stat().st_size


def _scale(report: Report, images_dir: Path, workdir: Path) -> None:
    many = images.manyfiles(REPO, images_dir)
    big = images.bigfile(images_dir)
    pull_cases.scale_cases(
        report,
        REPO,
        [
            ("100k files", many, "d0000/f0000001"),
            ("2 GiB file", big, "bigfile"),
        ],
        workdir,
    )
