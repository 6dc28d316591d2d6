import json
import math
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from execution_ticket_service.transport.grpc.convert import dict_to_struct
from hive_common.structs import struct_to_dict, whole_numbers_as_integers


def typed(value: Any) -> str:
    """``value`` as JSON, in which 3 and 3.0 differ (they are equal in Python)."""
    return json.dumps(value, sort_keys=True)


SAMPLES: list[dict[str, Any]] = [
    {},
    {"a": 1, "b": 2.5, "c": "x", "d": True, "e": False, "f": None},
    {"nested": {"deep": {"list": [1, "two", None, [3, {"k": "v"}], {}], "empty": []}}},
    {"unicode": "héllo ✓", "big": 1e300, "neg": -7, "zero": 0},
]


@pytest.mark.parametrize("value", SAMPLES)
def test_struct_to_dict_matches_message_to_dict(value: dict[str, Any]) -> None:
    message = dict_to_struct(value)
    expected = whole_numbers_as_integers(json_format.MessageToDict(message))
    result = struct_to_dict(message)
    assert result == expected
    # Same types too: whole numbers (doubles in a Struct) are integers again.
    assert typed(result) == typed(expected) == typed(value)


def test_struct_to_dict_unset_value_is_none() -> None:
    message = struct_pb2.Struct()
    message.fields["x"].SetInParent()
    assert struct_to_dict(message) == json_format.MessageToDict(message) == {"x": None}


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan])
def test_struct_to_dict_passes_non_json_numbers_on_to_validation(number: float) -> None:
    # MessageToDict raises a bare ValueError (an INTERNAL error); validation refuses them
    # with their path instead.
    message = struct_pb2.Struct()
    message.fields["x"].number_value = number
    converted = struct_to_dict(message)["x"]
    assert converted == number or (math.isnan(number) and math.isnan(converted))
