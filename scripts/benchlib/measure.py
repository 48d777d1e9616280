"""Measuring processes from the outside: /proc sampling, pipe draining.

A :class:`TreeSampler` thread walks a process tree every ``interval`` seconds
and keeps, per pid, the highest fd count seen and the last ``VmHWM`` and
``/proc/PID/io`` counters read before the process vanished. ``VmHWM`` is the
kernel's own peak, so it is exact whatever the interval; the fd peak and the
io counters can miss what happens in the last interval of a process's life
(a few ms: its Shutdown), which is said where they are reported.

Cost: one ``listdir`` and three small reads per process and interval; at the
default 5 ms that is about 1% of one core on this machine's trees of 2-4
processes, the same for every variant of a case.
"""

from __future__ import annotations

import fcntl
import os
import resource
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DRAIN_BUFFER = 1024 * 1024


def drain(fd: int) -> int:
    """Read ``fd`` to EOF into one reused buffer, as a consumer would; close it.

    :returns: the number of bytes read.
    """
    buffer = bytearray(DRAIN_BUFFER)
    total = 0
    try:
        while count := os.readv(fd, [buffer]):
            total += count
    finally:
        os.close(fd)
    return total


def read_to_end(fd: int) -> bytes:
    """Everything on ``fd`` (an error pipe: a few bytes at most); closes it."""
    with os.fdopen(fd, "rb") as reader:
        return reader.read()


def cat_to_pipe(path: Path, pipe_size: int | None = None) -> tuple[int, int]:
    """``cat PATH`` writing into a fresh pipe drained here, the pipe limit.

    :param pipe_size: enlarge the pipe to this (``F_SETPIPE_SZ``); the
        default is the kernel's 64 KiB, what a shell pipeline gets.
    :returns: bytes read and the size of ``path``.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    if pipe_size is not None:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, pipe_size)
    try:
        cat = subprocess.Popen(["cat", str(path)], stdout=write_fd)
    finally:
        os.close(write_fd)
    total = drain(read_fd)
    if cat.wait(timeout=60) != 0:
        raise RuntimeError(f"cat {path} failed with status {cat.returncode}")
    return total, path.stat().st_size


@dataclass
class ProcStats:
    """What was seen of one process while it lived."""

    pid: int
    cmdline: list[str] = field(default_factory=list)
    peak_fds: int = 0
    hwm_kib: int = 0
    rchar: int = 0
    read_bytes: int = 0

    @property
    def peak_rss_mb(self) -> float:
        return self.hwm_kib / 1024

    def is_proxy(self) -> bool:
        return "experimental-image-proxy" in self.cmdline

    @property
    def name(self) -> str:
        if not self.cmdline:
            return "?"
        if self.is_proxy():
            return "proxy"
        return os.path.basename(self.cmdline[0])


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as source:
            return source.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, over all of its threads."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        text = _read_text(f"/proc/{pid}/task/{task}/children")
        if text:
            found.extend(int(child) for child in text.split())
    return found


def sample(stats: ProcStats) -> bool:
    """Refresh ``stats`` from /proc; False once the process is gone."""
    pid = stats.pid
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    status = _read_text(f"/proc/{pid}/status")
    io = _read_text(f"/proc/{pid}/io")
    cmdline = _read_text(f"/proc/{pid}/cmdline")
    if status is None or io is None:
        return False
    if cmdline:
        argv = cmdline.rstrip("\0").split("\0")
        if stats.cmdline and argv != stats.cmdline:
            # An exec: what was seen belonged to the parent's image (a forked
            # child shares its parent's VmHWM until then).
            stats.peak_fds = stats.hwm_kib = stats.rchar = stats.read_bytes = 0
        stats.cmdline = argv
    stats.peak_fds = max(stats.peak_fds, fds)
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            stats.hwm_kib = max(stats.hwm_kib, int(line.split()[1]))
    for line in io.splitlines():
        key, _, value = line.partition(":")
        if key == "rchar":
            stats.rchar = max(stats.rchar, int(value))
        elif key == "read_bytes":
            stats.read_bytes = max(stats.read_bytes, int(value))
    return True


class TreeSampler:
    """Samples a process and its descendants in a thread until stopped."""

    def __init__(self, root_pid: int, interval: float = 0.005) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.stats: dict[int, ProcStats] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            pending, seen = [self.root_pid], set()
            while pending:
                pid = pending.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                stats = self.stats.setdefault(pid, ProcStats(pid))
                if sample(stats):
                    pending.extend(children(pid))
            self._stop.wait(self.interval)

    def roles(self) -> dict[str, ProcStats]:
        """``client`` (the root), ``proxy``, and the peak of every other name.

        A forked child is seen with its parent's cmdline until it execs, so
        a pid is named by the last cmdline read.
        """
        found: dict[str, ProcStats] = {}
        for pid, stats in self.stats.items():
            role = "client" if pid == self.root_pid else stats.name
            known = found.get(role)
            if known is None:
                found[role] = stats
            else:
                # Several helpers of one name (tar per layer): keep the peaks.
                found[role] = ProcStats(
                    pid,
                    stats.cmdline,
                    max(known.peak_fds, stats.peak_fds),
                    max(known.hwm_kib, stats.hwm_kib),
                    known.rchar + stats.rchar,
                    known.read_bytes + stats.read_bytes,
                )
        return found


@dataclass
class RunResult:
    """One run of a command tree: wall and CPU time, what the sampler saw.

    ``cpu_seconds`` is user + system time of every process of the tree that
    was reaped (the kernel adds a waited-for child's time to its parent's
    children total), so it does not grow when other work shares the CPUs.
    """

    seconds: float
    cpu_seconds: float
    roles: dict[str, ProcStats]
    stdout: str


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_sampled(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: Callable[[subprocess.CompletedProcess[str]], None] | None = None,
) -> RunResult:
    """Run ``argv`` to completion under a :class:`TreeSampler`.

    The wall time runs from just before the fork to the reaping of the root,
    so it includes interpreter start-up for Python clients and proxies.
    """
    cpu_before = _children_cpu()
    started = time.perf_counter()
    process = subprocess.Popen(
        list(argv),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with TreeSampler(process.pid) as sampler:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"{argv[0]} ran over {timeout} s: killed") from None
        seconds = time.perf_counter() - started
    completed = subprocess.CompletedProcess(list(argv), process.returncode, stdout)
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed with status {process.returncode}: "
            f"{stderr.strip()[-2000:]}"
        )
    if check is not None:
        check(completed)
    cpu_seconds = _children_cpu() - cpu_before
    return RunResult(seconds, cpu_seconds, sampler.roles(), stdout)


def cpu_seconds(pid: int) -> float:
    """User + system time of a live process so far, all its threads included."""
    fields = (_read_text(f"/proc/{pid}/stat") or "").rpartition(")")[2].split()
    if len(fields) < 13:
        return float("nan")
    # utime and stime are fields 14 and 15 of stat(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_snapshot(pid: int) -> ProcStats:
    """One sample of a live process (its VmHWM is already its peak)."""
    stats = ProcStats(pid)
    sample(stats)
    return stats
