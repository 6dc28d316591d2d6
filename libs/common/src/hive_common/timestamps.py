"""``google.protobuf.Timestamp`` from a ``datetime``, for every service's messages."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def datetime_to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """As ``Timestamp.FromDatetime`` (a naive datetime is UTC), by plain arithmetic.

    FromDatetime goes through ``utctimetuple`` and ``calendar.timegm``: a quarter of a
    1,000-ticket response's CPU time, with four timestamps per ticket.
    """
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


__all__ = ["datetime_to_timestamp"]
