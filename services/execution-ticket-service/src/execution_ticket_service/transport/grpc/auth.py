"""The one authorization interceptor of TicketService (DESIGN.md section 6).

It verifies the bearer token of every TicketService call (UNAUTHENTICATED when missing,
malformed, badly signed or expired), applies :func:`domain.authorization.authorize` to the
request (PERMISSION_DENIED), and exposes the verified claims to the servicer through a
context variable (used to name the actor of each change). Health and reflection are open.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any, cast

import grpc

from execution_ticket_service.domain.authorization import AccessRequest, authorize
from execution_ticket_service.domain.models import Ticket, TicketStatus
from execution_ticket_service.domain.validation import validate_ticket_id
from execution_ticket_service.transport.grpc.convert import status_name
from hive_common.auth import TokenClaims, TokenKind, TokenVerifier, bearer_token_from_metadata
from hive_common.errors import Internal

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


def _canonical_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value


def _status(value: int) -> TicketStatus | None:
    try:
        return TicketStatus(status_name(value))
    except ValueError:
        return None


class VerifiedTokenCache:
    """Verified claims by token string, until the token's expiry; a bounded LRU.

    Clients send the same token on every call, and decoding and checking an HS256 JWT
    was a large part of a small RPC's CPU time. A token is only ever cached after the
    verifier accepted it, and is served from the cache only before its ``exp``: after
    that the verifier decides again (and refuses it once its leeway has passed too).
    """

    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._verifier = verifier
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[TokenClaims, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def verify_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> TokenClaims:
        """As :meth:`TokenVerifier.verify_metadata`, from the cache when possible."""
        token = bearer_token_from_metadata(metadata)
        if token is None:
            return self._verifier.verify_metadata(metadata)  # refuses: missing token
        return self.verify(token)

    def verify(self, token: str) -> TokenClaims:
        """As :meth:`TokenVerifier.verify`, from the cache when possible."""
        now = self._clock()
        cached = self._entries.get(token)
        if cached is not None:
            claims, expires_at = cached
            if now < expires_at:
                self._entries.move_to_end(token)
                return claims
            del self._entries[token]
        claims = self._verifier.verify(token)
        expires_at = claims.expires_at.timestamp()
        if now < expires_at:
            self._entries[token] = (claims, expires_at)
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return claims


class TicketAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        ticket_lookup: TicketLookup,
        token_cache_size: int = 10_000,
    ) -> None:
        self._tokens = VerifiedTokenCache(verifier=verifier, max_entries=token_cache_size)
        self._lookup = ticket_lookup

    async def _access(self, method: str, request: Any, claims: TokenClaims) -> AccessRequest:
        if method == "UpdateTicketStatus":
            return AccessRequest(
                method=method,
                ticket_id=_canonical_uuid(request.ticket_id),
                attempt=request.attempt,
                status=_status(request.status),
            )
        if method == "WatchTickets":
            return AccessRequest(method=method, worker_id=request.worker_id)
        if method == "GenerateToken" and claims.kind is TokenKind.WORKER:
            ticket = await self._lookup(validate_ticket_id(request.ticket_id))
            return AccessRequest(method=method, ticket_id=ticket.ticket_id, ticket=ticket)
        return AccessRequest(method=method)

    async def _check(self, method: str, request: Any, metadata: Any) -> TokenClaims:
        claims = self._tokens.verify_metadata(metadata)
        authorize(claims, await self._access(method, request, claims))
        return claims

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        full_method: str = handler_call_details.method
        if handler is None or not full_method.startswith(_PREFIX):
            return handler
        method = full_method.removeprefix(_PREFIX)
        metadata = tuple(handler_call_details.invocation_metadata or ())
        serializers: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                token = _claims.set(await self._check(method, request, metadata))
                try:
                    return await inner_unary(request, context)
                finally:
                    _claims.reset(token)

            return grpc.unary_unary_rpc_method_handler(unary, **serializers)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                _claims.set(await self._check(method, request, metadata))
                # Our servicer's streams are async generators.
                items = cast(AsyncIterator[Any], inner_stream(request, context))
                async for item in items:
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, **serializers)
        return handler  # TicketService has no client-streaming RPCs
