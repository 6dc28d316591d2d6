"""Validation reports every bad field at once and normalises the rest."""

from __future__ import annotations

from typing import Any

import pytest

from hive_common.errors import InvalidArgument
from service_registry.domain.models import ListCursor, WorkerStatus
from service_registry.domain.validation import (
    Limits,
    encode_cursor,
    parse_worker_id,
    validate_discovery,
    validate_heartbeat,
    validate_list,
    validate_registration,
)

GOOD_REGISTRATION: dict[str, Any] = {
    "name": "host-1.example",
    "namespace": "",
    "capabilities": ["python", "gpu", "python"],
    "labels": {"zone": "eu-1", "tier/gpu": "yes"},
    "max_concurrent": 4,
    "version": "1.2.3",
}


def fields(exc: pytest.ExceptionInfo[InvalidArgument]) -> set[str]:
    return {v.field for v in exc.value.violations}


def test_good_registration_is_normalised() -> None:
    spec = validate_registration(**GOOD_REGISTRATION)
    assert spec.namespace == "default"
    assert spec.capabilities == ("gpu", "python")


@pytest.mark.parametrize(
    ("overrides", "bad_fields"),
    [
        ({"name": ""}, {"name"}),
        ({"name": "has space"}, {"name"}),
        ({"name": "x" * 129}, {"name"}),
        ({"namespace": "Upper"}, {"namespace"}),
        ({"namespace": "-x"}, {"namespace"}),
        ({"capabilities": []}, {"capabilities"}),
        ({"capabilities": ["ok", "not ok", ""]}, {"capabilities[1]", "capabilities[2]"}),
        ({"capabilities": [f"c{i}" for i in range(65)]}, {"capabilities"}),
        ({"labels": {"bad key": "v"}}, {"labels[bad key]"}),
        ({"labels": {"k": "v" * 257}}, {"labels[k]"}),
        ({"labels": {f"k{i}": "v" for i in range(33)}}, {"labels"}),
        ({"max_concurrent": 0}, {"max_concurrent"}),
        ({"max_concurrent": -3}, {"max_concurrent"}),
        ({"max_concurrent": 10_001}, {"max_concurrent"}),
        ({"version": "v" * 65}, {"version"}),
        (
            {"name": "", "max_concurrent": 0, "namespace": "A"},
            {"name", "max_concurrent", "namespace"},
        ),
    ],
)
def test_bad_registration(overrides: dict[str, Any], bad_fields: set[str]) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_registration(**{**GOOD_REGISTRATION, **overrides})
    assert fields(exc) == bad_fields


@pytest.mark.parametrize(
    ("args", "bad_fields"),
    [
        ({"worker_id": ""}, {"worker_id"}),
        ({"worker_id": "nope"}, {"worker_id"}),
        ({"in_flight": -1}, {"in_flight"}),
        ({"succeeded_total": 2**63}, {"succeeded_total"}),
        ({"failed_total": 2**64 - 1}, {"failed_total"}),
    ],
)
def test_bad_heartbeat(args: dict[str, Any], bad_fields: set[str]) -> None:
    base: dict[str, Any] = {
        "worker_id": "7d1d3a56-0a37-4d59-9f36-0c1c8e0f6a11",
        "in_flight": 0,
        "succeeded_total": None,
        "failed_total": None,
        "draining": False,
    }
    with pytest.raises(InvalidArgument) as exc:
        validate_heartbeat(**{**base, **args})
    assert fields(exc) == bad_fields


def test_parse_worker_id() -> None:
    with pytest.raises(InvalidArgument):
        parse_worker_id("123")
    assert str(parse_worker_id("7d1d3a56-0a37-4d59-9f36-0c1c8e0f6a11")).startswith("7d1d")


@pytest.mark.parametrize(("max_results", "expected"), [(0, 10), (1, 1), (100, 100), (5000, 100)])
def test_discovery_max_results_default_and_cap(max_results: int, expected: int) -> None:
    q = validate_discovery(
        required_capabilities=["python"],
        label_selector={},
        namespace="",
        max_results=max_results,
        limits=Limits(),
    )
    assert q.max_results == expected
    assert q.namespace == "default"


def test_bad_discovery_reports_every_field() -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_discovery(
            required_capabilities=["ok", "bad cap"],
            label_selector={"": "x"},
            namespace="NOPE",
            max_results=-1,
            limits=Limits(),
        )
    assert fields(exc) == {
        "required_capabilities[1]",
        "label_selector[]",
        "namespace",
        "max_results",
    }


def test_list_cursor_round_trip_and_bad_token() -> None:
    token = encode_cursor(ListCursor(namespace="default", name="w1"))
    q = validate_list(
        namespace="",
        statuses=[WorkerStatus.HEALTHY],
        capability="python",
        page_size=0,
        page_token=token,
        limits=Limits(),
    )
    assert q.after == ListCursor(namespace="default", name="w1")
    assert q.namespace is None
    assert q.page_size == 50
    for bad in ("!!!", encode_cursor(ListCursor("a", "b"))[:-3] + "xyz", "e30"):
        with pytest.raises(InvalidArgument) as exc:
            validate_list(
                namespace="",
                statuses=[],
                capability="",
                page_size=10,
                page_token=bad,
                limits=Limits(),
            )
        assert fields(exc) == {"page_token"}
