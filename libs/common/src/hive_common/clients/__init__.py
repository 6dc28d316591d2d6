"""Typed clients of the Hive Flow C gRPC services.

:class:`TicketClient` (TicketService) and :class:`RegistryClient` (ServiceRegistry) wrap
the generated stubs over :func:`hive_common.grpc_client.create_channel`: bearer token
from a token provider (or per call), a deadline per attempt and one for the whole call,
retries of UNAVAILABLE / DEADLINE_EXCEEDED only (every RPC of both services is
idempotent), typed :class:`~hive_common.errors.HiveError` failures, and watch streams
as async iterators that reconnect (the ticket watch resumes from its last cursor).
"""

from hive_common.clients._calls import CallPolicy, ReconnectPolicy
from hive_common.clients.registry import RegistryClient, WorkerWatch
from hive_common.clients.tickets import (
    TicketClient,
    TicketWatch,
    status_update_request,
    to_struct,
)

__all__ = [
    "CallPolicy",
    "ReconnectPolicy",
    "RegistryClient",
    "TicketClient",
    "TicketWatch",
    "WorkerWatch",
    "status_update_request",
    "to_struct",
]
