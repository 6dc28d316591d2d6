"""Bases for fake gRPC services in tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


async def _unscripted(context: Context) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")


class UnscriptedTickets(pb_grpc.TicketServiceServicer):
    """A ticket service whose every RPC answers UNIMPLEMENTED: a fake overrides the ones
    it scripts (and is a complete servicer for the type checker)."""

    async def CreateTicket(self, request: Any, context: Context) -> Any:
        await _unscripted(context)

    async def BatchCreateTickets(self, request: Any, context: Context) -> Any:
        await _unscripted(context)

    async def GetTicket(self, request: Any, context: Context) -> Any:
        await _unscripted(context)

    async def ListTickets(self, request: Any, context: Context) -> Any:
        await _unscripted(context)

    async def AssignTicket(self, request: Any, context: Context) -> Any:
        await _unscripted(context)

    async def AssignTickets(self, request: Any, context: Context) -> Any:
        await _unscripted(context)

    async def UpdateTicketStatus(self, request: Any, context: Context) -> Any:
        await _unscripted(context)

    async def UpdateTicketStatuses(self, request: Any, context: Context) -> Any:
        await _unscripted(context)

    async def GenerateToken(self, request: Any, context: Context) -> Any:
        await _unscripted(context)

    async def WatchTickets(
        self, request: Any, context: Context
    ) -> AsyncIterator[pb.WatchTicketsResponse]:
        await _unscripted(context)
        yield pb.WatchTicketsResponse()  # never reached: a stream, like the RPC


__all__ = ["UnscriptedTickets"]
