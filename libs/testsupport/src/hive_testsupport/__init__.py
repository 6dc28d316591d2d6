"""Test support for Hive Flow C: the services and reference workers in-process, with
settings suited to tests (``hive_testsupport.settings``, ``hive_testsupport.inprocess``).

Used by the service tests' conftest files; never a runtime dependency of a service.
"""

from hive_testsupport.inprocess import (
    InProcessFlow,
    InProcessRegistry,
    InProcessTicketService,
    WorkerTasks,
    drain_workers,
    start_worker,
)
from hive_testsupport.settings import (
    FAST_TICKET_LOOPS,
    orchestrator_settings,
    registry_settings,
    ticket_settings,
    worker_settings,
)

__all__ = [
    "FAST_TICKET_LOOPS",
    "InProcessFlow",
    "InProcessRegistry",
    "InProcessTicketService",
    "WorkerTasks",
    "drain_workers",
    "orchestrator_settings",
    "registry_settings",
    "start_worker",
    "ticket_settings",
    "worker_settings",
]
