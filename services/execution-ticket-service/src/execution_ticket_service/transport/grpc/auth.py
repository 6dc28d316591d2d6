"""The one authorization interceptor of TicketService (DESIGN.md section 6).

It verifies the bearer token of every TicketService call (UNAUTHENTICATED when missing,
malformed, badly signed or expired), applies :func:`domain.authorization.authorize` to the
request (PERMISSION_DENIED), and exposes the verified claims to the servicer through a
context variable (used to name the actor of each change). Health and reflection are open.
UpdateTicketStatuses is authorized per report (:meth:`TicketAuthInterceptor.authorize_report`,
called by the servicer): any valid token may make the call itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from typing import Any

from execution_ticket_service.domain.authorization import AccessRequest, authorize
from execution_ticket_service.domain.ids import canonical_if_uuid
from execution_ticket_service.domain.models import Ticket, TicketStatus
from execution_ticket_service.domain.validation import validate_ticket_id
from execution_ticket_service.transport.grpc.convert import status_name
from hive_common.auth import TokenClaims, TokenKind, TokenVerifier, VerifiedTokenCache
from hive_common.errors import Internal
from hive_common.grpc_server import HandlerWrappingInterceptor, RpcCall
from neuralhive.ticket.v1 import ticket_service_pb2 as pb

SERVICE_NAME = "neuralhive.ticket.v1.TicketService"
_PREFIX = f"/{SERVICE_NAME}/"

_claims: ContextVar[TokenClaims | None] = ContextVar("ticket_service_claims", default=None)

TicketLookup = Callable[[str], Awaitable[Ticket]]


def current_claims() -> TokenClaims:
    claims = _claims.get()
    if claims is None:  # the interceptor is not installed: a wiring bug, not bad input
        raise Internal("no verified token for this call")
    return claims


def actor_of(claims: TokenClaims) -> str:
    """``service:<name>``, ``worker:<id>`` (worker and ticket tokens)."""
    if claims.kind is TokenKind.SERVICE:
        return f"service:{claims.subject}"
    return f"worker:{claims.worker_id or claims.subject}"


def _status(value: int) -> TicketStatus | None:
    try:
        return TicketStatus(status_name(value))
    except ValueError:
        return None


def _update_access(request: pb.UpdateTicketStatusRequest) -> AccessRequest:
    return AccessRequest(
        method="UpdateTicketStatus",
        ticket_id=canonical_if_uuid(request.ticket_id),
        attempt=request.attempt,
        status=_status(request.status),
    )


class TicketAuthInterceptor(HandlerWrappingInterceptor):
    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        ticket_lookup: TicketLookup,
        token_cache_size: int = 10_000,
    ) -> None:
        self._tokens = VerifiedTokenCache(verifier=verifier, max_entries=token_cache_size)
        self._lookup = ticket_lookup

    def authorize_report(self, report: pb.TicketStatusReport) -> TokenClaims:
        """The claims that authorize one report of UpdateTicketStatuses: its own
        ``ticket_token`` (else the call's token), checked exactly as UpdateTicketStatus's
        bearer token would be (UNAUTHENTICATED, PERMISSION_DENIED)."""
        token = report.ticket_token
        claims = self._tokens.verify(token) if token else current_claims()
        authorize(claims, _update_access(report.update))
        return claims

    async def _access(self, method: str, request: Any, claims: TokenClaims) -> AccessRequest:
        if method == "UpdateTicketStatus":
            return _update_access(request)
        if method == "WatchTickets":
            return AccessRequest(method=method, worker_id=canonical_if_uuid(request.worker_id))
        if method == "GenerateToken" and claims.kind is TokenKind.WORKER:
            ticket = await self._lookup(validate_ticket_id(request.ticket_id))
            return AccessRequest(method=method, ticket_id=ticket.ticket_id, ticket=ticket)
        return AccessRequest(method=method)

    async def _check(self, method: str, request: Any, metadata: Any) -> TokenClaims:
        claims = self._tokens.verify_metadata(metadata)
        authorize(claims, await self._access(method, request, claims))
        return claims

    def around(
        self, call: RpcCall, context: Any, request: Any
    ) -> AbstractAsyncContextManager[None]:
        return self._around(call, request)

    @asynccontextmanager
    async def _around(self, call: RpcCall, request: Any) -> AsyncIterator[None]:
        if not call.method.startswith(_PREFIX):
            yield  # health, reflection
            return
        claims = await self._check(call.method.removeprefix(_PREFIX), request, call.metadata)
        # Set in the RPC's own task context, which ends with the RPC: no reset (a response
        # stream closed early is finalized by asyncio in another context, where a reset
        # would raise).
        _claims.set(claims)
        yield
