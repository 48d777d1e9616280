"""``image-proxy pull`` and ``inspect``: trees equal to what GNU tar makes.

The expected tree of an image is GNU tar extracting its layers in order (as
root, keeping owners), or a literal tree where whiteouts are involved; the
Debian image is compared with ``tar -xpf`` of the very tar its layer was
packed from. Expected manifests and digests are read from the layout's
files. Pulls run the real proxy in a child process.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.oci_writer import OCILayoutWriter, TarEntry
from proxy.pull import pull
from tests.api_helpers import Layout, describe_tree
from tests.images import DebianImage, ImageSet, build_manyfiles

pytestmark = pytest.mark.anyio

is_root = os.geteuid() == 0
MACHINE_PLATFORMS = {"x86_64": ("amd64", ""), "aarch64": ("arm64", "v8")}
MANYFILES = 20_000


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs the {tool} command")


def gnu_extract(archive: Path, dest: Path) -> None:
    """GNU tar extraction keeping modes and, as root, numeric owners."""
    require("tar")
    dest.mkdir(parents=True, exist_ok=True)
    owner = ["--same-owner", "--numeric-owner"] if is_root else []
    subprocess.run(
        ["tar", "-xpf", str(archive), *owner, "-C", str(dest)],
        check=True,
        capture_output=True,
    )


def host_platform() -> tuple[str, str]:
    machine = os.uname().machine
    if machine not in MACHINE_PLATFORMS:
        pytest.skip(f"no test image instance for a {machine} machine")
    return MACHINE_PLATFORMS[machine]


def expected_by_gnu_tar(layout: Layout, dest: Path) -> None:
    """Extract each layer of the host's instance in order (no whiteouts)."""
    architecture, variant = host_platform()
    for digest, _ in layout.layers(architecture=architecture, variant=variant):
        algorithm, _, hex_digest = digest.partition(":")
        gnu_extract(layout.path / "blobs" / algorithm / hex_digest, dest)


def assert_same_tree(actual: Path, expected: Path) -> None:
    actual_nodes, actual_links = describe_tree(actual)
    expected_nodes, expected_links = describe_tree(expected)
    assert sorted(actual_nodes) == sorted(expected_nodes)
    for path, node in expected_nodes.items():
        assert actual_nodes[path] == node, path
    assert actual_links == expected_links


# --- trees equal to GNU tar's ------------------------------------------------------


@pytest.mark.debian
async def test_debian_pull_equals_gnu_tar_extracting_the_rootfs_tar(
    debian_image: DebianImage, tmp_path: Path
) -> None:
    expected = tmp_path / "expected"
    gnu_extract(debian_image.rootfs_tar, expected)
    report = await pull(
        debian_image.reference, tmp_path / "dest", cache_dir=tmp_path / "cache"
    )
    assert_same_tree(tmp_path / "dest", expected)
    assert report.layers == 1
    # The client held the stream plus one window of content fds at most.
    assert 1 < report.peak_fds <= 256 + 1
    print(f"debian pull: {report.seconds:.2f} s, peak client fds {report.peak_fds}")


@pytest.mark.parametrize(
    "name",
    ["basic", "longnames", "zstd", "uncompressed", "empty-layer", "docker-v2s2"],
)
async def test_pull_equals_gnu_tar_extracting_the_layers_in_order(
    test_images: ImageSet, name: str, tmp_path: Path
) -> None:
    expected = tmp_path / "expected"
    expected_by_gnu_tar(Layout(test_images[name].path), expected)
    await pull(test_images[name].reference, tmp_path / "dest", cache_dir=tmp_path)
    assert_same_tree(tmp_path / "dest", expected)


async def test_multiarch_pull_takes_the_instance_of_this_machine(
    test_images: ImageSet, tmp_path: Path
) -> None:
    architecture, variant = host_platform()
    expected = tmp_path / "expected"
    expected_by_gnu_tar(Layout(test_images["multiarch"].path), expected)
    await pull(test_images["multiarch"].reference, tmp_path / "dest")
    assert_same_tree(tmp_path / "dest", expected)
    platform = (tmp_path / "dest" / "etc" / "platform").read_text()
    assert platform == f"linux/{architecture}{variant}\n"


async def test_whiteouts_and_opaque_directories_leave_the_spec_tree(
    test_images: ImageSet, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    await pull(test_images["whiteouts"].reference, dest, cache_dir=tmp_path / "c")
    nodes, _ = describe_tree(dest)
    assert sorted(nodes) == [
        "etc",
        "etc/keep.conf",
        "etc/readd.conf",
        "opt",
        "opt/app",
        "opt/app/new",
    ]
    assert (dest / "etc" / "keep.conf").read_bytes() == b"kept\n"
    assert (dest / "etc" / "readd.conf").read_bytes() == b"version 2\n"
    assert (dest / "opt/app/new").read_bytes() == b"added beside the opaque marker\n"


async def test_a_hostile_layer_fails_naming_the_entry_and_writes_nothing_outside(
    test_images: ImageSet, tmp_path: Path
) -> None:
    box = tmp_path / "box"
    dest = box / "dest"
    outside = [Path("/abs"), Path("/tmp/owned"), tmp_path / "escape", box / "escape"]
    existed = {path for path in outside if os.path.lexists(path)}
    passwd = os.stat("/etc/passwd")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "pull",
            "--quiet",
            "--cache-dir",
            str(tmp_path / "cache"),
            test_images["hostile"].reference,
            str(dest),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "'../escape'" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(box) == ["dest"]
    assert {path for path in outside if os.path.lexists(path)} == existed
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink


# --- reflinks ------------------------------------------------------------------------


@contextmanager
def xfs_with_reflinks(where: Path) -> Iterator[Path]:
    """A 1 GiB loop-mounted XFS with reflinks, unmounted and freed after."""
    if not is_root:
        pytest.skip("needs root to loop-mount an XFS filesystem")
    for tool in ("mkfs.xfs", "losetup", "mount", "umount"):
        require(tool)
    image = where / "xfs.img"
    mountpoint = where / "xfs"
    mountpoint.mkdir()
    with open(image, "wb") as sparse:
        sparse.truncate(1 << 30)
    subprocess.run(
        ["mkfs.xfs", "-q", "-m", "reflink=1", str(image)],
        check=True,
        capture_output=True,
    )
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        subprocess.run(["mount", device, str(mountpoint)], check=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
        image.unlink()


def largest_file(root: Path) -> Path:
    files = (
        Path(directory) / name
        for directory, _, names in os.walk(root)
        for name in names
        if (Path(directory) / name).is_file()
        and not (Path(directory) / name).is_symlink()
    )
    return max(files, key=lambda path: path.stat().st_size)


@pytest.mark.debian
async def test_debian_pull_onto_xfs_reflinks_every_content_file(
    debian_image: DebianImage, tmp_path: Path
) -> None:
    require("filefrag")
    with xfs_with_reflinks(tmp_path) as xfs:
        cache = xfs / "cache"
        await pull(debian_image.reference, xfs / "cold", cache_dir=cache)
        report = await pull(debian_image.reference, xfs / "warm", cache_dir=cache)
        stats = report.stats
        assert stats.bytes_reflinked > 100_000_000
        assert stats.bytes_copied == 0
        big = largest_file(xfs / "warm")
        extents = subprocess.run(
            ["filefrag", "-v", str(big)], check=True, capture_output=True, text=True
        ).stdout
        assert "shared" in extents, extents

        # Not asserted: the same warm pull onto a filesystem without reflinks.
        await pull(
            debian_image.reference, tmp_path / "copy-cold", cache_dir=tmp_path / "c"
        )
        copied = await pull(
            debian_image.reference, tmp_path / "copy-warm", cache_dir=tmp_path / "c"
        )
        print(
            f"warm debian pull: {report.seconds:.2f} s with reflinks "
            f"({stats.bytes_reflinked} bytes reflinked), {copied.seconds:.2f} s "
            f"without ({copied.stats.bytes_copied} bytes copied)"
        )


# --- the command line ----------------------------------------------------------------


def run_cli(
    *args: str, limit_fds: int | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "proxy", *args]
    if limit_fds is not None:
        # exec keeps the limit for the CLI and the proxy it spawns.
        command = ["bash", "-c", f'ulimit -n {limit_fds} && exec "$@"', "-", *command]
    return subprocess.run(command, capture_output=True, text=True)


SUMMARY = re.compile(
    r"^pulled \S+ into \S+: (?P<layers>\d+) layers, (?P<files>\d+) files, "
    r"(?P<reflinked>\d+) bytes reflinked, (?P<copied>\d+) bytes copied, "
    r"(?P<inline>\d+) bytes inline, (?P<seconds>[0-9.]+) s$"
)


def regular_files_of(archive: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(archive) as layer:
        return [member for member in layer if member.isreg()]


def test_pull_prints_a_one_line_summary(test_images: ImageSet, tmp_path: Path) -> None:
    layout = Layout(test_images["basic"].path)
    ((digest, _),) = layout.layers()
    files = regular_files_of(layout.path / "blobs" / "sha256" / digest[7:])
    result = run_cli(
        "pull",
        "--cache-dir",
        str(tmp_path / "cache"),
        test_images["basic"].reference,
        str(tmp_path / "dest"),
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    summary = SUMMARY.match(line)
    assert summary is not None, line
    assert int(summary["layers"]) == 1
    assert int(summary["files"]) == len(files)
    written = sum(int(summary[key]) for key in ("reflinked", "copied", "inline"))
    assert written == sum(member.size for member in files)


def test_pull_into_a_non_empty_directory_fails_and_leaves_it_alone(
    test_images: ImageSet, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "precious").write_bytes(b"keep me\n")
    result = run_cli("pull", "--quiet", test_images["basic"].reference, str(dest))
    assert result.returncode == 1
    assert "not empty" in result.stderr
    assert str(dest) in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(dest) == ["precious"]


@contextmanager
def small_tmpfs(where: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``where`` for the test; unmounted afterwards."""
    if not is_root:
        pytest.skip("mounting a tmpfs needs root")
    require("mount")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_cache_filesystem_fails_pull_with_one_line_naming_the_cache(
    tmp_path: Path,
) -> None:
    writer = OCILayoutWriter(tmp_path / "layout")
    layer = writer.add_layer([TarEntry("big", "file", os.urandom(3 << 20))])
    writer.add_image([layer], ref_name="latest")
    with small_tmpfs(tmp_path / "cache") as cache:
        result = run_cli(
            "pull",
            "--quiet",
            "--cache-dir",
            str(cache),
            f"oci:{tmp_path / 'layout'}:latest",
            str(tmp_path / "dest"),
        )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert f"layer cache {cache}: no space left on device" in line
    assert layer.diff_id in line


def test_a_regular_file_as_dest_is_refused_before_the_proxy_starts(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "dest"
    dest.write_bytes(b"keep me\n")
    # No image is there: only a check made before spawning can answer first.
    result = run_cli("pull", "--quiet", f"oci:{tmp_path}/absent:latest", str(dest))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert f"{dest} exists and is not a directory" in line
    assert dest.read_bytes() == b"keep me\n"


def test_a_symlink_as_dest_is_refused_and_its_target_left_alone(
    test_images: ImageSet, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    dest = tmp_path / "dest"
    dest.symlink_to(target)
    result = run_cli("pull", "--quiet", test_images["basic"].reference, str(dest))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert f"{dest} is a symbolic link" in line
    assert os.listdir(target) == []


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may hold spaces: split after it.
        fields = stat_line.rpartition(")")[2].split()
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def test_a_proxy_killed_mid_pull_fails_the_pull_with_one_line_naming_the_signal(
    tmp_path: Path,
) -> None:
    # Enough content files that the proxy is still unpacking when killed.
    writer = OCILayoutWriter(tmp_path / "layout")
    entries = [TarEntry(f"f{n:04d}", "file", os.urandom(5000)) for n in range(4000)]
    writer.add_image([writer.add_layer(entries, compression="none")], ref_name="x")
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "proxy", "pull", "--quiet", "--cache-dir"]
    command += [str(cache), f"oci:{tmp_path / 'layout'}:x", str(tmp_path / "dest")]
    cli = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        # A content file in a build directory: the unpack is under way.
        deadline = time.monotonic() + 60
        while not list((cache / "tmp").glob("*/files/0")):
            assert cli.poll() is None, "the pull ended before the proxy was killed"
            assert time.monotonic() < deadline, "the proxy never started unpacking"
            time.sleep(0.01)
        (proxy_pid,) = children_of(cli.pid)
        os.kill(proxy_pid, signal.SIGKILL)
        _, stderr = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 1
    (line,) = stderr.splitlines()
    assert line.endswith("the proxy exited unexpectedly (killed by SIGKILL)")


def count_regular_files(root: Path) -> int:
    return sum(
        1
        for directory, _, names in os.walk(root)
        for name in names
        if (Path(directory) / name).is_file()
    )


def test_pull_of_20000_files_works_under_an_fd_limit_of_1024(tmp_path: Path) -> None:
    require("bash")
    build_manyfiles(OCILayoutWriter(tmp_path / "manyfiles"), MANYFILES)
    dest = tmp_path / "dest"
    result = run_cli(
        "pull",
        "--quiet",
        "--cache-dir",
        str(tmp_path / "cache"),
        f"oci:{tmp_path / 'manyfiles'}:latest",
        str(dest),
        limit_fds=1024,
    )
    assert result.returncode == 0, result.stderr
    assert count_regular_files(dest) == MANYFILES


def test_pull_of_a_layer_of_1000_content_files_works_under_an_fd_limit_of_128(
    tmp_path: Path,
) -> None:
    require("bash")
    # Every file is over the proxy's 4 KiB inline threshold, so each one is
    # a content fd: many more than either process may have open.
    contents = {f"d/f{n:04d}": os.urandom(5000) for n in range(1000)}
    writer = OCILayoutWriter(tmp_path / "layout")
    entries = [TarEntry(name, "file", data) for name, data in contents.items()]
    writer.add_image([writer.add_layer(entries)], ref_name="latest")
    dest = tmp_path / "dest"
    result = run_cli(
        "pull",
        "--quiet",
        "--cache-dir",
        str(tmp_path / "cache"),
        f"oci:{tmp_path / 'layout'}:latest",
        str(dest),
        limit_fds=128,
    )
    assert result.returncode == 0, result.stderr
    assert count_regular_files(dest) == len(contents)
    for name, data in contents.items():
        assert (dest / name).read_bytes() == data, name


@pytest.mark.debian
def test_debian_pull_works_under_an_fd_limit_of_1024(
    debian_image: DebianImage, tmp_path: Path
) -> None:
    require("bash")
    # More content files than the limit: only windows keep this working.
    result = run_cli(
        "pull",
        "--quiet",
        "--cache-dir",
        str(tmp_path / "cache"),
        debian_image.reference,
        str(tmp_path / "dest"),
        limit_fds=1024,
    )
    assert result.returncode == 0, result.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"largest child RSS so far: {peak_kib / 1024:.0f} MiB; {result.stdout}")


@pytest.mark.parametrize("name", ["basic", "multiarch", "whiteouts"])
def test_inspect_shows_digest_platform_and_layers_with_diff_ids(
    test_images: ImageSet, name: str
) -> None:
    layout = Layout(test_images[name].path)
    architecture, variant = host_platform()
    config = layout.config(architecture=architecture, variant=variant)
    result = run_cli("inspect", test_images[name].reference)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"Digest:     {layout.tagged()['digest']}" in lines
    platform = "/".join(
        part
        for part in (config["os"], config["architecture"], config.get("variant"))
        if part
    )
    assert f"Platform:   {platform}" in lines
    for digest, diff_id in layout.layers(architecture=architecture, variant=variant):
        assert any(line.strip().startswith(digest) for line in lines), digest
        assert f"    diffID {diff_id}" in lines


@pytest.mark.parametrize("name", ["basic", "multiarch"])
def test_inspect_raw_prints_the_stored_manifest_bytes_exactly(
    test_images: ImageSet, name: str
) -> None:
    layout = Layout(test_images[name].path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "inspect",
            "--raw",
            test_images[name].reference,
        ],
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == layout.blob(layout.tagged()["digest"])


def test_inspect_raw_of_a_multi_platform_image_prints_its_index(
    test_images: ImageSet,
) -> None:
    layout = Layout(test_images["multiarch"].path)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "inspect", "--raw", layout_reference(layout)],
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr
    # The index as stored, not the instance chosen for this machine.
    assert result.stdout == layout.blob(layout.tagged()["digest"])


def layout_reference(layout: Layout) -> str:
    return f"oci:{layout.path}:latest"
