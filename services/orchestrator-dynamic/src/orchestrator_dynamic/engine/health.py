"""What the orchestrator last saw of its dependencies, for ``/ready``."""

from __future__ import annotations

from dataclasses import dataclass

from hive_common.http import CheckResult

TICKET_SERVICE = "ticket_service"
REGISTRY = "registry"


@dataclass
class _Outcome:
    ok: bool = True
    detail: str | None = None


class DependencyHealth:
    """The outcome of the latest call to each remote service. A failing service is
    *degraded*, not down: the orchestrator keeps its plans and resumes when it is back."""

    def __init__(self) -> None:
        self._outcomes: dict[str, _Outcome] = {TICKET_SERVICE: _Outcome(), REGISTRY: _Outcome()}

    def succeeded(self, name: str) -> None:
        self._outcomes[name] = _Outcome()

    def failed(self, name: str, detail: str) -> None:
        self._outcomes[name] = _Outcome(ok=False, detail=detail)

    def failure(self, name: str) -> str | None:
        """Why the latest call to ``name`` failed; None when it succeeded."""
        outcome = self._outcomes.get(name, _Outcome())
        return None if outcome.ok else outcome.detail

    def report(self) -> dict[str, CheckResult]:
        report: dict[str, CheckResult] = {}
        for name, outcome in self._outcomes.items():
            if outcome.ok:
                report[name] = {"status": "ok"}
            else:
                report[name] = {"status": "degraded", "detail": outcome.detail}
        return report
