"""Reading JSON request bodies: duplicate keys, unreadable numbers and deep nesting are
refused with JSON paths, never with the decoder's own words."""

from __future__ import annotations

import pytest

from hive_common.errors import InvalidArgument
from orchestrator_dynamic.domain.json_input import (
    MAX_JSON_NESTING,
    decode_json,
)


def refused(text: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        decode_json(text)
    return raised.value


def fields(error: InvalidArgument) -> dict[str, str]:
    return {v.field: v.description for v in error.violations}


def test_plain_json_is_decoded() -> None:
    assert decode_json('{"a": [1, 2.5, "x", null, true], "b": {"c": -7}}') == {
        "a": [1, 2.5, "x", None, True],
        "b": {"c": -7},
    }
    assert decode_json('{"n": -' + "9" * 4300 + "}") == {"n": -int("9" * 4300)}


def test_duplicate_keys_are_reported_at_every_level_in_document_order() -> None:
    error = refused(
        '{"plan_id": "a", "plan_id": "b", "tasks": [{"task_id": "x"}, '
        '{"parameters": {"k": 1, "k": 2, "k": 3, "odd key": 1, "odd key": 2}}], "tasks": []}'
    )
    assert [v.field for v in error.violations] == [
        "$.plan_id",
        "$.tasks",
        # Only the last "tasks" is kept, so what the first list holds is not looked at.
    ]
    nested = refused('{"tasks": [{"parameters": {"k": 1, "k": 2, "odd key": 1, "odd key": 2}}]}')
    assert fields(nested) == {
        "$.tasks[0].parameters.k": "duplicate key 'k': a key may appear only once in an object",
        '$.tasks[0].parameters["odd key"]': (
            "duplicate key 'odd key': a key may appear only once in an object"
        ),
    }
    assert nested.message.startswith("request body cannot be read: $.tasks[0].parameters.k:")


def test_an_integer_too_long_to_read_is_reported_with_its_path() -> None:
    error = refused('{"tasks": [{"max_retries": ' + "9" * 5000 + "}]}")
    assert fields(error) == {
        "$.tasks[0].max_retries": "number too large: an integer of 5000 digits"
    }
    assert "sys.set_int_max_str_digits" not in str(error)


def test_a_number_beyond_a_double_is_reported_as_written_not_as_inf() -> None:
    error = refused('{"tasks": [{"parameters": {"x": 1e400, "y": [-2.5E+999]}}]}')
    assert fields(error) == {
        "$.tasks[0].parameters.x": "number too large: 1e400 is beyond the range of a double",
        "$.tasks[0].parameters.y[0]": (
            "number too large: -2.5E+999 is beyond the range of a double"
        ),
    }


def test_nesting_beyond_the_decoder_is_a_limit() -> None:
    deep = '{"tasks": [{"parameters": ' + '{"n": ' * 5000 + "1" + "}" * 5000 + "}]}"
    error = refused(deep)
    assert fields(error) == {"$": f"nests more than {MAX_JSON_NESTING} levels deep"}
    assert "recursion" not in str(error)
    arrays = refused("[" * 1_000_000 + "]" * 1_000_000)
    assert fields(arrays) == {"$": f"nests more than {MAX_JSON_NESTING} levels deep"}


def test_non_standard_constants_are_refused() -> None:
    assert fields(refused('{"a": NaN}')) == {"$": "NaN is not valid JSON"}
    assert "$" in fields(refused('{"a": [1,'))
