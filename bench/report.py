"""The benchmark report: figures beside their baselines, targets, Markdown and JSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.cpu import KERNEL, MACHINE, NOT_PROCESSES, OPERATIONS


@dataclass(slots=True)
class Figure:
    """One measured value beside the baseline measured in the same run.

    ``ratio`` is value / baseline. ``target`` is the issue's wording; ``met`` is None when
    the figure has no target or could not be measured.
    """

    section: str
    measure: str
    value: float
    unit: str
    baseline_label: str
    baseline: float
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        if self.baseline and not math.isnan(self.baseline) and not math.isnan(self.value):
            return self.value / self.baseline
        return math.nan

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


@dataclass(slots=True)
class Report:
    """Everything one run produced."""

    started_at: str
    machine: dict[str, Any]
    parameters: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    finished_at: str = ""
    duration_s: float = math.nan

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def to_json(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_s": self.duration_s,
            "machine": self.machine,
            "parameters": self.parameters,
            "figures": [f.to_json() for f in self.figures],
            "targets": [
                {"measure": f"{f.section}: {f.measure}", "target": f.target, "met": f.met}
                for f in self.figures
                if f.target
            ],
            "memory": self.memory,
            "cpu_seconds": self.cpu,
            "raw": self.raw,
            "notes": self.notes,
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Strict JSON: NaN (not measured) becomes null.
        text = json.dumps(_finite(self.to_json()), indent=2, default=str, allow_nan=False)
        path.write_text(text + "\n")

    def markdown(self) -> str:
        out: list[str] = ["# Hive Flow C benchmark report", ""]
        out.append(
            f"Run {self.started_at} → {self.finished_at} ({self.duration_s:.0f} s), "
            "produced by `make bench` (`python -m bench`). Every figure stands beside a "
            "baseline measured in the same run on the same machine; ratio = result / baseline."
        )
        out += ["", "## Machine", ""]
        out += [f"- **{key}**: {value}" for key, value in self.machine.items()]
        out += ["", "## Parameters", ""]
        out += [f"- **{key}**: {value}" for key, value in self.parameters.items()]
        targeted = [f for f in self.figures if f.target]
        if targeted:
            out += ["", "## Targets (issue 7)", ""]
            out += ["| measure | target | result | baseline (same run) | ratio | met |"]
            out += ["|---|---|---|---|---|---|"]
            for f in targeted:
                out.append(
                    f"| {f.section}: {f.measure} | {f.target} | {_num(f.value)} {f.unit} "
                    f"| {f.baseline_label}: {_num(f.baseline)} {f.unit} | {_ratio(f.ratio)} "
                    f"| {_met(f.met)} |"
                )
        sections: dict[str, list[Figure]] = {}
        for f in self.figures:
            sections.setdefault(f.section, []).append(f)
        for section, figures in sections.items():
            out += ["", f"## {section}", ""]
            out.append("| measure | result | baseline (same run) | ratio | target | note |")
            out.append("|---|---|---|---|---|---|")
            for f in figures:
                target = f"{f.target}: {_met(f.met)}" if f.target else ""
                out.append(
                    f"| {f.measure} | {_num(f.value)} {f.unit} | {f.baseline_label}: "
                    f"{_num(f.baseline)} {f.unit} | {_ratio(f.ratio)} | {target} | {f.note} |"
                )
        if self.memory:
            out += ["", "## Peak memory (VmHWM from /proc/<pid>/status)", ""]
            out += ["| phase | process | VmHWM | note |", "|---|---|---|---|"]
            for m in self.memory:
                out.append(
                    f"| {m['phase']} | {m['process']} | {_num(m['vmhwm_mib'])} MiB "
                    f"| {m.get('note', '')} |"
                )
        if self.cpu:
            out += [
                "",
                "## Where the CPU went (CPU seconds per process during each measurement)",
                "",
            ]
            cores = os.cpu_count() or 1
            out.append(
                "Per measurement: CPU seconds of each process group; *kernel* is kernel threads "
                "plus irq/softirq time (much of it I/O and loopback networking done for our "
                "processes); *other processes* is the whole machine's busy time (/proc/stat) "
                "minus ours and the kernel's (other helpers' test suites, anything not "
                f"attributed); *busy*: the machine's busy time over {cores} cores x wall time "
                "(near 100 %, a measurement is CPU-bound). Where the count of operations "
                "(tickets or calls) is known: the CPU of one operation (ours and the "
                f"kernel's) and the rate {cores} cores allow at that cost (all busy; the "
                "accounting counts clock ticks and a little work around each measurement)."
            )
            out.append("")
            for label, groups in self.cpu.items():
                wall = groups.get("wall", math.nan)
                busy = (
                    f"; busy {groups[MACHINE] / (wall * cores):.0%}"
                    if MACHINE in groups and wall > 0
                    else ""
                )
                ours = {k: v for k, v in groups.items() if k not in NOT_PROCESSES}
                operations = groups.get(OPERATIONS)
                if operations:
                    spent = sum(ours.values()) + groups.get(KERNEL, 0.0)
                    busy += (
                        f"; {operations:,.0f} operations, {1000 * spent / operations:.3f} "
                        f"CPU-ms each: the cores allow ~{operations * cores / spent:,.0f}/s"
                    )
                if MACHINE in groups:
                    kernel = groups.get(KERNEL, 0.0)
                    others = groups[MACHINE] - sum(ours.values()) - kernel
                    ours["*kernel*"] = kernel
                    ours["*other processes*"] = max(0.0, others)
                parts = ", ".join(
                    f"{name} {seconds:.2f}"
                    for name, seconds in sorted(ours.items(), key=lambda kv: -kv[1])
                    if seconds >= 0.005
                )
                out.append(f"- {label} (wall {wall:.2f} s{busy}): {parts}")
        if self.notes:
            out += ["", "## Notes", ""]
            out += [f"- {note}" for note in self.notes]
        return "\n".join(out) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _num(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def _met(met: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[met]
