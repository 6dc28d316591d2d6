import uuid

from execution_ticket_service.domain.ids import new_uuid4_strings


def test_new_uuid4_strings_are_canonical_distinct_version_4_uuids() -> None:
    ids = new_uuid4_strings(1000)
    assert len(ids) == 1000
    assert len(set(ids)) == 1000
    for value in ids:
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_new_uuid4_strings_of_zero_is_empty() -> None:
    assert new_uuid4_strings(0) == []
