"""CPU seconds spent by each process group while a measurement runs.

On a 2-core machine the client, the service, PostgreSQL and FerretDB share the cores, so
a figure only means something next to where the CPU went. Times come from
/proc/<pid>/stat (utime + stime, all threads); PostgreSQL is the postmaster plus its
backends (exited backends are counted through the postmaster's reaped-children times).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from hive_common.procstack import ManagedProcess

_TICKS = os.sysconf("SC_CLK_TCK")

PidSource = Callable[[], list[int]]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces: fields start after the last ')'.
    return text[text.rfind(")") + 2 :].split()


def process_seconds(pid: int, *, with_children: bool = False) -> float:
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17.
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


MACHINE = "(whole machine)"


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine spent busy (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


KERNEL = "(kernel: threads, irq, softirq)"

OPERATIONS = "operations"
"""The key of a measurement's operation count (tickets, calls) in its results."""

NOT_PROCESSES = ("wall", OPERATIONS, MACHINE, KERNEL)
"""The keys of a measurement's results that are not a process group's CPU seconds."""


def kernel_seconds() -> float:
    """CPU seconds of kernel threads (children of kthreadd) plus irq and softirq time: work
    such as the ext4 journal and loopback networking done for whichever process caused it."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        interrupts = (int(fields[5]) + int(fields[6])) / _TICKS
    except (OSError, IndexError, ValueError):
        interrupts = 0.0
    return interrupts + sum(process_seconds(pid) for pid in children_of(2))


def children_of(parent: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                pids.append(int(entry.name))
    return pids


def postgres_seconds(postmaster: int) -> float:
    return process_seconds(postmaster, with_children=True) + sum(
        process_seconds(pid) for pid in children_of(postmaster)
    )


def pids_with_argument(fragment: str) -> list[int]:
    """Processes whose command line contains ``fragment``."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if fragment.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


class CpuMeter:
    """Named CPU-time sources; :meth:`measure` records each one's seconds over a block."""

    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], float]] = {}
        self.results: dict[str, dict[str, float]] = {}
        # Optional: a context manager run around each measurement (e.g. a py-spy sampler).
        self.around: Callable[[str], contextlib.AbstractContextManager[object]] | None = None

    def add(self, name: str, seconds: Callable[[], float]) -> None:
        self._sources[name] = seconds

    def add_pid(self, name: str, pid: int | None) -> None:
        if pid is not None:
            self._sources[name] = lambda: process_seconds(pid)

    def remove(self, *names: str) -> None:
        for name in names:
            self._sources.pop(name, None)

    def snapshot(self) -> dict[str, float]:
        return {name: source() for name, source in self._sources.items()}

    @contextlib.contextmanager
    def measure(self, label: str, *, operations: int | None = None) -> Iterator[None]:
        """Record the CPU seconds of every source over the block (added to earlier blocks
        of the same label), with ``operations`` (how many tickets or calls it did)."""
        around = self.around(label) if self.around else contextlib.nullcontext()
        before = self.snapshot()
        wall = _wall()
        try:
            with around:
                yield
        finally:
            after = self.snapshot()
            result = self.results.setdefault(label, {})
            for name in after:
                result[name] = result.get(name, 0.0) + after[name] - before.get(name, 0.0)
            result["wall"] = result.get("wall", 0.0) + _wall() - wall
            if operations is not None:
                result[OPERATIONS] = result.get(OPERATIONS, 0) + operations

    def to_json(self) -> dict[str, Any]:
        return self.results


def _wall() -> float:
    import time

    return time.monotonic()


def meter_for(
    db_sources: dict[str, Callable[[], float]], processes: Iterable[ManagedProcess]
) -> CpuMeter:
    """CPU sources: this process (the load generator), every managed process, the databases."""
    meter = CpuMeter()
    meter.add_pid("bench client", os.getpid())
    workers = []
    for process in processes:
        if process.name.startswith("worker-"):
            workers.append(process.pid)
        else:
            meter.add_pid(process.name, process.pid)
    if workers:
        meter.add(
            f"{len(workers)} workers",
            lambda: sum(process_seconds(pid) for pid in workers if pid is not None),
        )
    for name, source in db_sources.items():
        meter.add(name, source)
    meter.add(MACHINE, machine_busy_seconds)
    meter.add(KERNEL, kernel_seconds)
    return meter
