"""Follow a plan to its end by polling ``GET /api/v1/plans/{id}``: a terminal status and
every ticket terminal (``settled_at``), as the orchestrator's WatchPlan stream ends.

The orchestrator's HTTP API has no streaming endpoint; a short poll interval is cheap (one
indexed read) and survives orchestrator restarts, which a stream would have to reconnect
around anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hive_cli.api import ApiError, HiveApi, JsonObject, ServiceUnreachable
from hive_cli.exit_codes import ExitCode
from hive_cli.progress import FailureTracker, ProgressDisplay
from hive_cli.render import plan_settled

TRANSIENT_STATUSES = frozenset({502, 503, 504})
"""Answers a watch rides out like an unreachable orchestrator."""

# How long the orchestrator may stay unreachable during a watch before giving up; a
# restart (rolling update, crash) takes a few seconds and must not end the watch.
UNREACHABLE_GRACE_SECONDS = 30.0


class WatchTimeout(Exception):
    """``--timeout`` elapsed; carries the last snapshot."""

    def __init__(self, plan: JsonObject) -> None:
        super().__init__(f"plan {plan.get('plan_id')} is still {plan.get('status')}")
        self.plan = plan


@dataclass
class PlanWatcher:
    """Polls one plan and feeds every snapshot to a display until it is settled."""

    api: HiveApi
    display: ProgressDisplay
    interval: float = 1.0
    timeout: float | None = None
    unreachable_grace: float = UNREACHABLE_GRACE_SECONDS
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def watch(self, plan_id: str) -> JsonObject:
        """The first snapshot of the plan settled (its status terminal and every ticket
        terminal: a plan CANCELLED or FAILED with tickets still in flight is watched on
        until they end); :class:`WatchTimeout` when ``timeout`` elapses.

        ``ApiError`` (e.g. NOT_FOUND) propagates; ``ServiceUnreachable`` at once if the
        first poll fails, else once the orchestrator has been unreachable for longer than
        ``unreachable_grace``. An answer that says "not now" (502, 503, 504: its database
        down, a proxy during a restart) counts as unreachable.
        """
        failures = FailureTracker(self.api.ticket_events, note=self.display.note)
        started = self.clock()
        unreachable_since: float | None = None
        last: JsonObject | None = None
        try:
            while True:
                try:
                    plan = self.api.get_plan(plan_id)
                except (ServiceUnreachable, ApiError) as exc:
                    if isinstance(exc, ApiError) and exc.status not in TRANSIENT_STATUSES:
                        raise
                    if last is None:
                        raise  # never reached: a wrong URL or a stopped service, not a restart
                    now = self.clock()
                    if unreachable_since is None:
                        unreachable_since = now
                        self.display.note(f"orchestrator unreachable ({_why(exc)}); retrying")
                    elif now - unreachable_since > self.unreachable_grace:
                        raise
                else:
                    if unreachable_since is not None:
                        self.display.note("orchestrator reachable again")
                        unreachable_since = None
                    last = plan
                    elapsed = self.clock() - started
                    self.display.update(plan, failures.new_failures(plan), elapsed)
                    if plan_settled(plan):
                        return plan
                if self.timeout is not None and self.clock() - started >= self.timeout:
                    raise WatchTimeout(last or {"plan_id": plan_id, "status": "UNKNOWN"})
                self.sleep(self.interval)
        finally:
            self.display.close()


def _why(exc: ServiceUnreachable | ApiError) -> str:
    if isinstance(exc, ServiceUnreachable):
        return exc.reason
    return f"{exc.status} {exc.code}: {exc.message}"


def plan_exit_code(plan: JsonObject) -> ExitCode:
    """0 for COMPLETED, 1 for FAILED or CANCELLED."""
    return ExitCode.OK if plan.get("status") == "COMPLETED" else ExitCode.PLAN_UNSUCCESSFUL
