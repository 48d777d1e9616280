"""Rows of measurements, the targets they are judged by, and their output.

A :class:`Row` is one variant of one case (``ours``, ``skopeo``, ``cat``...)
with the value of every run; it is summarised as median and min-max. A
:class:`Target` compares two rows of the same run (a ratio of medians) or one
row against a fixed bound, and says MET or NOT MET.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One variant of one case: a value per run, plus resource figures."""

    case: str
    variant: str
    unit: str
    values: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    #: Named resource figures, one per run (peak RSS in MB, fds, bytes read).
    resources: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def low(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        return max(self.values) if self.values else float("nan")

    def add_resources(self, **figures: float) -> None:
        for name, value in figures.items():
            self.resources.setdefault(name, []).append(value)

    def resource(self, name: str) -> float:
        """Peaks (RSS, fds) are reported as the worst run, counts as the median."""
        values = self.resources.get(name)
        if not values:
            return float("nan")
        if name.startswith("peak"):
            return max(values)
        return statistics.median(values)


@dataclass
class Target:
    """A goal from the issue, judged on rows of the same run."""

    name: str
    wanted: str
    measured: str
    met: bool | None  # None: could not be judged (a row is missing)
    note: str = ""
    #: Reported for reading, not judged: the issue sets no bound for it.
    info: bool = False


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    anchors: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def find(self, case: str, variant: str) -> Row | None:
        for row in self.rows:
            if row.case == case and row.variant == variant:
                return row
        return None

    def ratio(self, case: str, variant: str, anchor: str) -> float | None:
        """``variant`` over ``anchor`` in the better-is-bigger sense."""
        row, base = self.find(case, variant), self.find(case, anchor)
        if row is None or base is None or not row.values or not base.values:
            return None
        if row.higher_is_better:
            return row.median / base.median
        return base.median / row.median

    def judge_ratio(
        self,
        name: str,
        case: str,
        variant: str,
        anchor: str,
        at_least: float,
        note: str = "",
        extra: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        """MET when ``variant`` is ``at_least`` times better than ``anchor``."""
        ratio = self.ratio(case, variant, anchor)
        wanted = f">= {at_least:g}x {anchor}"
        if ratio is None:
            self.targets.append(Target(name, wanted, "not measured", None, note))
            return
        met = ratio >= at_least
        measured = f"{ratio:.2f}x"
        if extra is not None:
            extra_met, extra_text = extra()
            met = met and extra_met
            measured += f"; {extra_text}"
        self.targets.append(Target(name, wanted, measured, met, note))

    def judge(self, name: str, wanted: str, measured: str, met: bool | None) -> None:
        self.targets.append(Target(name, wanted, measured, met))

    def inform(self, name: str, measured: str) -> None:
        """A ratio worth reading that the issue sets no target for."""
        self.targets.append(Target(name, "no target", measured, None, info=True))

    def to_json(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            data = asdict(row)
            data.update(median=row.median, min=row.low, max=row.high)
            anchor = self.anchors.get(row.case)
            if anchor is not None and anchor != row.variant:
                data["ratio_vs_anchor"] = self.ratio(row.case, row.variant, anchor)
                data["anchor"] = anchor
            data["resource_summary"] = {
                name: row.resource(name) for name in row.resources
            }
            rows.append(data)
        return {
            "facts": self.facts,
            "rows": rows,
            "targets": [asdict(target) for target in self.targets],
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, allow_nan=True) + "\n")


def _number(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _mib(value: float) -> str:
    return "-" if value != value else f"{value / (1 << 20):,.1f}"


def render_markdown(report: Report) -> str:
    """The three tables: speed, resources, targets."""
    lines = [
        "| case | variant | median | min-max | unit | vs anchor |",
        "|---|---|---:|---:|---|---:|",
    ]
    for row in report.rows:
        if not row.values:
            continue
        anchor = report.anchors.get(row.case)
        ratio = None
        if anchor is not None and anchor != row.variant:
            ratio = report.ratio(row.case, row.variant, anchor)
        vs = "anchor" if anchor == row.variant else "-"
        if ratio is not None:
            vs = _cell(f"{ratio:.2f}x {anchor}")
        lines.append(
            f"| {row.case} | {_cell(row.variant)} | {_number(row.median)} | "
            f"{_number(row.low)}-{_number(row.high)} | {row.unit} | {vs} |"
        )

    resource_rows = [row for row in report.rows if row.resources]
    if resource_rows:
        lines += [
            "",
            "| case | variant | CPU s (tree) | proxy CPU us/call | "
            "proxy rchar MiB | proxy read_bytes MiB | "
            "proxy peak RSS MB | client peak RSS MB | helpers peak RSS MB | "
            "proxy peak fds | client peak fds |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in resource_rows:
            get = row.resource
            lines.append(
                f"| {row.case} | {_cell(row.variant)} | {_number(get('cpu_s'))} | "
                f"{_number(get('proxy_cpu_us'))} | "
                f"{_mib(get('proxy_rchar'))} | "
                f"{_mib(get('proxy_read_bytes'))} | "
                f"{_number(get('peak_proxy_rss_mb'))} | "
                f"{_number(get('peak_client_rss_mb'))} | "
                f"{_number(get('peak_helper_rss_mb'))} | "
                f"{_number(get('peak_proxy_fds'))} | "
                f"{_number(get('peak_client_fds'))} |"
            )

    lines += ["", "| target | wanted | measured | verdict |", "|---|---|---|---|"]
    for target in report.targets:
        verdict = {True: "MET", False: "NOT MET", None: "not judged"}[target.met]
        if target.info:
            verdict = "info"
        measured = target.measured + (f" ({target.note})" if target.note else "")
        lines.append(
            f"| {_cell(target.name)} | {_cell(target.wanted)} | {_cell(measured)} "
            f"| **{verdict}** |"
        )
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Table cells may hold ``GetBlob|tar``: escape the column separator."""
    return text.replace("|", "\\|")
