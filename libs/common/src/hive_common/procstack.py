"""A small process supervisor for running the Hive services side by side as OS processes.

Used by the no-Docker dev stack (``make dev``) and the cross-service integration tests.
A :class:`ProcessStack` holds named :class:`ManagedProcess` es built from
:class:`ProcessSpec` s and can start them, wait until each is ready (an HTTP ``/ready``
answering 200, a line in its log, or any callable), stop them with SIGTERM and SIGKILL
after a grace period, restart one, or kill one with SIGKILL to simulate a crash.

Every process writes stdout and stderr to its own log file (``<log_dir>/<name>.log``,
appended across restarts, each start marked by a header line). Each child runs in its own
session (process group): a terminal's Ctrl-C reaches only the supervisor, which then stops
the children in order, and a kill takes the whole group (a worker's shell tasks too). On
Linux, children also get SIGTERM when the supervisor dies without cleaning up (via
``setpriv --pdeathsig``), and processes still running at interpreter exit are stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from hive_common._exit import StopAtExit

__all__ = [
    "ManagedProcess",
    "ProcessExited",
    "ProcessSpec",
    "ProcessStack",
    "ProcessStackError",
    "ReadyProbe",
    "ReadyTimeout",
    "http_ready",
    "log_ready",
    "logged_errors",
]

ReadyProbe = Callable[["ManagedProcess"], bool]
"""Returns True once the process can serve; called repeatedly, must not block for long."""

_POLL_SECONDS = 0.1


class ProcessStackError(RuntimeError):
    """A managed process could not be started, did not get ready, or is unknown."""


class ProcessExited(ProcessStackError):
    """The process ended while we waited for it to get ready; the message has its log tail."""


class ReadyTimeout(ProcessStackError):
    """The process did not get ready before the deadline; the message has its log tail."""


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """How to run one process.

    ``env`` is added to the supervisor's environment (``inherit_env=False`` uses ``env``
    alone). ``tier`` orders shutdown: :meth:`ProcessStack.stop_all` stops the highest tier
    first (all processes of a tier at once), so give clients a higher tier than the
    services they talk to.
    """

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    inherit_env: bool = True
    cwd: Path | None = None
    ready: ReadyProbe | None = None
    ready_timeout: float = 60.0
    stop_grace: float = 10.0
    tier: int = 0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"process name {self.name!r} must be a simple file name")
        if not self.argv:
            raise ValueError(f"process {self.name!r} needs a command")


def http_ready(url: str, *, timeout: float = 1.0) -> ReadyProbe:
    """A probe that is ready when ``GET url`` answers 200."""

    # Never through an HTTP proxy from the environment: the process is local.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def probe(_: ManagedProcess) -> bool:
        try:
            with opener.open(url, timeout=timeout) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    return probe


def log_ready(pattern: str) -> ReadyProbe:
    """A probe that is ready once the log written since the latest start matches ``pattern``
    (a regular expression)."""
    compiled = re.compile(pattern)

    def probe(process: ManagedProcess) -> bool:
        return compiled.search(process.log_since_start()) is not None

    return probe


# --------------------------------------------------------------------------------------------
# Clean-up of processes still running when the interpreter exits

_live: StopAtExit[ManagedProcess] = StopAtExit(lambda process: process.stop(grace=5.0))


def logged_errors(log_path: Path) -> list[dict[str, Any]]:
    """The ``error`` and ``critical`` entries of a process's JSON log (the services'
    ``--log-format json``); lines that are not JSON objects are skipped."""
    found: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), log_path.open(errors="replace") as log:
        for line in log:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                found.append(entry)
    return found


class ManagedProcess:
    """One supervised OS process, started again and again from the same :class:`ProcessSpec`."""

    def __init__(self, spec: ProcessSpec, *, log_dir: Path) -> None:
        self.spec = spec
        self.log_path = log_dir / f"{spec.name}.log"
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.starts = 0
        self.last_returncode: int | None = None

    @property
    def name(self) -> str:
        """The spec's name."""
        return self.spec.name

    @property
    def pid(self) -> int | None:
        """The process id while it runs (it is also the process group id), else None."""
        return self._popen.pid if self.is_running and self._popen is not None else None

    @property
    def is_running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the latest run (negative: killed by that signal); None while running
        or before the first start."""
        if self._popen is not None:
            code = self._popen.poll()
            if code is not None:
                self.last_returncode = code
            return code
        return self.last_returncode

    def start(self) -> None:
        """Start the process (no-op while it runs); does not wait for readiness."""
        if self.is_running:
            return
        self._reap()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        command = list(self.spec.argv)
        header = f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {self.name}: {command}\n"
        log.write(header.encode())
        log.flush()
        # Readiness probes read from here on: not the header, nor earlier runs.
        self._log_offset = log.tell()
        # The kernel sends SIGTERM to the child when the thread that forked it dies; only
        # from the main thread, whose death is the supervisor's death.
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            command = [setpriv, "--pdeathsig=SIGTERM", "--", *command]
        env = {**os.environ, **self.spec.env} if self.spec.inherit_env else dict(self.spec.env)
        try:
            self._popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.spec.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise ProcessStackError(f"could not start {self.name}: {exc}") from exc
        finally:
            log.close()  # the child has its own copy of the descriptor
        self.starts += 1
        _live.add(self)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the readiness probe passes (immediately without a probe).

        Raises :class:`ProcessExited` if the process ends first and :class:`ReadyTimeout`
        after ``timeout`` seconds (default: the spec's ``ready_timeout``).
        """
        deadline = time.monotonic() + (self.spec.ready_timeout if timeout is None else timeout)
        while True:
            self.check_ready_or_raise(deadline)
            if self._probe():
                return
            time.sleep(_POLL_SECONDS)

    def check_ready_or_raise(self, deadline: float) -> None:
        """Raise if the process is not running or ``deadline`` (monotonic) has passed."""
        if not self.is_running:
            raise ProcessExited(
                f"{self.name} exited with code {self.returncode} before it was ready; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise ReadyTimeout(
                f"{self.name} was not ready in time; log {self.log_path}:\n{self.log_tail()}"
            )

    def _probe(self) -> bool:
        return self.spec.ready is None or self.spec.ready(self)

    def is_ready(self) -> bool:
        """Running and passing its readiness probe right now."""
        return self.is_running and self._probe()

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the process itself (not its group); no-op if it is not running."""
        if self._popen is not None and self.is_running:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signum)

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds (default: the spec's), then SIGKILL the group.

        Returns the exit status (None if it was never started).
        """
        if self._popen is None:
            return self.last_returncode
        self.signal(signal.SIGTERM)
        return self.wait_stopped(self.spec.stop_grace if grace is None else grace)

    def wait_stopped(self, grace: float) -> int | None:
        """Wait for an already signalled process to end; SIGKILL its group after ``grace``."""
        if self._popen is None:
            return self.last_returncode
        try:
            self._popen.wait(grace)
        except subprocess.TimeoutExpired:
            self._killpg()
            self._popen.wait(10)
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once (a crash, as ``kill -9``); returns the
        exit status."""
        if self._popen is None:
            return self.last_returncode
        self._killpg()
        self._popen.wait(10)
        return self._reap()

    def restart(self, *, grace: float | None = None, wait: bool = True) -> None:
        """Stop (gracefully) and start again; with ``wait``, block until ready."""
        self.stop(grace)
        self.start()
        if wait:
            self.wait_ready()

    def log_since_start(self) -> str:
        """What the process wrote since its latest start."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log (any run)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _killpg(self) -> None:
        if self._popen is None:
            return
        # The child leads its own session, so its pid is the group id; the group may outlive
        # the leader (e.g. a shell task's children), so kill it even if the leader is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)

    def _reap(self) -> int | None:
        if self._popen is None:
            return self.last_returncode
        code = self._popen.poll()
        if code is None:
            return None
        # Anything left in the group (grandchildren) goes with the leader.
        self._killpg()
        self.last_returncode = code
        self._popen = None
        _live.discard(self)
        return code

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} returncode={self.returncode}>"


class ProcessStack:
    """Named processes started, watched and stopped together.

    Use as a context manager (``__exit__`` stops everything) or call :meth:`stop_all`.
    """

    def __init__(self, specs: Iterable[ProcessSpec], *, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._processes: dict[str, ManagedProcess] = {}
        for spec in specs:
            if spec.name in self._processes:
                raise ValueError(f"duplicate process name {spec.name!r}")
            self._processes[spec.name] = ManagedProcess(spec, log_dir=log_dir)

    def __getitem__(self, name: str) -> ManagedProcess:
        try:
            return self._processes[name]
        except KeyError:
            raise ProcessStackError(f"no process named {name!r}") from None

    def __iter__(self) -> Iterator[ManagedProcess]:
        return iter(list(self._processes.values()))

    @property
    def names(self) -> list[str]:
        """Process names in the order they were given."""
        return list(self._processes)

    def start(self, *names: str) -> None:
        """Start the named processes (those not running); does not wait for readiness."""
        for process in [self[name] for name in names]:
            process.start()

    def start_all(self, *, timeout: float | None = None) -> None:
        """Start every process at once, then wait until all are ready.

        The processes come up concurrently, so each must tolerate its dependencies not
        being up yet (the services and workers retry). ``timeout`` bounds the whole wait
        (default: the largest ``ready_timeout``). On failure everything is stopped.
        """
        try:
            for process in self._processes.values():
                process.start()
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop_all(grace=2.0)
            raise

    def wait_ready(
        self, names: Sequence[str] | None = None, *, timeout: float | None = None
    ) -> None:
        """Wait until the named processes (default all) are ready, with one shared deadline."""
        selected = [self[name] for name in (names or self.names)]
        if timeout is None:
            timeout = max((p.spec.ready_timeout for p in selected), default=0.0)
        deadline = time.monotonic() + timeout
        pending = list(selected)
        while pending:
            for process in list(pending):
                process.check_ready_or_raise(deadline)
                if process.is_ready():
                    pending.remove(process)
            if pending:
                time.sleep(_POLL_SECONDS)

    def stop(self, *names: str, grace: float | None = None) -> None:
        """SIGTERM the named processes together, then wait for each (SIGKILL after grace)."""
        selected = [self[name] for name in names]
        for process in selected:
            process.signal(signal.SIGTERM)
        deadline = time.monotonic()
        for process in selected:
            own = process.spec.stop_grace if grace is None else grace
            process.wait_stopped(max(0.0, deadline + own - time.monotonic()))

    def stop_all(self, *, grace: float | None = None) -> None:
        """Stop every process, highest ``tier`` first (a tier's processes together)."""
        tiers = sorted({p.spec.tier for p in self._processes.values()}, reverse=True)
        for tier in tiers:
            self.stop(
                *(p.name for p in self._processes.values() if p.spec.tier == tier), grace=grace
            )

    def exited(self) -> list[ManagedProcess]:
        """Processes that were started and are no longer running."""
        return [p for p in self._processes.values() if p.starts and not p.is_running]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
