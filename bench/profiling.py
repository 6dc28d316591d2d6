"""``--profile``: sample the service processes with py-spy while a phase runs, and summarise.

py-spy writes collapsed stacks (``frame;frame;... count``); :func:`summarise` turns them
into the functions with the most samples, on the CPU or waiting (``--idle`` is off, so only
samples where a thread was running Python count).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hive_common.procstack import ManagedProcess


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def sampled(
    processes: Iterable[ManagedProcess], out_dir: Path, *, label: str, rate: int = 200
) -> Iterator[list[Path]]:
    """py-spy every process (non-blocking sampling) for the duration of the block."""
    binary = _py_spy()
    outputs: list[Path] = []
    spies: list[subprocess.Popen[bytes]] = []
    if binary is None:
        print("bench: py-spy not found; not profiling", file=sys.stderr)
        yield outputs
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for process in processes:
        if process.pid is None:
            continue
        output = out_dir / f"{label}-{process.name}.txt"
        outputs.append(output)
        spies.append(
            subprocess.Popen(
                [
                    binary,
                    "record",
                    "--pid",
                    str(process.pid),
                    "--format",
                    "raw",
                    "--rate",
                    str(rate),
                    # --native (C frames too: grpc core, asyncio, psycopg) must stop the
                    # process to unwind it; otherwise sample without pausing it.
                    "--native" if os.environ.get("BENCH_PYSPY_NATIVE") else "--nonblocking",
                    "--output",
                    str(output),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        yield outputs
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)


def sampler_for(
    processes: Iterable[ManagedProcess], out_dir: Path
) -> Callable[[str], contextlib.AbstractContextManager[object]]:
    """A :class:`bench.cpu.CpuMeter` hook: py-spy the services during each measurement."""
    chosen = [p for p in processes if p.name != "echo" and not p.name.startswith("worker-")]

    def around(label: str) -> contextlib.AbstractContextManager[object]:
        safe = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
        return sampled(chosen, out_dir, label=safe)

    return around


def summarise(path: Path, *, top: int = 25, contains: str = "") -> str:
    """Top functions by inclusive and by self samples (optionally only stacks containing
    ``contains``)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        if contains and contains not in stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [
        f"{path.name}: {total} samples" + (f" in stacks with {contains!r}" if contains else "")
    ]
    lines.append("  inclusive:")
    lines += [f"    {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)] if total else []
    lines.append("  self:")
    lines += [f"    {n / total:6.1%}  {f}" for f, n in own.most_common(top)] if total else []
    return "\n".join(lines)


def categorise(path: Path) -> str:
    """Share of samples per coarse category (servicer methods found by name)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        servicer = next(
            (f.split(" ")[0] for f in frames if "Servicer." in f and "servicer.py" in f), None
        )
        if "OutboxRelay" in stack:
            counts["OutboxRelay (audit relay to MongoDB)"] += count
        elif servicer:
            counts[f"servicer {servicer}"] += count
        elif "grpc_server.py" in stack or "auth.py" in stack or "interceptor" in stack.lower():
            counts["interceptors / handler wrapper (outside the servicer)"] += count
        elif "background.py" in stack:
            counts["other background tasks"] += count
        elif frames[-1].startswith("Thread.run"):
            counts["C threads (grpc poller etc.)"] += count
        elif frames[-1].startswith("Handle._run"):
            counts["event-loop callbacks in C (grpc/cython)"] += count
        elif "select" in frames[-1].lower():
            counts["event loop select()"] += count
        else:
            counts["other"] += count
    lines = [f"{path.name}: {total} samples by category"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in counts.most_common()] if total else []
    return "\n".join(lines)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="summarise py-spy raw profiles")
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--contains", default="")
    parser.add_argument("--categories", action="store_true")
    args = parser.parse_args()
    for path in args.paths:
        if args.categories:
            print(categorise(path))
        else:
            print(summarise(path, top=args.top, contains=args.contains))


if __name__ == "__main__":
    main()
