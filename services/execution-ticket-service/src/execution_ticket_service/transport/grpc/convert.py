"""Protobuf <-> domain mapping. Enum numbers the domain does not know become bad input."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from execution_ticket_service.domain.models import (
    EventType,
    Priority,
    Ticket,
    TicketEvent,
    TicketStatus,
)
from execution_ticket_service.domain.validation import RawTicketSpec
from hive_common.structs import struct_to_dict
from hive_common.timestamps import datetime_to_timestamp
from neuralhive.ticket.v1 import ticket_service_pb2 as pb


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """``PRIORITY_HIGH`` -> ``HIGH``; 0 -> ``""``; an unknown number -> ``"<number>"``."""
    if value == 0:
        return ""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def status_name(value: int) -> str:
    return enum_name(pb.TicketStatus, value, "TICKET_STATUS_")


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def raw_spec(spec: pb.TicketSpec) -> RawTicketSpec:
    return RawTicketSpec(
        plan_id=spec.plan_id,
        task_id=spec.task_id,
        task_type=spec.task_type,
        intent_id=spec.intent_id,
        description=spec.description,
        parameters=struct_to_dict(spec.parameters) if spec.HasField("parameters") else {},
        required_capabilities=list(spec.required_capabilities),
        depends_on=list(spec.depends_on),
        priority=enum_name(pb.Priority, spec.priority, "PRIORITY_"),
        max_retries=spec.max_retries,
        timeout_seconds=spec.timeout_seconds,
    )


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    return None if value is None else datetime_to_timestamp(value)


_PRIORITY = {p: pb.Priority.Value(f"PRIORITY_{p.value}") for p in Priority}
_STATUS = {s: pb.TicketStatus.Value(f"TICKET_STATUS_{s.value}") for s in TicketStatus}


def status_to_proto(status: TicketStatus | None) -> pb.TicketStatus.ValueType:
    return _STATUS[status] if status is not None else pb.TICKET_STATUS_UNSPECIFIED


def ticket_to_proto(
    ticket: Ticket, *, parameters: struct_pb2.Struct | None = None
) -> pb.ExecutionTicket:
    """``parameters``: a Struct already equal to ``ticket.spec.parameters`` (the request's),
    copied instead of rebuilt from the dict."""
    spec = ticket.spec
    message = pb.ExecutionTicket(
        ticket_id=ticket.ticket_id,
        plan_id=spec.plan_id,
        intent_id=spec.intent_id,
        task_id=spec.task_id,
        task_type=spec.task_type,
        description=spec.description,
        parameters=parameters if parameters is not None else dict_to_struct(spec.parameters),
        required_capabilities=spec.required_capabilities,
        depends_on=spec.depends_on,
        priority=_PRIORITY[spec.priority],
        status=_STATUS[ticket.status],
        attempt=ticket.attempt,
        lost_runs=ticket.lost_runs,
        max_retries=spec.max_retries,
        timeout_seconds=spec.timeout_seconds,
        worker_id=ticket.worker_id,
        lease_expires_at=_ts(ticket.lease_expires_at),
        error_message=ticket.error_message,
        version=ticket.version,
        created_at=_ts(ticket.created_at),
        updated_at=_ts(ticket.updated_at),
        started_at=_ts(ticket.started_at),
        completed_at=_ts(ticket.completed_at),
    )
    if ticket.result is not None:
        message.result.CopyFrom(dict_to_struct(ticket.result))
    return message


_EVENT_TYPE = {t: pb.TicketEventType.Value(f"TICKET_EVENT_TYPE_{t.value}") for t in EventType}


def event_to_proto(event: TicketEvent) -> pb.TicketEvent:
    return pb.TicketEvent(
        event_id=event.event_id,
        cursor=event.cursor,
        type=_EVENT_TYPE[event.type],
        previous_status=status_to_proto(event.previous_status),
        ticket=ticket_to_proto(event.ticket),
        occurred_at=_ts(event.occurred_at),
        actor=event.actor,
    )
