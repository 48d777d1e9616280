"""The targets of issue 5, judged on the rows of one run.

Ratios compare medians measured in the same run; bounds (RSS, fds, bytes
read) take the worst run. A target whose rows are missing (a case skipped
with ``--only``) is listed as not judged rather than left out.
"""

from __future__ import annotations

from benchlib.pull_cases import COLD, LEGACY_SKOPEO, WARM
from benchlib.results import Report, Row

RSS_LIMIT_MB = 150.0
#: A layer 30x larger may cost the proxy at most this much more peak RSS.
RSS_GROWTH_ALLOWED = 1.25
#: Start-up, sockets, pipes and the stream fd besides the content window.
FD_SLACK = 32
CLIENT_FD_WINDOW = 256
PROXY_FD_BUDGET = 512
#: Of the layer's tar bytes, what a warm pull's proxy may read beyond a
#: session that touches no layer (manifest, config, cache metadata).
CONTENT_READ_ALLOWED = 0.01


def judge_all(report: Report) -> None:
    report.judge_ratio(
        "GetBlob verified MB/s", "1 GetBlob verified", "ours", "skopeo", 2.0
    )
    report.judge_ratio(
        "GetRawBlob MB/s", "2 GetRawBlob", "ours", "cat, 1 MiB pipe", 1.0,
        note="skopeo 1.9 lacks GetRawBlob: the cat-to-pipe limit stands in",
    )  # fmt: skip
    for case in ("3 GetManifest+FinishPipe", "3 error reply"):
        report.judge_ratio(
            f"round trip {case[2:]}", case, "ours", "skopeo", 1.0,
            note="ratio = skopeo us / ours us",
        )  # fmt: skip
    _judge_rpc(report)
    _judge_pulls(report)
    _judge_rss(report)
    _judge_scale(report)


def _judge_rpc(report: Report) -> None:
    case = "4 jsonrpc GetConfig"
    sequential = report.find(case, "sequential, 1 conn")
    if sequential is None or not sequential.values:
        return
    sequential_rate = 1e6 / sequential.median
    for row in report.rows:
        if row.case == case and row.unit == "calls/s" and row.values:
            ratio = row.median / sequential_rate
            report.inform(
                f"jsonrpc {row.variant} vs sequential",
                f"{ratio:.2f}x ({row.median:,.0f} vs {sequential_rate:,.0f} calls/s)",
            )


def _judge_pulls(report: Report) -> None:
    session_rchar = report.facts.get("proxy_session_rchar")
    tar_bytes = report.facts.get("debian_tar_bytes")
    for filesystem in ("xfs", "ext4"):
        case = f"5 pull debian ({filesystem})"
        warm = report.find(case, WARM)
        if filesystem == "xfs":

            def content_read(warm: Row | None = warm) -> tuple[bool, str]:
                if warm is None or session_rchar is None or not tar_bytes:
                    return False, "proxy reads not measured"
                beyond = max(warm.resources.get("proxy_rchar", [0])) - session_rchar
                share = beyond / tar_bytes
                return share <= CONTENT_READ_ALLOWED, (
                    f"proxy read {beyond / 1e6:.2f} MB beyond a layer-less "
                    f"session = {share:.2%} of the layer's {tar_bytes / 1e6:.0f} MB"
                )

            report.judge_ratio(
                "warm pull, reflinks (XFS)", case, WARM, LEGACY_SKOPEO, 10.0,
                note="ratio = GetBlob|tar seconds / warm pull seconds",
                extra=content_read,
            )  # fmt: skip
        else:
            ratio = report.ratio(case, WARM, LEGACY_SKOPEO)
            if ratio is not None:
                report.inform(
                    "warm pull, copies (ext4)",
                    f"{ratio:.2f}x (GetBlob|tar seconds / warm pull seconds)",
                )
        report.judge_ratio(
            f"cold pull ({filesystem})", case, COLD, LEGACY_SKOPEO, 1.0,
            note="ratio = GetBlob|tar seconds / cold pull seconds",
        )  # fmt: skip


def _our_rows(report: Report) -> list[Row]:
    """Rows whose proxy is ours (skopeo rows are the anchor's business)."""
    return [
        row
        for row in report.rows
        if "skopeo" not in row.variant and "peak_proxy_rss_mb" in row.resources
    ]


def _judge_rss(report: Report) -> None:
    rows = _our_rows(report)
    if not rows:
        return
    worst = max(rows, key=lambda row: row.resource("peak_proxy_rss_mb"))
    peak = worst.resource("peak_proxy_rss_mb")
    report.judge(
        "proxy peak RSS, every case",
        f"< {RSS_LIMIT_MB:.0f} MB",
        f"worst {peak:.1f} MB ({worst.case}, {worst.variant})",
        peak < RSS_LIMIT_MB,
    )


def _judge_scale(report: Report) -> None:
    base = report.find("5 pull debian (xfs)", COLD)
    scale = [row for row in report.rows if row.case.startswith("6 scale")]
    if not scale:
        return
    if base is not None and base.resources:
        base_rss = base.resource("peak_proxy_rss_mb")
        figures = ", ".join(
            f"{row.case[8:]} {row.variant} {row.resource('peak_proxy_rss_mb'):.1f}"
            for row in scale
        )
        worst = max(row.resource("peak_proxy_rss_mb") for row in scale)
        report.judge(
            "proxy RSS flat as layers grow",
            f"<= {RSS_GROWTH_ALLOWED:g}x the Debian cold pull's",
            f"Debian {base_rss:.1f} MB; {figures} MB",
            worst <= base_rss * RSS_GROWTH_ALLOWED,
        )
    client_fds = max(row.resource("peak_client_fds") for row in scale)
    proxy_fds = max(row.resource("peak_proxy_fds") for row in scale)
    report.judge(
        "splitfdstream fd bound",
        f"client <= {CLIENT_FD_WINDOW}+{FD_SLACK}, "
        f"proxy <= {PROXY_FD_BUDGET}+{FD_SLACK}",
        f"client peak {client_fds:.0f}, proxy peak {proxy_fds:.0f}",
        client_fds <= CLIENT_FD_WINDOW + FD_SLACK
        and proxy_fds <= PROXY_FD_BUDGET + FD_SLACK,
    )
