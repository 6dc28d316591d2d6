"""datetime_to_timestamp: the same Timestamp as FromDatetime, by plain arithmetic."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from hive_common.timestamps import datetime_to_timestamp


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 25, 1, 2, 3, 456789, tzinfo=UTC),
        datetime(2026, 11, 25, 1, 2, 3, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
        datetime(2026, 11, 25, 1, 2, 3, 1),  # naive: UTC, as FromDatetime takes it
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1900, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_datetime_to_timestamp_matches_from_datetime(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert datetime_to_timestamp(value) == expected
